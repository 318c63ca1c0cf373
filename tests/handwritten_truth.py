"""Ground truth for the hand-written corpus (tests/handwritten.py), measured without gradmedic: plain
``torch.autograd.grad`` (float64 where a ratio is tiny), the unit shares computed from the activations
directly, healthy twins, and short seeded training runs on a CPU. The figures are copied into each Entry's
``truth``; this script recomputes them (about four minutes on one thread):

    OMP_NUM_THREADS=1 PYTHONPATH=. python -m tests.handwritten_truth [name ...]
"""

from __future__ import annotations

import copy
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import tests.handwritten as H

torch.set_num_threads(1)


def _psnr(mse: float, peak: float = 1.0) -> float:
    return 10 * math.log10(peak ** 2 / mse)


def _fit(model, inputs, targets, loss_fn, steps, lr, params=None):
    losses = H._train(model, inputs, targets, loss_fn, steps, lr=lr, params=params)
    return losses[0], min(losses[-10:]), losses


def _sigmoid_saturated(p: torch.Tensor) -> float:
    """Share of sigmoid outputs whose derivative p(1-p) is below 5% of its peak 1/4 (probes.activations' line)."""
    return float((p * (1 - p) < 0.05 * 0.25).float().mean())


def vae_trained():
    model, x, _ = H.vae()
    torch.manual_seed(1)
    first, _, _ = _fit(model, x, x, H.vae_loss, H.VAE_TRAIN_STEPS, 3e-3)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        recon, mu, logvar = model(x)
        bce = F.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0]
        sat = (recon * (1 - recon) < 0.05 * 0.25)
        right = ((recon > 0.5).float() == x)[sat].float().mean()
        err = (recon - x).abs()
    return (f"loss {first:.1f} -> reconstruction BCE {bce:.2f} nats per 64-pixel sample after {H.VAE_TRAIN_STEPS} "
            f"steps ({float(((recon > 0.5).float() == x).float().mean()):.3f} of pixels right); "
            f"{float(sat.float().mean()):.0%} of "
            f"the decoder's sigmoid outputs are saturated and {float(right):.1%} of those are on the right side: "
            f"dBCE/dlogit = p - x is {float(err[sat].mean()):.1e} there because the pixel is right, not lost")


def retina_head():
    model, x, kw = H.retina_head()
    z = model.cls_logits(model.tower(x)).detach().requires_grad_(True)
    p = torch.sigmoid(z)
    loss = F.binary_cross_entropy(p, kw["targets"])
    (g,) = torch.autograd.grad(loss, z)
    expected = (p.detach() - kw["targets"]) / p.numel()
    first, last, _ = _fit(model, x, kw["targets"], F.binary_cross_entropy, 100, 1e-3)
    return (f"{_sigmoid_saturated(p.detach()):.0%} of outputs saturated (p = {PRIOR:.2f}); autograd dL/dlogit equals "
            f"(p - y)/N to {float((g - expected).norm() / expected.norm()):.0e}: the BCE cancels sigmoid' exactly, no "
            f"gradient lost; BCE {first:.3f} -> {last:.3f} in 100 Adam steps")


PRIOR = H.PRIOR


def _seq2seq_accuracy(model, length: int) -> float:
    (src, tgt_in), tgt = H._reverse_task(seed=99, n=64, length=length)
    with torch.no_grad():
        return float((model(src, tgt_in).argmax(1) == tgt).float().mean())


def seq2seq(cell: str = "gru", length: int = 12, steps: int = H.SEQ2SEQ_TRAIN_STEPS):
    model, _, _ = H.seq2seq(cell, length)()
    before = _seq2seq_accuracy(model, length)
    torch.manual_seed(1)
    H.train_seq2seq(model, steps=steps, length=length)
    return (f"{cell.upper()} reversal of {length} tokens: held-out token accuracy {before:.2f} -> "
            f"{_seq2seq_accuracy(model, length):.2f} after {steps} Adam(1e-2) steps on fresh batches")


def _encoder_horizon(model, length: int) -> float:
    """|d h_T / d x_1| / |d h_T / d x_T| of the encoder alone (float64): its last output's horizon."""
    m = copy.deepcopy(model).double()
    (src, _), _ = H._reverse_task(length=length)
    emb = m.src_embed(src).detach().requires_grad_(True)
    out = m.encoder(emb)[0]
    (g,) = torch.autograd.grad(out[:, -1].sum(), emb)
    return float(g[:, 0].norm() / g[:, -1].norm())


