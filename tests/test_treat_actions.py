"""The remedy actions one by one: registry, transformer actions (pre-LN, LayerScale, DeepNorm), chrono biases."""

import copy

import pytest
import torch
from torch import nn

from gradmedic.diagnosis import REMEDIES
from gradmedic.remedies.actions import ACTIONS, TIERS, Patient
from gradmedic.remedies.init import chrono_bias_
from gradmedic.remedies.surgery import LayerScale


def encoder(layers: int = 6, norm_first: bool = False, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def test_every_action_is_a_known_remedy_with_a_tier():
    assert set(ACTIONS) <= set(REMEDIES)
    for rid, act in ACTIONS.items():
        assert act.tier in TIERS.values() and act.on in ("model", "recipe")
        assert (act.on == "recipe") == (REMEDIES[rid].acts_on == "training"), rid
    # the transformer remedies of the diagnosis are actions
    assert {"pre_ln", "layerscale", "deepnorm", "lr_warmup"} <= set(ACTIONS)


def test_pre_ln_moves_the_norms_and_adds_a_final_one():
    model = encoder()
    patient = Patient(model, trained=False)
    text = ACTIONS["pre_ln"].apply(patient)
    assert all(layer.norm_first for layer in model.layers) and isinstance(model.norm, nn.LayerNorm)
    assert "6 Transformer layer(s)" in text and "1 final LayerNorm" in text
    out = model(torch.randn(2, 5, 16))
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
    with pytest.raises(Exception, match="post-LN"):
        ACTIONS["pre_ln"].apply(Patient(model, trained=False))  # nothing left to move


@pytest.mark.parametrize("trained,init", [(True, 1.0), (False, 0.1)])
def test_layerscale_starts_at_the_identity_on_trained_weights(trained, init):
    model = encoder().eval()
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        before = model(x)
    text = ACTIONS["layerscale"].apply(Patient(model, trained=trained))
    scales = [m for m in model.modules() if isinstance(m, LayerScale)]
    assert len(scales) == 12 and all(bool((s.gamma == init).all()) for s in scales)
    assert "12 residual branches" in text
    with torch.no_grad():
        after = model(x)
    if trained:
        assert torch.equal(after, before)  # bit for bit: multiplying by 1.0
    else:
        assert not torch.allclose(after, before)


def test_deepnorm_constants_by_hand():
    model = encoder(layers=6)
    original = copy.deepcopy(model)
    ACTIONS["deepnorm"].apply(Patient(model, trained=False))
    alpha, beta = 12 ** 0.25, 48 ** -0.25  # Wang et al. 2022, encoder of N = 6: (2N)^(1/4), (8N)^(-1/4)
    for new, old in zip(model.layers, original.layers, strict=True):
        for name in ("linear1", "linear2"):
            torch.testing.assert_close(getattr(new, name).weight, getattr(old, name).weight * beta)
        torch.testing.assert_close(new.self_attn.out_proj.weight, old.self_attn.out_proj.weight * beta)
        q_new, v_new = new.self_attn.in_proj_weight[:16], new.self_attn.in_proj_weight[32:]
        torch.testing.assert_close(q_new, old.self_attn.in_proj_weight[:16])  # queries and keys untouched
        torch.testing.assert_close(v_new, old.self_attn.in_proj_weight[32:] * beta)
        gammas = [m.gamma for m in new.modules() if isinstance(m, LayerScale)]
        assert len(gammas) == 2 and all(not g.requires_grad for g in gammas)
        torch.testing.assert_close(gammas[0], torch.full((16,), 1 / alpha))


def test_layerscale_on_branch_equals_deepnorm_residual_weight():
    """LN(alpha x + f) = LN(x + f / alpha) up to LayerNorm's eps: the identity DeepNorm is written with."""
    torch.manual_seed(0)
    x, f = torch.randn(4, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64)
    norm = nn.LayerNorm(16, eps=1e-12).double()
    alpha = 3.0
    torch.testing.assert_close(norm(alpha * x + f), norm(x + f / alpha), rtol=1e-9, atol=1e-9)


def test_chrono_biases():
    torch.manual_seed(0)
    lstm = chrono_bias_(nn.LSTM(3, 200, num_layers=2), 60)
    h = 200
    for layer in (0, 1):
        b_ih, b_hh = getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}")
        forget = (b_ih + b_hh).detach()[h:2 * h]
        # one draw per layer: log U(1, 59), split evenly between the two biases
        assert float(forget.min()) >= 0.0 and float(forget.max()) <= torch.log(torch.tensor(59.0)) + 1e-6
        torch.testing.assert_close(b_ih[h:2 * h], b_hh[h:2 * h])
        assert float(forget.std()) > 0.5  # spread over time scales, not one value
    gru = chrono_bias_(nn.GRU(3, 50), 20)
    assert float((gru.bias_ih_l0 + gru.bias_hh_l0).detach()[50:100].min()) >= 0.0
    with pytest.raises(Exception, match="no LSTM/GRU"):
        chrono_bias_(nn.RNN(3, 5), 20)
    with pytest.raises(Exception, match="Argument length"):
        chrono_bias_(nn.LSTM(3, 5), 2)
