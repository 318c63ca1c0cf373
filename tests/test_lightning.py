"""A real Lightning Trainer with the one-line callback: the recorded total gradient norm is the pre-clip
norm Lightning's own ``grad_norm`` utility reports in ``on_before_optimizer_step``, the recorded loss is
the logged ``training_step`` loss (the mean over micro-batches under accumulation, not Lightning's
divided ``outputs["loss"]``), gradmedic's numbers reach the Trainer's loggers, no hook is left."""

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm
from tests.helpers import hook_state

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import Logger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from gradmedic.integrations.lightning import GradmedicCallback  # noqa: E402

STEPS = 4
CLIP = 0.05  # below the gradient norms of this net (~0.1-0.3): clipping acts at every step


class MemoryLogger(Logger):
    """Keeps every log_metrics call: the framework's logged numbers, read back."""

    def __init__(self):
        super().__init__()
        self.calls = []

    name = "memory"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def values(self, key):
        return [m[key] for _, m in self.calls if key in m]


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3))
        self.micro_losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.micro_losses.append(loss.item())
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # Lightning's documented way to log the gradient norm, here before clipping
        self.log("pre_clip_norm", grad_norm(self, norm_type=2)["grad_2.0_norm_total"], on_step=True, on_epoch=False)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def fit(tmp_path, accumulation):
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8 * accumulation * STEPS, 8, generator=gen),
                                          torch.randint(0, 3, (8 * accumulation * STEPS,), generator=gen))
    model, logger, callback = Net(), MemoryLogger(), GradmedicCallback(every=1, verbose=False)
    before = hook_state(model)
    trainer = L.Trainer(max_steps=STEPS, accumulate_grad_batches=accumulation, gradient_clip_val=CLIP,
                        logger=logger, callbacks=[callback], log_every_n_steps=1, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    return model, before, logger, callback


@pytest.mark.parametrize("accumulation", [1, 2])
def test_lightning_pre_clip_norm_loss_and_loggers(tmp_path, accumulation):
    model, before, logger, callback = fit(tmp_path, accumulation)
    trace = gm.Trace.load(tmp_path / "gradmedic.gmtrace")
    logged_norm = np.array(logger.values("pre_clip_norm"))
    assert len(logged_norm) == STEPS and (logged_norm > 1.5 * CLIP).all()  # clipping acted
    ours = trace.metric("total_grad_norm")[:, trace.layers.index("")]
    np.testing.assert_allclose(ours, logged_norm, rtol=1e-5)
    _, loss = trace.scalar("loss")
    # the mean of training_step's losses over each step's micro-batches (an independent record)
    expected = np.array(model.micro_losses).reshape(STEPS, accumulation).mean(axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    if accumulation == 1:
        np.testing.assert_allclose(loss, logger.values("train_loss"), rtol=1e-6)
    # gradmedic's numbers went through the Trainer's logger
    assert len(logger.values("gradmedic/total_grad_norm")) == STEPS
    np.testing.assert_allclose(logger.values("gradmedic/grad_norm/net.0"),
                               trace.metric("grad_norm")[:, trace.layers.index("net.0")])
    assert hook_state(model) == before
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert callback.result is not None