def seq2seq_horizon(cell: str = "lstm", length: int = 20):
    model, _, _ = H.seq2seq(cell, length)()
    h0 = _encoder_horizon(model, length)
    text = seq2seq(cell, length, steps=300)
    return f"encoder's last-output horizon at init {h0:.1e} over {length} steps; {text}"


def lstm_lm_long():
    """The LSTM LM at its init learns a dependency longer than its init-time horizon: 20 random tokens, then the
    same 20 again (the second half is predictable only from 20 steps back)."""
    torch.manual_seed(0)
    model = H.LSTMLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    half, vocab = 20, 64

    def batch(seed):
        g = H._gen(seed)
        first = torch.randint(0, vocab, (32, half), generator=g)
        seq = torch.cat([first, first, first[:, :1]], 1)
        return seq[:, :-1], seq[:, 1:]

    def second_half_acc(seed=99):
        x, y = batch(seed)
        with torch.no_grad():
            return float((model(x).argmax(1)[:, half:] == y[:, half:]).float().mean())

    before = second_half_acc()
    for step in range(400):
        x, y = batch(1000 + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return (f"copy task with a {half}-step dependency (T={2 * half}): held-out accuracy on the second half "
            f"{before:.2f} -> {second_half_acc():.2f} after 400 Adam(1e-2) steps")


def nerf():
    model, inputs, kw = H.nerf()
    torch.manual_seed(1)
    first, last, _ = _fit(model, inputs, kw["targets"], F.mse_loss, 300, 5e-3)
    m = copy.deepcopy(model)
    model, inputs, kw = H.nerf()
    names = ["pts.0", "pts.3", "density", "feature", "view", "rgb"]
    mods = dict(model.named_modules())
    params = [mods[n].weight for n in names]
    loss = F.mse_loss(model(*inputs), kw["targets"])
    grads = torch.autograd.grad(loss, params)
    gw = {n: float(g.norm() / p.norm()) for n, g, p in zip(names, grads, params, strict=True)}
    del m
    return (f"rendered-colour MSE {first:.3f} -> {last:.4f} (PSNR {_psnr(last):.1f} dB) in 300 Adam(5e-3) steps; "
            "grad/weight at init " + ", ".join(f"{k} {v:.1e}" for k, v in gw.items()) +
            ": the density head and the colour branch are parallel heads, not a chain")


def siren_pair():
    out = []
    for published in (True, False):
        model, coords, kw = H.siren(published)()
        m64 = copy.deepcopy(model).double()
        layers = [m64.net[i].linear for i in range(len(m64.net))] + [m64.out]
        loss = F.mse_loss(m64(coords.double()), kw["targets"].double())
        grads = torch.autograd.grad(loss, [p for lin in layers for p in (lin.weight, lin.bias)])
        gw = [float(torch.cat([grads[2 * i].flatten(), grads[2 * i + 1].flatten()]).norm() /
                    torch.cat([lin.weight.flatten(), lin.bias.flatten()]).norm()) for i, lin in enumerate(layers)]
        torch.manual_seed(1)
        first, last, _ = _fit(model, coords, kw["targets"], F.mse_loss, H.SIREN_TRAIN_STEPS, 1e-4)
        out.append(f"{'published' if published else 'default Linear'} init: grad/weight by depth "
                   f"{' '.join(f'{v:.1e}' for v in gw)}; MSE {first:.3f} -> {last:.5f} (PSNR {_psnr(last):.1f} dB) in "
                   f"{H.SIREN_TRAIN_STEPS} Adam(1e-4) steps")
    return "; ".join(out)


def realnvp_trained():
    model, x, _ = H.realnvp()
    torch.manual_seed(1)
    first, last, _ = _fit(model, x, None, H.flow_nll, H.REALNVP_TRAIN_STEPS, 3e-3)
    # units dead on every point of the data set, and the tanh-bounded scales' saturation, from the activations
    dead, sat, below = {}, {}, []
    h = x
    with torch.no_grad():
        for i, c in enumerate(model.couplings):
            xm = h * c.mask
            a1 = c.s[1](c.s[0](xm))
            pre2 = c.s[2](a1)
            a2 = c.s[3](pre2)
            if i == 1:  # how far below zero the dead units of couplings.1.s.3 lie, in their own stds over the data
                top, std = pre2.max(0).values, pre2.std(0)
                below = sorted(float(v) for v in (-top / std.clamp(min=1e-12))[top <= 0])
            dead[i] = (float((a1.max(0).values <= 0).float().mean()), float((a2.max(0).values <= 0).float().mean()))
            t = c.s[5](c.s[4](a2))[:, (1 - c.mask).bool()]
            sat[i] = float((1 - t ** 2 < 0.05).float().mean())
            h, _ = c(h)
    nll_gauss = float(H.flow_nll(((x - x.mean(0)) / x.std(0), torch.zeros(len(x)))) + torch.log(x.std(0)).sum())
    return (f"NLL {first:.2f} -> {last:.2f} nats in {H.REALNVP_TRAIN_STEPS} steps (a fitted Gaussian: "
            f"{nll_gauss:.2f}); "
            f"ReLU units dead on all {x.shape[0]} points per coupling (s-net layers 1, 2): "
            + ", ".join(f"{a:.0%}/{b:.0%}" for a, b in dead.values()) +
            "; tanh scale outputs saturated: " + ", ".join(f"{v:.0%}" for v in sat.values()) +
            f"; couplings.1.s.3's dead units lie {below[0]:.2f}-{below[-1]:.1f} own stds below zero (median "
            f"{below[len(below) // 2]:.1f}; {sum(b > 1 for b in below)} of 64 lie beyond one own std)")


def regression_trained():
    model, x, kw = H.regression()
    torch.manual_seed(1)
    first, last, _ = _fit(model, x, kw["targets"], F.mse_loss, H.REGRESSION_TRAIN_STEPS, 3e-3)
    var = float(kw["targets"].var())
    return (f"MSE {first:.3f} -> {last:.4f} in {H.REGRESSION_TRAIN_STEPS} Adam(3e-3) steps: R^2 "
            f"{1 - last / var:.3f}; the 0.01-gain head makes the output 0.01x at init, by design (policy-head init)")


def gan():
    model, z, kw = H.gan_generator_step()()
    opt = kw["optimizer"]
    d_before = [p.detach().clone() for p in model.D.parameters()]
    logits0 = float(model(z).mean())
    for _ in range(200):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(z), kw["targets"]).backward()
        opt.step()
    moved = max(float((p - q).abs().max()) for p, q in zip(model.D.parameters(), d_before, strict=True))
    text = (f"generator-only Adam(2e-4): mean D logit on G(z) {logits0:.3f} -> {float(model(z).mean()):.3f} in 200 "
            f"steps (G learns against the fixed D); D's largest change {moved:.0e}: D is held by no optimizer here")
    model, z, kw = H.gan_generator_step(H.GAN_STALLED_LR)()
    opt = kw["optimizer"]
    before = [p.detach().clone() for p in model.G.parameters()]
    for _ in range(5):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(z), kw["targets"]).backward()
        opt.step()
    rel = [float((p - q).norm() / q.norm()) for p, q in zip(model.G.parameters(), before, strict=True)]
    return text + (f"; at lr {H.GAN_STALLED_LR:.0e} G's weights move {min(rel):.0e}-{max(rel):.0e} of their size per "
                   "5 steps")


