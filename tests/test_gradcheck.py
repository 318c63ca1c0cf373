"""gradcheck catches a deliberately wrong backward, names it, and passes a right one."""

import torch
from torch import nn

from gradmedic.remedies import gradcheck


class Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, wrong):
        ctx.save_for_backward(x)
        ctx.wrong = wrong
        return x**3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        factor = 2 if ctx.wrong else 3  # the wrong one forgets the chain rule's 3
        return grad * factor * x**2, None


class CubeLayer(nn.Module):
    def __init__(self, wrong: bool):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5]))
        self.wrong = wrong

    def forward(self, x):
        return Cube.apply(x, self.wrong) * self.scale


def test_right_backward_passes():
    result = gradcheck(CubeLayer(wrong=False), torch.randn(3, 2))
    assert result.ok, str(result)
    assert result.checked == ["input 0", "parameter scale"]


def test_wrong_backward_is_caught_and_named():
    x = torch.randn(3, 2)
    result = gradcheck(CubeLayer(wrong=True), x)
    assert not result.ok
    assert list(result.mismatches) == ["input 0"]  # the parameter's gradient does not go through Cube
    m = result.mismatches["input 0"]
    # the analytical Jacobian is 2/3 of the true one: the ratio of norms says so
    assert abs(m["analytical_norm"] / m["numerical_norm"] - 2 / 3) < 1e-4
    assert "FAILED for input 0" in str(result)


def test_plain_function():
    assert gradcheck(lambda a, b: (a * b).sin(), torch.randn(4), torch.randn(4)).ok