def saturated_sigmoid():
    out = []
    for loss in ("mse", "bce"):
        model, x, kw = H.saturated_sigmoid_head(loss)()
        y = kw["targets"]
        z = model[2](model[1](model[0](x))).detach().requires_grad_(True)
        p = torch.sigmoid(z)
        (g,) = torch.autograd.grad(kw["loss_fn"](p, y), z)
        wrong = (p.detach() > 0.5).float() != y
        sat = p.detach() * (1 - p.detach()) < 0.05 * 0.25
        acc0 = float((~wrong).float().mean())
        torch.manual_seed(1)
        H._train(model, x, y, kw["loss_fn"], 300, lr=1e-3)
        with torch.no_grad():
            acc = float(((model(x) > 0.5).float() == y).float().mean())
        out.append(f"{loss.upper()}: {float(sat.float().mean()):.0%} saturated, "
                   f"{float((sat & wrong).float().mean()):.0%} "
                   f"saturated and wrong; mean |dL/dlogit| on those {float(g[sat & wrong].abs().mean() * len(y)):.1e} "
                   f"(x N); accuracy {acc0:.2f} -> {acc:.2f} in 300 Adam(1e-3) steps")
    return "; ".join(out)


def attention_encoder():
    model, x, kw = H.attention_over_vanishing_encoder()()
    m64 = copy.deepcopy(model).double()
    outs = {}
    hooks = [m64.encoder[i].register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
             for i in range(0, len(m64.encoder), 2)]
    loss = F.cross_entropy(m64(x.double()), kw["targets"])
    keys = sorted(outs)
    grads = torch.autograd.grad(loss, [outs[i] for i in keys] + [m64.encoder[0].weight, m64.encoder[-2].weight,
                                                                  m64.attention.v.weight, m64.head.weight])
    for h in hooks:
        h.remove()
    sig = float(grads[0].norm() / grads[len(keys) - 1].norm())
    w0, wl, v, head = grads[len(keys):]
    gw0 = float(w0.norm() / m64.encoder[0].weight.norm())
    gwl = float(wl.norm() / m64.encoder[-2].weight.norm())
    gwv, gwh = float(v.norm() / m64.attention.v.weight.norm()), float(head.norm() / m64.head.weight.norm())
    return (f"float64 autograd: |dL/d(encoder.0 out)| / |dL/d(encoder.{keys[-1]} out)| = {sig:.1e} through 10 "
            f"sigmoid layers; grad/weight encoder.0 {gw0:.1e}, encoder.{len(m64.encoder) - 2} {gwl:.1e} (ratio "
            f"{gw0 / gwl:.1e}), attention.v {gwv:.1e}, head {gwh:.1e}: geometric mean of the two ratios "
            f"{math.sqrt(sig * gw0 / gwl):.1e}")


def gru_horizon():
    out = []
    for forgetful in (True, False):
        model, x, _ = H.gru_last_output(forgetful)()
        m64 = copy.deepcopy(model).double()
        xx = x.double().requires_grad_(True)
        (g,) = torch.autograd.grad(m64(xx).sum(), xx)
        out.append(f"{'forgetful' if forgetful else 'default'} GRU: |d out / d x_1| / |d out / d x_T| = "
                   f"{float(g[:, 0].norm() / g[:, -1].norm()):.1e} (float64)")
    return "; ".join(out)


def dead_relu():
    model, x, _ = H.mostly_dead_relu()
    with torch.no_grad():
        pre = model[2](model[1](model[0](x)))
    top, std = pre.max(0).values, pre.std(0)
    dead = top <= 0
    below = (-top / std)[dead]
    return (f"{float(dead.float().mean()):.1%} of layer 2's units ({int(dead.sum())} of 64) are <= 0 on every one of "
            f"the {x.shape[0]} inputs of the data set, their largest pre-activation {float(below.min()):.1f}-"
            f"{float(below.max()):.1f} of their own stds below zero")


def tiny_graph():
    out = []
    for scale in (H.TINY_GRAPH_SCALE, 1.0):
        model, (x, edges), kw = H.tiny_graph_net(scale=scale)()
        hs = []
        m64 = copy.deepcopy(model).double()
        h = x.double()
        for layer in m64.layers:
            h = layer(h, edges)
            hs.append(h)
        loss = F.cross_entropy(m64.head(h), kw["targets"])
        ws = [p for layer in m64.layers for p in layer.parameters()]
        grads = torch.autograd.grad(loss, ws + hs)
        gw = [float(g.norm() / w.norm()) for g, w in zip(grads[:len(ws)], ws, strict=True)]
        sig = float(grads[len(ws)].norm() / grads[-1].norm())
        torch.manual_seed(1)
        first, last, _ = _fit(model, (x, edges), kw["targets"], F.cross_entropy, 300, 1e-3)
        out.append(f"weights x{scale:g}: grad/weight {min(gw):.0e}..{max(gw):.0e} in every layer, signal "
                   f"first/last block {sig:.0e}; cross-entropy {first:.3f} -> {last:.3f} in 300 Adam(1e-3) steps")
    return "; ".join(out) + f" (chance: ln 4 = {math.log(4):.3f})"


def head_bias():
    out = []
    for depth, act in ((4, nn.ReLU), (10, nn.Sigmoid)):
        model, x, kw = H.head_bias_mlp(depth, act)()
        lins = [m for m in model if isinstance(m, nn.Linear)]
        torch.manual_seed(1)
        # grad/weight of the first and last hidden Linear after 5 Adam steps (float64), as the check reads them
        H._train(model, x, kw["targets"], F.cross_entropy, 5, lr=1e-3)
        m64 = copy.deepcopy(model).double()
        l64 = [m for m in m64 if isinstance(m, nn.Linear)]
        loss = F.cross_entropy(m64(x.double()), kw["targets"])
        g0, gl, gb = torch.autograd.grad(loss, [l64[0].weight, l64[-1].weight, m64[-1].bias])
        ratio = float(g0.norm() / l64[0].weight.norm()) / float(gl.norm() / l64[-1].weight.norm())
        head = float(gb.norm() / m64[-1].bias.norm())
        first, last, _ = _fit(model, x, kw["targets"], F.cross_entropy, 200, 1e-3)
        del lins
        out.append(f"{depth} {act.__name__} layers: after 5 Adam steps grad/weight first/last hidden Linear "
                   f"{ratio:.1e} "
                   f"(float64), the head's own bias {head:.1e}; cross-entropy {first:.2f} -> {last:.3f} in 200 more "
                   "steps")
    return "; ".join(out)


def deep_transformers(steps: int = 150):
    out = []
    for norm_first in (True, False):
        model, x, kw = H.deep_transformer(norm_first)()
        torch.manual_seed(1)
        first, last, losses = _fit(model, x, kw["targets"], F.cross_entropy, steps, 1e-3)
        out.append(f"{'pre' if norm_first else 'post'}-LN: cross-entropy {first:.2f} -> {last:.3f} (step 25: "
                   f"{losses[24]:.2f}, step 100: {losses[99]:.2f})")
    head = f"width {H.DEEP_WIDTH}, 24 layers, Adam(1e-3), no warmup, {steps} steps: "
    return head + "; ".join(out) + f" (ln 64 = {math.log(64):.2f})"


def healthy_fits():
    """Short fits of healthy entries at init: they train."""
    out = []
    for name, build, steps, lr in (("unet", H.unet_diffusion, 100, 1e-3), ("densenet", H.densenet, 100, 1e-3),
                                   ("wavenet", H.wavenet, 100, 3e-3), ("graph", H.graph_net, 200, 1e-2)):
        model, inputs, kw = build()
        loss_fn = kw.get("loss_fn", F.cross_entropy)
        torch.manual_seed(1)
        first, last, _ = _fit(model, inputs, kw["targets"], loss_fn, steps, lr)
        out.append(f"{name} {first:.3f} -> {last:.3f} ({steps} steps)")
    return "; ".join(out)


def exploding_regressor():
    model, x, kw = H.exploding_regressor()
    m64 = copy.deepcopy(model).double()
    lins = [m for m in m64 if isinstance(m, nn.Linear)]
    loss = F.mse_loss(m64(x.double()), kw["targets"].double())
    grads = torch.autograd.grad(loss, [lin.weight for lin in lins])
    gw = [float(g.norm() / lin.weight.norm()) for g, lin in zip(grads, lins, strict=True)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(model(x), kw["targets"])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return (f"grad/weight by depth {' '.join(f'{v:.0e}' for v in gw)} (float64); SGD(1e-2) loss "
            f"{losses[0]:.1e} -> {losses[1]:.1e} -> {losses[-1]:.1e} in 20 steps")


MEASURES = {f.__name__: f for f in (vae_trained, retina_head, seq2seq, seq2seq_horizon, lstm_lm_long, nerf,
                                    siren_pair, realnvp_trained, regression_trained, gan, saturated_sigmoid,
                                    attention_encoder, gru_horizon, dead_relu, tiny_graph, head_bias,
                                    deep_transformers, healthy_fits, exploding_regressor)}


def main(names: list[str]) -> None:
    for name in names or list(MEASURES):
        start = time.perf_counter()
        text = MEASURES[name]()
        print(f"{name} ({time.perf_counter() - start:.1f} s): {text}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
