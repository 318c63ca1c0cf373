"""A corpus of hand-written torch.nn architectures (issue 28): models as practitioners write them, each at its
usual (published) init, tiny for a CPU, plus a few trained to a good result and the sick twins of the issue's
classes 1-9.

Each entry is an ``Entry``: a name, a factory that returns ``(model, inputs, kwargs for gm.check)`` (kwargs may
hold ``targets``, ``loss_fn`` and ``optimizer``), the verdict expected at init and after ``STEPS`` Adam steps
(``Expect``: healthy, or the kind, severity and layers of a sickness, or "cannot tell at init"), the issue class
it exercises, and ``truth``: how the verdict was established independently of gradmedic (plain
``torch.autograd.grad``, float64, a healthy twin, or a short training run) with the figure measured. The figures
come from ``python -m tests.handwritten_truth`` (tests/handwritten_truth.py), which recomputes them.

``judge(report, expect)`` says whether a report gives the expected verdict; the tests (tests/test_handwritten.py)
and the benchmark (benchmarks/handwritten_corpus.py) share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 5  # gm.check(..., steps=STEPS): the issue's "after 5 Adam steps"


# --- expectations ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expect:
    """A verdict. ``kind`` None: healthy (no warning, no error). Else a finding of ``kind`` at ``severity`` whose
    layers include ``layers`` (the first of them first, when ``first`` is set), and no warning or error naming a
    layer of ``absent``. ``undetermined``: init cannot show the verdict (issue 28 class 9): the report must not be
    the bare "No findings: gradients flow." and must point to what would show it (``steps=`` or the Monitor)."""

    kind: str | None = None
    severity: str | None = None
    layers: tuple[str, ...] = ()
    first: bool = False
    absent: tuple[str, ...] = ()
    undetermined: bool = False

    def __str__(self) -> str:
        if self.undetermined:
            return "cannot tell at init (say steps=/Monitor)"
        if self.kind is None:
            return "healthy"
        where = f" at {', '.join(self.layers)}" if self.layers else ""
        return f"{self.severity}:{self.kind}{where}"


HEALTHY = Expect()
UNDETERMINED = Expect(undetermined=True)


def judge(report, expect: Expect) -> tuple[bool, str]:
    """(right, why not) for a gm.check report against an expected verdict."""
    loud = [f for f in report.findings if f.severity != "info"]
    if expect.undetermined:
        said = [f for f in report.findings if "steps=" in f.message or "Monitor" in f.message]
        if said and "No findings: gradients flow." not in str(report):
            return True, ""
        return False, "says nothing about what init cannot show (no finding points to steps= or the Monitor)"
    if expect.kind is None:
        if not loud:
            return True, ""
        return False, "; ".join(f"{f.severity}:{f.kind} at {f.layers[:3]}" for f in loud)
    found = report.of_kind(expect.kind)
    if not found:
        return False, f"no {expect.kind} finding"
    best = found[0]
    if best.severity != expect.severity:
        return False, f"{expect.kind} is {best.severity}, expected {expect.severity}"
    missing = [k for k in expect.layers if k not in best.layers]
    if missing:
        return False, f"{expect.kind} misses layers {missing} (names {best.layers[:4]})"
    if expect.first and expect.layers and best.layers[0] != expect.layers[0]:
        return False, f"{expect.kind} names {best.layers[0]} first, expected {expect.layers[0]}"
    wrong = [k for f in loud for k in f.layers if k in expect.absent]
    if wrong:
        return False, f"also flags {sorted(set(wrong))[:3]}"
    return True, ""


def describe(report) -> str:
    """What a report says, in one short line: the warnings and errors with their first layers."""
    loud = [f for f in report.findings if f.severity != "info"]
    if not loud:
        return "healthy"
    return "; ".join(f"{f.severity}:{f.kind} [{', '.join(f.layers[:2])}{', ...' if len(f.layers) > 2 else ''}]"
                     for f in loud)


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[[], tuple[nn.Module, Any, dict]]
    at_init: Expect = HEALTHY
    after_steps: Expect = HEALTHY
    issue_class: int | None = None  # the class of issue 28 this entry exercises
    truth: str = ""  # how the verdict was measured without gradmedic, with the figure
    trained: bool = False  # built by training to a good result (the figure in ``truth``)
    tags: tuple[str, ...] = field(default_factory=tuple)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- 1. diffusion U-Net (GroupNorm, SiLU, time embedding, zero-initialised output convs) -----------------
def zero_module(module: nn.Module) -> nn.Module:
    """DDPM / improved-diffusion: the last conv of each residual block and the output conv start at zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, zero: bool = True):
        super().__init__()
        self.norm1 = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(4, cout)
        conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv2 = zero_module(conv2) if zero else conv2
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class TinyUNet(nn.Module):
    def __init__(self, ch: int = 16, tdim: int = 32, zero: bool = True):
        super().__init__()
        self.tdim = tdim
        self.time = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.conv_in = nn.Conv2d(1, ch, 3, padding=1)
        self.down1 = ResBlock(ch, ch, tdim, zero)
        self.downsample = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.down2 = ResBlock(ch, 2 * ch, tdim, zero)
        self.mid = ResBlock(2 * ch, 2 * ch, tdim, zero)
        self.up2 = ResBlock(4 * ch, ch, tdim, zero)
        self.upsample = nn.Conv2d(ch, ch, 3, padding=1)
        self.up1 = ResBlock(2 * ch, ch, tdim, zero)
        self.norm_out = nn.GroupNorm(4, ch)
        conv_out = nn.Conv2d(ch, 1, 3, padding=1)
        self.conv_out = zero_module(conv_out) if zero else conv_out

    def forward(self, x, t):
        temb = self.time(timestep_embedding(t, self.tdim))
        h0 = self.conv_in(x)
        h1 = self.down1(h0, temb)
        h2 = self.down2(self.downsample(h1), temb)
        h = self.mid(h2, temb)
        h = self.up2(torch.cat([h, h2], 1), temb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], 1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _diffusion_batch(seed: int = 0, n: int = 4, size: int = 8):
    g = _gen(seed)
    x0 = (torch.rand(n, 1, size, size, generator=g) > 0.5).float() * 2 - 1
    t = torch.randint(0, 1000, (n,), generator=g)
    betas = torch.linspace(1e-4, 0.02, 1000)
    abar = torch.cumprod(1 - betas, 0)[t][:, None, None, None]
    noise = torch.randn(x0.shape, generator=g)
    return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t), noise


def unet_diffusion():
    torch.manual_seed(0)
    inputs, noise = _diffusion_batch()
    return TinyUNet(), inputs, {"targets": noise, "loss_fn": F.mse_loss}


# --- 2. DenseNet (BN-ReLU-Conv, concatenation, transitions; torchvision's init) ----------------------------
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(4 * growth), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        h = self.conv1(F.relu(self.norm1(x)))
        return torch.cat([x, self.conv2(F.relu(self.norm2(h)))], 1)


class TinyDenseNet(nn.Module):
    def __init__(self, growth: int = 8, layers: int = 4, classes: int = 10):
        super().__init__()
        ch = 2 * growth
        mods: list[nn.Module] = [nn.Conv2d(3, ch, 3, padding=1, bias=False)]
        for stage in range(2):
            for _ in range(layers):
                mods.append(DenseLayer(ch, growth))
                ch += growth
            if stage == 0:
                mods += [nn.BatchNorm2d(ch), nn.ReLU(), nn.Conv2d(ch, ch // 2, 1, bias=False), nn.AvgPool2d(2)]
                ch //= 2
        mods += [nn.BatchNorm2d(ch), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*mods)
        self.classifier = nn.Linear(ch, classes)
        for m in self.modules():  # torchvision.models.densenet
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        return self.classifier(self.features(x))


def _images(seed: int = 0, n: int = 16, size: int = 16, classes: int = 10):
    g = _gen(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def densenet():
    torch.manual_seed(0)
    x, y = _images()
    return TinyDenseNet(), x, {"targets": y}


# --- 3. WaveNet gated units (dilated causal conv, tanh * sigmoid, residual and skip 1x1) -------------------
class GatedResidual(nn.Module):
    def __init__(self, ch: int, skip: int, dilation: int, last: bool = False):
        super().__init__()
        self.dilation = dilation
        self.filter = nn.Conv1d(ch, ch, 2, dilation=dilation)
        self.gate = nn.Conv1d(ch, ch, 2, dilation=dilation)
        self.res = None if last else nn.Conv1d(ch, ch, 1)  # the last layer's residual output would go unused
        self.skip = nn.Conv1d(ch, skip, 1)

    def forward(self, x):
        h = F.pad(x, (self.dilation, 0))  # causal
        z = torch.tanh(self.filter(h)) * torch.sigmoid(self.gate(h))
        return (x if self.res is None else x + self.res(z)), self.skip(z)


class TinyWaveNet(nn.Module):
    def __init__(self, classes: int = 16, ch: int = 16, skip: int = 32, dilations=(1, 2, 4, 8, 1, 2, 4, 8)):
        super().__init__()
        self.classes = classes
        self.causal = nn.Conv1d(classes, ch, 2)
        self.layers = nn.ModuleList(GatedResidual(ch, skip, d, last=i == len(dilations) - 1)
                                    for i, d in enumerate(dilations))
        self.out1, self.out2 = nn.Conv1d(skip, skip, 1), nn.Conv1d(skip, classes, 1)

    def forward(self, ids):  # (B, T) quantised samples -> (B, classes, T) logits for the next sample
        x = F.one_hot(ids, self.classes).float().transpose(1, 2)
        h = self.causal(F.pad(x, (1, 0)))
        skips = 0
        for layer in self.layers:
            h, s = layer(h)
            skips = skips + s
        return self.out2(F.relu(self.out1(F.relu(skips))))


def _mu_law_wave(seed: int = 0, n: int = 4, length: int = 64, classes: int = 16):
    g = _gen(seed)
    t = torch.arange(length + 1).float()
    freq = 0.05 + 0.2 * torch.rand(n, 1, generator=g)
    wave = 0.8 * torch.sin(2 * math.pi * freq * t) + 0.05 * torch.randn(n, length + 1, generator=g)
    mu = classes - 1
    q = torch.sign(wave) * torch.log1p(mu * wave.abs()) / math.log1p(mu)
    ids = ((q + 1) / 2 * mu + 0.5).long().clamp(0, mu)
    return ids[:, :-1], ids[:, 1:]


def wavenet():
    torch.manual_seed(0)
    x, y = _mu_law_wave()
    return TinyWaveNet(), x, {"targets": y}


# --- 4. TCN (Bai et al. 2018: weight-normed dilated convs, ReLU, residual; their N(0, 0.01) init) ----------
class TemporalBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int, k: int = 3):
        super().__init__()
        wn = nn.utils.parametrizations.weight_norm
        self.pad = (k - 1) * dilation
        self.conv1 = wn(nn.Conv1d(cin, cout, k, dilation=dilation))
        self.conv2 = wn(nn.Conv1d(cout, cout, k, dilation=dilation))
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None
        # locuslab/TCN's init_weights writes normal_(0, 0.01) into conv.weight.data, which weight_norm recomputes
        # from g and v at the next forward: only the downsample keeps it (the convs keep PyTorch's default)
        if self.downsample is not None:
            nn.init.normal_(self.downsample.weight, 0, 0.01)

    def forward(self, x):
        h = F.relu(self.conv1(F.pad(x, (self.pad, 0))))
        h = F.relu(self.conv2(F.pad(h, (self.pad, 0))))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(h + res)


class TinyTCN(nn.Module):
    def __init__(self, cin: int = 1, ch: int = 16, levels: int = 4, classes: int = 10):
        super().__init__()
        self.blocks = nn.Sequential(*(TemporalBlock(cin if i == 0 else ch, ch, 2 ** i) for i in range(levels)))
        self.head = nn.Linear(ch, classes)

    def forward(self, x):  # (B, 1, T): sequential-MNIST style, classify from the last step
        return self.head(self.blocks(x)[:, :, -1])


def tcn():
    torch.manual_seed(0)
    g = _gen(0)
    return TinyTCN(), torch.randn(16, 1, 64, generator=g), {"targets": torch.randint(0, 10, (16,), generator=g)}


# --- 5. Highway network (Srivastava et al. 2015: transform-gate bias -2) ----------------------------------
class HighwayLayer(nn.Module):
    def __init__(self, d: int, gate_bias: float = -2.0):
        super().__init__()
        self.h, self.t = nn.Linear(d, d), nn.Linear(d, d)
        nn.init.constant_(self.t.bias, gate_bias)

    def forward(self, x):
        t = torch.sigmoid(self.t(x))
        return F.relu(self.h(x)) * t + x * (1 - t)


def highway(depth: int = 10):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), *(HighwayLayer(32) for _ in range(depth)), nn.Linear(32, 4))
        g = _gen(0)
        x = torch.randn(32, 16, generator=g)
        return model, x, {"targets": torch.randint(0, 4, (32,), generator=g)}
    return build


# --- 6. MLP-Mixer ------------------------------------------------------------------------------------------
class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.channel_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):  # (B, tokens, d)
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class TinyMixer(nn.Module):
    def __init__(self, patch: int = 4, size: int = 16, d: int = 32, depth: int = 4, classes: int = 10):
        super().__init__()
        tokens = (size // patch) ** 2
        self.stem = nn.Conv2d(3, d, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, d) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(h)).mean(1))


def mlp_mixer():
    torch.manual_seed(0)
    x, y = _images()
    return TinyMixer(), x, {"targets": y}


# --- 7. Conformer (macaron FFNs, MHSA, conv module with GLU, depthwise conv, BatchNorm, SiLU) --------------
class FeedForward(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))

    def forward(self, x):
        return self.net(x)


class ConvModule(nn.Module):
    def __init__(self, d: int, k: int = 7):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.pointwise1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
        self.bn = nn.BatchNorm1d(d)
        self.pointwise2 = nn.Conv1d(d, d, 1)

    def forward(self, x):  # (B, T, d)
        h = F.glu(self.pointwise1(self.norm(x).transpose(1, 2)), dim=1)
        h = self.pointwise2(F.silu(self.bn(self.depthwise(h))))
        return h.transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4):
        super().__init__()
        self.ff1, self.ff2 = FeedForward(d), FeedForward(d)
        self.attn_norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.conv = ConvModule(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class TinyConformer(nn.Module):
    def __init__(self, feats: int = 20, d: int = 32, blocks: int = 3, classes: int = 12):
        super().__init__()
        self.proj = nn.Linear(feats, d)
        self.blocks = nn.Sequential(*(ConformerBlock(d) for _ in range(blocks)))
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, T, feats) -> (B, classes, T) frame logits
        return self.head(self.blocks(self.proj(x))).transpose(1, 2)


def conformer():
    torch.manual_seed(0)
    g = _gen(0)
    return (TinyConformer(), torch.randn(4, 24, 20, generator=g),
            {"targets": torch.randint(0, 12, (4, 24), generator=g)})


# --- 8. VAE (sigmoid decoder, binary cross-entropy + KL) ---------------------------------------------------
class VAE(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 64, latent: int = 8):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU())
        self.mu, self.logvar = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d_in), nn.Sigmoid())

    def forward(self, x):
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec(z), mu, logvar


def vae_loss(out, x):
    recon, mu, logvar = out
    bce = F.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0]
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
    return bce + kl


def _binary_patterns(seed: int = 0, n: int = 64, d: int = 64, prototypes: int = 4):
    """Binary 8x8 "digits": a few prototypes with 3% of pixels flipped."""
    g = _gen(seed)
    protos = (torch.rand(prototypes, d, generator=g) > 0.5).float()
    x = protos[torch.randint(0, prototypes, (n,), generator=g)]
    flip = (torch.rand(n, d, generator=g) < 0.03).float()
    return (x + flip) % 2


def vae():
    torch.manual_seed(0)
    x = _binary_patterns()
    return VAE(), x, {"targets": x, "loss_fn": vae_loss}


def _train(model: nn.Module, inputs, targets, loss_fn, steps: int, lr: float = 1e-3, params=None) -> list[float]:
    """A short seeded Adam run; returns the losses."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(*args), targets)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return losses


VAE_TRAIN_STEPS = 400


def vae_trained():
    model, x, kwargs = vae()
    torch.manual_seed(1)
    _train(model, x, x, vae_loss, VAE_TRAIN_STEPS, lr=3e-3)
    return model, x, kwargs


# --- 9. graph network with index_add_ (GraphSAGE-style mean aggregation) -----------------------------------
class SAGELayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.self_lin, self.neigh_lin = nn.Linear(d_in, d_out, bias=bias), nn.Linear(d_in, d_out, bias=False)

    def forward(self, h, edges):
        src, dst = edges
        agg = torch.zeros_like(h).index_add_(0, dst, h[src])
        ones = torch.ones_like(dst, dtype=h.dtype)
        deg = torch.zeros(h.shape[0], device=h.device, dtype=h.dtype).index_add_(0, dst, ones)
        return self.self_lin(h) + self.neigh_lin(agg / deg.clamp(min=1)[:, None])


class GraphNet(nn.Module):
    def __init__(self, d_in: int = 8, d: int = 32, layers: int = 3, classes: int = 4, act: bool = True,
                 bias: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(SAGELayer(d_in if i == 0 else d, d, bias) for i in range(layers))
        self.act = act
        self.head = nn.Linear(d, classes)

    def forward(self, x, edges):
        h = x
        for layer in self.layers:
            h = layer(h, edges)
            h = F.relu(h) if self.act else h
        return self.head(h)


def _graph(seed: int = 0, nodes: int = 48, edges: int = 160, d_in: int = 8, classes: int = 4):
    g = _gen(seed)
    src, dst = torch.randint(0, nodes, (edges,), generator=g), torch.randint(0, nodes, (edges,), generator=g)
    x = torch.randn(nodes, d_in, generator=g)
    y = torch.randint(0, classes, (nodes,), generator=g)
    return x, torch.stack([torch.cat([src, dst]), torch.cat([dst, src])]), y


def graph_net():
    torch.manual_seed(0)
    x, edges, y = _graph()
    return GraphNet(), (x, edges), {"targets": y}


# --- 10-11. GRU / LSTM seq2seq with Bahdanau (additive) attention over the encoder states -------------------
class BahdanauAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.W, self.U, self.v = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False), nn.Linear(d, 1, bias=False)

    def forward(self, query, keys):  # (B, d), (B, T, d)
        scores = self.v(torch.tanh(self.W(query)[:, None] + self.U(keys))).squeeze(-1)
        weights = torch.softmax(scores, dim=-1)
        return torch.bmm(weights[:, None], keys).squeeze(1)


class Seq2Seq(nn.Module):
    """Encoder RNN over the source, a decoder cell with additive attention over every encoder state, teacher
    forcing; logits (B, V, T_out)."""

    def __init__(self, vocab: int = 16, d: int = 32, cell: str = "gru"):
        super().__init__()
        self.cell_kind = cell
        self.src_embed, self.tgt_embed = nn.Embedding(vocab, d), nn.Embedding(vocab, d)
        self.encoder = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](d, d, batch_first=True)
        self.decoder = {"gru": nn.GRUCell, "lstm": nn.LSTMCell}[cell](2 * d, d)
        self.attention = BahdanauAttention(d)
        self.out = nn.Linear(2 * d, vocab)

    def forward(self, src, tgt_in):
        keys, last = self.encoder(self.src_embed(src))
        state = last[0] if self.cell_kind == "gru" else (last[0][0], last[1][0])
        logits = []
        for t in range(tgt_in.shape[1]):
            query = state if self.cell_kind == "gru" else state[0]
            context = self.attention(query, keys)
            step_in = torch.cat([self.tgt_embed(tgt_in[:, t]), context], -1)
            state = self.decoder(step_in, state)
            h = state if self.cell_kind == "gru" else state[0]
            logits.append(self.out(torch.cat([h, context], -1)))
        return torch.stack(logits, 2)


def _reverse_task(seed: int = 0, n: int = 16, length: int = 12, vocab: int = 16):
    """Reverse a sequence of tokens 2..vocab-1 (0 pad, 1 start)."""
    g = _gen(seed)
    src = torch.randint(2, vocab, (n, length), generator=g)
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.ones(n, 1, dtype=torch.long), tgt[:, :-1]], 1)
    return (src, tgt_in), tgt


def seq2seq(cell: str, length: int):
    def build():
        torch.manual_seed(0)
        inputs, tgt = _reverse_task(length=length)
        return Seq2Seq(cell=cell), inputs, {"targets": tgt}
    return build


SEQ2SEQ_TRAIN_STEPS = 200
SEQ2SEQ_LENGTH = 12


def train_seq2seq(model: nn.Module, steps: int = SEQ2SEQ_TRAIN_STEPS, length: int = SEQ2SEQ_LENGTH) -> None:
    """Adam(1e-2) on a fresh batch of the reversal task at every step (seeds 1000 on), so the model learns the
    task rather than a batch."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        (src, tgt_in), tgt = _reverse_task(seed=1000 + step, n=32, length=length)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(src, tgt_in), tgt).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


def seq2seq_trained():
    model, inputs, kwargs = seq2seq("gru", SEQ2SEQ_LENGTH)()
    torch.manual_seed(1)
    train_seq2seq(model)
    return model, inputs, kwargs


# --- 12. Perceiver (latent array, cross-attention to the inputs, latent self-attention) --------------------
class Attention(nn.Module):
    def __init__(self, d_q: int, d_kv: int, d: int = 32, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d_q, d, bias=False), nn.Linear(d_kv, d, bias=False), \
            nn.Linear(d_kv, d, bias=False)
        self.to_out = nn.Linear(d, d_q)

    def forward(self, x, context):
        b = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, x.shape[1], -1))


class PerceiverBlock(nn.Module):
    def __init__(self, d: int, d_kv: int | None = None):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(d), nn.LayerNorm(d_kv or d)
        self.attn = Attention(d, d_kv or d)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, context=None):
        ctx = self.norm_kv(context) if context is not None else self.norm_q(x)
        x = x + self.attn(self.norm_q(x), ctx)
        return x + self.ff(self.norm_ff(x))


class TinyPerceiver(nn.Module):
    def __init__(self, d_in: int = 16, latents: int = 8, d: int = 32, self_blocks: int = 2, classes: int = 10):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, d) * 0.02)
        self.cross = PerceiverBlock(d, d_in)
        self.self_blocks = nn.ModuleList(PerceiverBlock(d) for _ in range(self_blocks))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):  # (B, N, d_in)
        h = self.cross(self.latents.expand(x.shape[0], -1, -1), x)
        for block in self.self_blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


def perceiver():
    torch.manual_seed(0)
    g = _gen(0)
    return TinyPerceiver(), torch.randn(8, 64, 16, generator=g), {"targets": torch.randint(0, 10, (8,), generator=g)}


# --- 13. SIREN (Sitzmann et al. 2020: sine activations, w0 = 30, their init) --------------------------------
class SineLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, first: bool = False, w0: float = 30.0, published_init: bool = True):
        super().__init__()
        self.w0 = w0
        self.linear = nn.Linear(d_in, d_out)
        if published_init:
            bound = 1 / d_in if first else math.sqrt(6 / d_in) / w0
            with torch.no_grad():
                self.linear.weight.uniform_(-bound, bound)

    def forward(self, x):
        return torch.sin(self.w0 * self.linear(x))


class Siren(nn.Module):
    def __init__(self, hidden: int = 64, layers: int = 3, published_init: bool = True):
        super().__init__()
        self.net = nn.Sequential(SineLayer(2, hidden, first=True, published_init=published_init),
                                 *(SineLayer(hidden, hidden, published_init=published_init) for _ in range(layers)))
        self.out = nn.Linear(hidden, 1)
        if published_init:
            bound = math.sqrt(6 / hidden) / 30.0
            with torch.no_grad():
                self.out.weight.uniform_(-bound, bound)

    def forward(self, coords):
        return self.out(self.net(coords))


def _image_fit(size: int = 24):
    """Coordinates in [-1, 1]^2 and a smooth test image (a few sinusoids and a disc)."""
    lin = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    img = 0.5 * torch.sin(3 * xx) * torch.cos(2 * yy) + ((xx ** 2 + yy ** 2) < 0.3).float() * 0.5
    return torch.stack([xx, yy], -1).reshape(-1, 2), img.reshape(-1, 1)


def siren(published_init: bool = True):
    def build():
        torch.manual_seed(0)
        coords, img = _image_fit()
        return Siren(published_init=published_init), coords, {"targets": img}
    return build


SIREN_TRAIN_STEPS = 200


def siren_trained():
    model, coords, kwargs = siren()()
    torch.manual_seed(1)
    _train(model, coords, kwargs["targets"], F.mse_loss, SIREN_TRAIN_STEPS, lr=1e-4)
    return model, coords, kwargs


# --- 14. NeRF MLP (positional encoding, skip concat, density head, colour head, volume rendering) ------------
def positional_encoding(x: torch.Tensor, bands: int) -> torch.Tensor:
    freqs = 2.0 ** torch.arange(bands, dtype=x.dtype) * math.pi
    angles = x[..., None] * freqs
    return torch.cat([x, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], -1)


class NeRF(nn.Module):
    def __init__(self, bands: int = 6, view_bands: int = 2, d: int = 64):
        super().__init__()
        self.bands, self.view_bands = bands, view_bands
        d_pos, d_view = 3 + 6 * bands, 3 + 6 * view_bands
        self.pts = nn.ModuleList([nn.Linear(d_pos, d), nn.Linear(d, d), nn.Linear(d + d_pos, d), nn.Linear(d, d)])
        self.density = nn.Linear(d, 1)
        self.feature = nn.Linear(d, d)
        self.view = nn.Linear(d + d_view, d // 2)
        self.rgb = nn.Linear(d // 2, 3)

    def forward(self, points, dirs, deltas):  # (R, S, 3), (R, 3), (R, S): colour (R, 3) by alpha compositing
        enc = positional_encoding(points, self.bands)
        h = enc
        for i, layer in enumerate(self.pts):
            h = F.relu(layer(torch.cat([h, enc], -1) if i == 2 else h))
        sigma = F.relu(self.density(h)).squeeze(-1)
        view = positional_encoding(dirs, self.view_bands)[:, None].expand(-1, h.shape[1], -1)
        rgb = torch.sigmoid(self.rgb(F.relu(self.view(torch.cat([self.feature(h), view], -1)))))
        alpha = 1 - torch.exp(-sigma * deltas)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1] + 1e-10], 1), 1)
        weights = alpha * trans
        return (weights[..., None] * rgb).sum(1)


def _rays(seed: int = 0, rays: int = 32, samples: int = 16):
    """Rays through a unit sphere of one colour in front of a white background: target colours from a
    closed form (a ray that hits the sphere sees red, one that misses sees white)."""
    g = _gen(seed)
    origins = torch.tensor([0.0, 0.0, -3.0]).expand(rays, 3)
    dirs = F.normalize(torch.cat([0.5 * (torch.rand(rays, 2, generator=g) - 0.5), torch.ones(rays, 1)], -1), dim=-1)
    t = torch.linspace(1.5, 4.5, samples)
    points = origins[:, None] + dirs[:, None] * t[None, :, None]
    deltas = torch.full((rays, samples), float(t[1] - t[0]))
    miss = (torch.linalg.cross(origins, dirs).norm(dim=-1) > 0.8)
    target = torch.where(miss[:, None], torch.ones(rays, 3), torch.tensor([0.9, 0.1, 0.1]).expand(rays, 3))
    return (points, dirs, deltas), target


def nerf():
    torch.manual_seed(0)
    inputs, target = _rays()
    return NeRF(), inputs, {"targets": target, "loss_fn": F.mse_loss}


# --- 15. RealNVP (affine coupling layers, tanh-bounded scales, Gaussian prior, exact NLL) ------------------
class Coupling(nn.Module):
    def __init__(self, d: int, mask: torch.Tensor, hidden: int = 64):
        super().__init__()
        self.register_buffer("mask", mask)
        self.s = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, d), nn.Tanh())
        self.t = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                               nn.Linear(hidden, d))

    def forward(self, x):  # x -> z direction; returns (z, log|det J|)
        xm = x * self.mask
        s, t = self.s(xm) * (1 - self.mask), self.t(xm) * (1 - self.mask)
        return xm + (1 - self.mask) * (x * torch.exp(s) + t), s.sum(-1)


class RealNVP(nn.Module):
    def __init__(self, d: int = 2, couplings: int = 4):
        super().__init__()
        masks = [torch.tensor([float((i + j) % 2) for j in range(d)]) for i in range(couplings)]
        self.couplings = nn.ModuleList(Coupling(d, m) for m in masks)

    def forward(self, x):
        logdet = torch.zeros(x.shape[0])
        for c in self.couplings:
            x, ld = c(x)
            logdet = logdet + ld
        return x, logdet


def flow_nll(out, _targets=None):
    z, logdet = out
    log_pz = -0.5 * (z ** 2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    return -(log_pz + logdet).mean()


def _two_moons(seed: int = 0, n: int = 128, noise: float = 0.05):
    g = _gen(seed)
    theta = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    return torch.stack([x, y], -1) + noise * torch.randn(n, 2, generator=g)


def realnvp():
    torch.manual_seed(0)
    return RealNVP(), _two_moons(), {"loss_fn": flow_nll}


REALNVP_TRAIN_STEPS = 300


def realnvp_trained():
    model, x, kwargs = realnvp()
    torch.manual_seed(1)
    _train(model, x, None, flow_nll, REALNVP_TRAIN_STEPS, lr=3e-3)
    return model, x, kwargs


# --- 16. hand-written ResNet (BasicBlock, projection shortcuts, Kaiming init) -----------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), blocks: int = 2, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if b == 0 and i > 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet():
    torch.manual_seed(0)
    x, y = _images()
    return ResNet(), x, {"targets": y}


# --- 17. 3-layer regression net with a small output head (the policy-head init: gain 0.01) -------------------
class Regressor(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 64, head_gain: float = 0.01):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(d_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)
        nn.init.orthogonal_(self.out.weight, gain=head_gain)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _regression(seed: int = 0, n: int = 128, d: int = 8):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return x, torch.sin(x @ w / math.sqrt(d)) + 0.5 * x[:, :1] * x[:, 1:2]


def regression():
    torch.manual_seed(0)
    x, y = _regression()
    return Regressor(), x, {"targets": y}


REGRESSION_TRAIN_STEPS = 300


def regression_trained():
    model, x, kwargs = regression()
    torch.manual_seed(1)
    _train(model, x, kwargs["targets"], F.mse_loss, REGRESSION_TRAIN_STEPS, lr=3e-3)
    return model, x, kwargs


# --- 18. GAN generator step: D(G(z)) with an optimizer over G alone (DCGAN's Adam(2e-4, betas 0.5)) ----------
class GeneratorStep(nn.Module):
    def __init__(self, z: int = 8, d: int = 64, x: int = 2):
        super().__init__()
        self.G = nn.Sequential(nn.Linear(z, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, x))
        self.D = nn.Sequential(nn.Linear(x, d), nn.LeakyReLU(0.2), nn.Linear(d, d), nn.LeakyReLU(0.2), nn.Linear(d, 1))

    def forward(self, z):
        return self.D(self.G(z))


def gan_generator_step(g_lr: float = 2e-4):
    def build():
        torch.manual_seed(0)
        model = GeneratorStep()
        z = torch.randn(64, 8, generator=_gen(0))
        opt = torch.optim.Adam(model.G.parameters(), lr=g_lr, betas=(0.5, 0.999))
        return model, z, {"targets": torch.ones(64, 1), "loss_fn": F.binary_cross_entropy_with_logits,
                          "optimizer": opt}
    return build


# --- 19. GPT written by hand (nanoGPT: fused qkv, causal SDPA, N(0, 0.02), c_proj scaled 1/sqrt(2L)) ---------
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 64, block: int = 16, d: int = 32, layers: int = 4, heads: int = 4):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight") \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        h = self.wte(ids) + self.wpe(pos)
        for block in self.h:
            h = block(h)
        return self.lm_head(self.ln_f(h)).transpose(1, 2)  # (B, V, T)


def _tokens(seed: int = 0, n: int = 8, length: int = 16, vocab: int = 64):
    """Sequences that repeat a random 4-token motif: predictable from context."""
    g = _gen(seed)
    motif = torch.randint(0, vocab, (n, 4), generator=g)
    seq = motif.repeat(1, (length + 1) // 4 + 1)[:, :length + 1]
    return seq[:, :-1], seq[:, 1:]


def gpt():
    torch.manual_seed(0)
    x, y = _tokens()
    return GPT(), x, {"targets": y}


# --- 20. LSTM language model with tied embeddings (PyTorch's word_language_model: uniform(-0.1, 0.1)) -------
class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2):
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, layers, batch_first=True)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, ids):
        return self.decoder(self.rnn(self.encoder(ids))[0]).transpose(1, 2)


def lstm_lm():
    torch.manual_seed(0)
    x, y = _tokens(length=24)
    return LSTMLM(), x, {"targets": y}


# --- 21. PointNet / Deep Sets (shared per-point MLP, max pool, head) ------------------------------------------
class PointNet(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.point_mlp = nn.Sequential(nn.Conv1d(3, 32, 1), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 64, 1),
                                       nn.BatchNorm1d(64), nn.ReLU(), nn.Conv1d(64, 128, 1), nn.BatchNorm1d(128),
                                       nn.ReLU())
        self.head = nn.Sequential(nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, pts):  # (B, 3, N)
        return self.head(self.point_mlp(pts).max(-1).values)


def pointnet():
    torch.manual_seed(0)
    g = _gen(0)
    return PointNet(), torch.randn(16, 3, 64, generator=g), {"targets": torch.randint(0, 4, (16,), generator=g)}


# --- 22. RetinaNet-style classification head: sigmoid outputs, prior-probability bias init, BCE ------------
PRIOR = 0.01  # Lin et al. 2017: b = -log((1 - pi) / pi), pi = 0.01: every anchor starts at p = 0.01


class DenseHead(nn.Module):
    def __init__(self, ch: int = 16, anchors: int = 3, classes: int = 4):
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                   nn.ReLU())
        self.cls_logits = nn.Conv2d(ch, anchors * classes, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - PRIOR) / PRIOR))
        self.prob = nn.Sigmoid()

    def forward(self, x):
        return self.prob(self.cls_logits(self.tower(x)))


def retina_head():
    torch.manual_seed(0)
    g = _gen(0)
    x = torch.randn(4, 3, 16, 16, generator=g)
    targets = (torch.rand(4, 12, 16, 16, generator=g) < PRIOR).float()  # rare positives, as in detection
    return DenseHead(), x, {"targets": targets, "loss_fn": F.binary_cross_entropy}


# --- 23-24. models with a parameter owned by the container (issue 28 class 8) ----------------------------------
class OffsetMLP(nn.Module):
    """An MLP whose container holds a zero-initialised input offset (a learned centring) next to its layers."""

    def __init__(self, d_in: int = 16, d: int = 64, depth: int = 4, classes: int = 4):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(d_in))
        self.layers = nn.ModuleList(nn.Linear(d_in if i == 0 else d, d) for i in range(depth))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = x - self.offset
        for layer in self.layers:
            h = F.relu(layer(h))
        return self.head(h)


def offset_mlp():
    torch.manual_seed(0)
    g = _gen(0)
    return OffsetMLP(), torch.randn(64, 16, generator=g) + 1.0, {"targets": torch.randint(0, 4, (64,), generator=g)}


class ViT(nn.Module):
    """A hand-written ViT: zero-initialised cls token and position embedding owned by the model itself."""

    def __init__(self, size: int = 16, patch: int = 4, d: int = 32, depth: int = 4, classes: int = 10):
        super().__init__()
        n = (size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d))
        self.blocks = nn.ModuleList(GPTBlockBidirectional(d, 4) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


class GPTBlockBidirectional(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def vit():
    torch.manual_seed(0)
    x, y = _images()
    return ViT(), x, {"targets": y}


# --- 25. 24-layer pre-LN transformer (issue 28 class 9's healthy twin) ------------------------------------------
class TokenTransformer(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 24, norm_first: bool = True, length: int = 16):
        super().__init__()
        self.embed, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False,
                                          norm=nn.LayerNorm(d) if norm_first else None)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        return self.head(self.body(h, mask=self.mask, is_causal=True)).transpose(1, 2)


DEEP_WIDTH = 128  # at width 32 the post-LN stack still trains (4.30 -> 0.053 in 300 steps); at 128 it stalls


def deep_transformer(norm_first: bool, d: int = DEEP_WIDTH):
    def build():
        torch.manual_seed(0)
        x, y = _tokens(n=16)
        return TokenTransformer(d=d, norm_first=norm_first), x, {"targets": y}
    return build


# === sick twins of issue 28's classes ======================================================================
# Each is the twin of a healthy entry with one thing made genuinely wrong; the figure in its Entry's ``truth``
# is measured by tests/handwritten_truth.py without gradmedic.

# class 1: a classifier's sigmoid output saturated by a too-large head (x50: logits spread ~25), half of it on
# the wrong side. Followed by a mean-squared error, dL/dlogit = 2 (p - y) p (1 - p) vanishes exactly where the
# output is wrong and saturated: sick. Its twin follows it with binary cross-entropy, dL/dlogit = p - y, the full
# error: the same saturation loses no gradient there.
SATURATED_HEAD_GAIN = 50.0


def saturated_sigmoid_head(loss: str):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())
        with torch.no_grad():
            model[2].weight.mul_(SATURATED_HEAD_GAIN)
        g = _gen(0)
        x = torch.randn(64, 16, generator=g)
        y = (x[:, :1] + x[:, 1:2] > 0).float()
        return model, x, {"targets": y, "loss_fn": F.binary_cross_entropy if loss == "bce" else F.mse_loss}
    return build


# class 2: additive attention over the outputs of a deep plain sigmoid encoder: the encoder's gradient really
# vanishes (ten sigmoid layers); the attention's scoring layers sit between it and the loss.
class AttentionOverDeepEncoder(nn.Module):
    def __init__(self, d_in: int = 8, d: int = 32, depth: int = 10, classes: int = 4):
        super().__init__()
        mods: list[nn.Module] = []
        for i in range(depth):
            mods += [nn.Linear(d_in if i == 0 else d, d), nn.Sigmoid()]
        self.encoder = nn.Sequential(*mods)
        self.query = nn.Linear(d, d)
        self.attention = BahdanauAttention(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # (B, T, d_in)
        keys = self.encoder(x)
        return self.head(self.attention(self.query(keys.mean(1)), keys))


def attention_over_vanishing_encoder(depth: int = 10):
    def build():
        torch.manual_seed(0)
        g = _gen(0)
        return (AttentionOverDeepEncoder(depth=depth), torch.randn(16, 12, 8, generator=g),
                {"targets": torch.randint(0, 4, (16,), generator=g)})
    return build


# class 3: a GRU whose update gate always takes the new state (bias -4: z = 0.018) and whose recurrent weights
# are small (x0.1): the state forgets within a few steps; only the last output is read.
GRU_FORGET_BIAS = -4.0
GRU_RECURRENT_SCALE = 0.1


class LastOutputGRU(nn.Module):
    def __init__(self, d_in: int = 4, d: int = 32, forgetful: bool = True):
        super().__init__()
        self.rnn = nn.GRU(d_in, d, batch_first=True)
        self.head = nn.Linear(d, 1)
        if forgetful:
            with torch.no_grad():  # PyTorch's GRU gates are (r, z, n) along dim 0
                self.rnn.bias_hh_l0[d:2 * d].fill_(GRU_FORGET_BIAS)
                self.rnn.bias_ih_l0[d:2 * d].zero_()
                self.rnn.weight_hh_l0.mul_(GRU_RECURRENT_SCALE)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def gru_last_output(forgetful: bool = True, length: int = 30):
    """The task needs the first step: the target is the first input's first feature."""
    def build():
        torch.manual_seed(0)
        g = _gen(0)
        x = torch.randn(32, length, 4, generator=g)
        return LastOutputGRU(forgetful=forgetful), x, {"targets": x[:, :1, 0].clone()}
    return build


# class 4: a sine network at w0 = 30 without SIREN's init (PyTorch's default Linear init): every layer's
# pre-activation spans ~17 radians, the forward is chaotic and the gradient grows ~w0 * |W| per layer.
# siren(published_init=False)

# class 5: the GAN generator step whose generator optimizer has a learning rate far too small to move it
GAN_STALLED_LR = 1e-9  # Adam moves each weight by ~lr per step: 1e-9 / |w| ~ 1e-8 of the weight

# class 6: a layer whose units died: 60 of 64 units' biases shifted so that their largest pre-activation over the
# whole data set lies 1-100 of their own spreads (the std of that unit's pre-activation over the data) below zero,
# each by its own amount, log-uniformly (units die one by one in training, by every order of amount), the other 4
# untouched. Every one of them is off for
# every input, by a margin no input of the same distribution is likely to cross.
DEAD_UNITS = 60
DEAD_SPREADS = (1.0, 100.0)  # how far below zero each dead unit's largest pre-activation lies, in its own stds


def mostly_dead_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    g = _gen(0)
    x = torch.randn(128, 16, generator=g)
    y = torch.randint(0, 4, (128,), generator=g)
    with torch.no_grad():
        pre = model[2](model[1](model[0](x)))  # (N, 64): the whole data set
        top, std = pre.max(0).values, pre.std(0)
        lo, hi = DEAD_SPREADS
        depth = lo * (hi / lo) ** torch.rand(64, generator=g)  # log-uniform: units die by every order of amount
        model[2].bias[:DEAD_UNITS] -= top[:DEAD_UNITS] + depth[:DEAD_UNITS] * std[:DEAD_UNITS]
    return model, x, {"targets": y}


# class 7: a 16-layer graph network, linear message passing without biases, its weights at half PyTorch's
# default scale (gain ~0.35 per layer): the signal falls ~1e-7 end to end in both directions, so grad/weight is
# tiny (~1e-8) and flat in every layer.
TINY_GRAPH_SCALE = 0.5


def tiny_graph_net(layers: int = 16, scale: float = TINY_GRAPH_SCALE):
    def build():
        torch.manual_seed(0)
        model = GraphNet(layers=layers, act=False, bias=False)
        with torch.no_grad():
            for layer in model.layers:
                layer.self_lin.weight.mul_(scale)
                layer.neigh_lin.weight.mul_(scale)
        x, edges, y = _graph()
        return model, (x, edges), {"targets": y}
    return build


# class 8: head_bias_mlp(10, nn.Sigmoid): the BERT-style head owning its zero bias after a genuinely vanishing
# stack (ten sigmoid layers)

# class 9: deep_transformer(norm_first=False): 24 post-LN layers, Adam at 1e-3 without warmup


# class 4's sick twin: the regression task with a net whose forward explodes (N(0, 1) weights in 6 ReLU layers of
# 64: x5.7 per layer), trained by SGD at 1e-2 as the trainability grid's nets are (GRAD_TO_WEIGHT_EXPLODING's
# calibration): every layer's gradient is many times its weight, flat through depth.
EXPLODING_DEPTH = 6


def exploding_regressor():
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(EXPLODING_DEPTH):
        lin = nn.Linear(8 if i == 0 else 64, 64)
        nn.init.normal_(lin.weight, 0.0, 1.0)
        mods += [lin, nn.ReLU()]
    model = nn.Sequential(*mods, nn.Linear(64, 1))
    x, y = _regression()
    return model, x, {"targets": y, "optimizer": torch.optim.SGD(model.parameters(), lr=1e-2)}


GRAPH_TRAIN_STEPS = 200


def graph_net_trained():
    model, inputs, kwargs = graph_net()
    torch.manual_seed(1)
    _train(model, inputs, kwargs["targets"], F.cross_entropy, GRAPH_TRAIN_STEPS, lr=1e-2)
    return model, inputs, kwargs


class BiasedHead(nn.Module):
    """An output head that owns its zero-initialised bias and calls a bias-free projection (BERT's
    LMPredictionHead: ``decoder = Linear(bias=False)``, ``bias = Parameter(zeros)``)."""

    def __init__(self, d: int, classes: int):
        super().__init__()
        self.decoder = nn.Linear(d, classes, bias=False)
        self.bias = nn.Parameter(torch.zeros(classes))

    def forward(self, h):
        return self.decoder(h) + self.bias


def head_bias_mlp(depth: int = 4, act: type[nn.Module] = nn.ReLU):
    def build():
        torch.manual_seed(0)
        mods: list[nn.Module] = []
        for i in range(depth):
            mods += [nn.Linear(16 if i == 0 else 64, 64), act()]
        model = nn.Sequential(*mods, BiasedHead(64, 10))
        g = _gen(0)
        x = torch.randn(64, 16, generator=g)
        return model, x, {"targets": torch.randint(0, 10, (64,), generator=g)}
    return build


# === the corpus ===============================================================================================
def _sick(kind: str, severity: str, *layers: str, first: bool = True, absent: tuple[str, ...] = ()) -> Expect:
    return Expect(kind=kind, severity=severity, layers=layers, first=first, absent=absent)


ENTRIES: list[Entry] = [
    # --- healthy at their usual init ----------------------------------------------------------------------
    Entry("diffusion U-Net (GroupNorm, SiLU, zero-init convs)", unet_diffusion,
          truth="healthy_fits: noise-prediction MSE 1.021 -> 0.000 on its batch in 100 Adam(1e-3) steps: every part "
                "learns from the zero-initialised start"),
    Entry("DenseNet (concatenation, BN-ReLU-Conv)", densenet, truth="healthy_fits: cross-entropy 2.285 -> 0.112 in "
          "100 Adam(1e-3) steps"),
    Entry("WaveNet (gated tanh*sigmoid, residual + skip)", wavenet, truth="healthy_fits: next-sample cross-entropy "
          "2.794 -> 0.304 in 100 Adam(3e-3) steps"),
    Entry("TCN (weight norm, dilated causal convs)", tcn, truth="a standard recipe; nothing flagged"),
    Entry("Highway net, 10 layers, gate bias -2", highway(), truth="Srivastava et al. 2015 init"),
    Entry("MLP-Mixer, 4 blocks", mlp_mixer, truth="standard pre-LN residual mixer"),
    Entry("Conformer, 3 blocks", conformer, truth="standard macaron blocks"),
    Entry("VAE (sigmoid decoder + BCE)", vae, issue_class=1, truth="vae_trained: trains (see the trained entry)"),
    Entry("graph network (index_add_ mean aggregation)", graph_net, truth="healthy_fits: cross-entropy 1.404 -> "
          "0.000 in 200 Adam(1e-2) steps"),
    Entry("GRU seq2seq + Bahdanau attention, T=12", seq2seq("gru", 12), issue_class=2,
          truth="seq2seq: GRU reversal of 12 tokens, held-out token accuracy 0.07 -> 0.73 after 200 Adam(1e-2) "
                "steps on fresh batches"),
    Entry("LSTM seq2seq + Bahdanau attention, T=20", seq2seq("lstm", 20), issue_class=3,
          truth="seq2seq_horizon: the encoder's last-output horizon at init is 6.7e-05 over 20 steps (float64), yet "
                "the model learns reversal of 20 tokens through attention: held-out token accuracy 0.04 -> 0.84 after "
                "300 Adam(1e-2) steps on fresh batches"),
    Entry("Perceiver (latents, cross + self attention)", perceiver, truth="standard pre-LN blocks"),
    Entry("SIREN (w0=30, published init)", siren(), issue_class=4,
          truth="siren_pair: grad/weight by depth 1.6e-02 6.4e-01 1.5e+00 2.2e+00 1.4e+01 (float64); MSE 0.132 -> "
                "0.00051 (PSNR 32.9 dB) in 200 Adam(1e-4) steps"),
    Entry("NeRF MLP (density head, volume rendering)", nerf, issue_class=2,
          truth="nerf: rendered-colour MSE 0.367 -> 0.0088 (PSNR 20.6 dB) in 300 Adam(5e-3) steps; grad/weight at "
                "init pts.0 5.1e-05, pts.3 4.7e-04, density 5.7e-03, feature 1.0e-06, view 1.0e-05, rgb 1.6e-05: "
                "the density head and the colour branch are parallel heads, not a chain"),
    Entry("RealNVP, 4 affine couplings", realnvp, truth="realnvp_trained: NLL 2.59 -> 0.56 nats in 300 steps"),
    Entry("ResNet (BasicBlock, projection shortcuts)", resnet, truth="standard CIFAR ResNet recipe"),
    Entry("3-layer regression net, head gain 0.01", regression, issue_class=4,
          truth="regression_trained: MSE 0.662 -> 0.0000 (R^2 1.000) in 300 Adam(3e-3) steps"),
    Entry("GAN generator step (generator-only Adam)", gan_generator_step(), issue_class=5,
          truth="gan: mean D logit on G(z) 0.262 -> 0.823 in 200 generator-only Adam(2e-4) steps (G learns); D's "
                "largest change 0: no optimizer holds D in this step, by design"),
    Entry("GPT by hand (nanoGPT init, tied head)", gpt, truth="nanoGPT recipe"),
    Entry("LSTM LM (tied embeddings), T=24", lstm_lm, issue_class=None,
          at_init=_sick("vanishing_through_time", "warning", "rnn"),
          after_steps=_sick("vanishing_through_time", "warning", "rnn"),
          truth="lstm_lm_long: the same LSTM LM does not learn a 20-step dependency (20 random tokens, then the same "
                "20 again, T=40): held-out accuracy on the second half 0.02 -> 0.01 after 400 Adam(1e-2) steps; so "
                "gradmedic's 'horizon 20 of 24 steps' warning (loss at every step, no attention) stands: not class 3"),
    Entry("PointNet (shared MLP, max pool)", pointnet, truth="standard recipe"),
    Entry("RetinaNet head (prior bias -4.6, sigmoid + BCE)", retina_head, issue_class=1,
          truth="retina_head: 100% of outputs saturated (p = 0.01); autograd dL/dlogit equals (p - y)/N to 7e-08: "
                "the BCE cancels sigmoid' exactly, no gradient lost; BCE 0.062 -> 0.037 in 100 Adam steps"),
    Entry("confident sigmoid head (x50) + BCE", saturated_sigmoid_head("bce"), issue_class=1,
          truth="saturated_sigmoid: 67% saturated, 31% saturated and wrong; mean |dL/dlogit| x N on those 0.90 "
                "(the full error); accuracy 0.55 -> 1.00 in 300 Adam(1e-3) steps"),
    Entry("MLP with a container-owned zero offset", offset_mlp, truth="a root-owned parameter: class 8 does not "
          "show here (the root is no layer of the profile)"),
    Entry("MLP + BERT-style head owning its zero bias", head_bias_mlp(), issue_class=8,
          truth="head_bias: after 5 Adam steps grad/weight of the first over the last hidden Linear is 0.36 "
                "(float64: flat), while the head's own bias, grown from zero, has grad/weight 7.8; cross-entropy "
                "2.28 -> "
                "0.002 in 200 more steps"),
    Entry("ViT by hand (zero cls/pos owned by the model)", vit, issue_class=8, truth="standard pre-LN ViT"),
    Entry("24-layer pre-LN transformer", deep_transformer(True), issue_class=9,
          truth="deep_transformers: width 128, 24 layers, Adam(1e-3), no warmup: cross-entropy 4.31 -> 0.035 in 150 "
                "steps (step 25: 0.23, step 100: 0.04)"),
    # --- trained to a good result -------------------------------------------------------------------------------
    Entry("VAE trained 400 steps", vae_trained, issue_class=1, trained=True,
          truth="vae_trained: loss 45.1 -> reconstruction BCE 7.68 nats per 64-pixel sample (0.967 of pixels "
                "right); 54% of the decoder's sigmoid outputs saturated, 100% of those on the right side: "
                "dBCE/dlogit = p - x is 3.3e-03 there because the pixel is right, not lost"),
    Entry("GRU seq2seq + attention trained 200 steps", seq2seq_trained, issue_class=2, trained=True,
          truth="seq2seq: held-out token accuracy 0.07 -> 0.73; its attention tanh saturates as attention sharpens"),
    Entry("SIREN trained 200 steps", siren_trained, issue_class=4, trained=True,
          truth="siren_pair: PSNR 32.9 dB on the 24x24 test image"),
    Entry("regression net trained 300 steps", regression_trained, issue_class=4, trained=True,
          truth="regression_trained: R^2 1.000"),
    Entry("graph network trained 200 steps", graph_net_trained, trained=True, truth="healthy_fits: cross-entropy "
          "1.404 -> 0.000 (random labels memorised)"),
    Entry("RealNVP trained 300 steps", realnvp_trained, issue_class=6, trained=True,
          at_init=_sick("dead_units", "warning", "couplings.1.s.3", first=False),
          after_steps=_sick("dead_units", "warning", "couplings.1.s.3", first=False),
          truth="realnvp_trained: NLL 2.59 -> 0.56 nats (a fitted Gaussian: 1.94), a good fit; yet ReLU units dead on "
                "all 128 data points (full-batch training: the batch is the data set) per coupling (s-net ReLUs 1, 3): "
                "34%/55%, 9%/62%, 16%/45%, 11%/42%; tanh scale outputs saturated 1%, 29%, 8%, 79%. couplings.1.s.3's "
                "dead units lie 0.01-3.5 own stds below zero (median 0.8; 17 of 64 beyond one own std): from one "
                "batch only those 27% are surely dead, so a warning (gradmedic: 33%) is what one batch can justify; "
                "the 62% on the data set would need the check to know the batch is the data set"),
    # --- sick twins --------------------------------------------------------------------------------------------
    Entry("SICK 1: confident sigmoid head (x50) + MSE", saturated_sigmoid_head("mse"), issue_class=1,
          at_init=_sick("saturated_units", "warning", "3"), after_steps=_sick("saturated_units", "warning", "3"),
          truth="saturated_sigmoid: 67% saturated (30-80%: warning), 31% saturated and wrong; mean |dL/dlogit| x N on "
                "those 3.8e-03, 240x less than the BCE twin's 0.90; accuracy 0.55 -> 0.94 (BCE twin: 1.00)"),
    Entry("SICK 2: additive attention over a 10-layer sigmoid encoder", attention_over_vanishing_encoder(),
          issue_class=2, at_init=_sick("vanishing_gradients", "error", "encoder.0"),
          after_steps=_sick("vanishing_gradients", "error", "encoder.0"),
          truth="attention_encoder: float64 |dL/d(encoder.0 out)| / |dL/d(encoder.18 out)| = 1.7e-08; grad/weight "
                "encoder.0 / encoder.18 = 4.8e-09; geometric mean 9.0e-09 (< 1e-5: error)"),
    Entry("SICK 3: forgetful GRU, last output only, T=30", gru_last_output(), issue_class=3,
          at_init=_sick("vanishing_through_time", "error", "rnn"),
          after_steps=_sick("vanishing_through_time", "error", "rnn"),
          truth="gru_horizon: |d out / d x_1| / |d out / d x_T| = 2.1e-41 (float64)"),
    Entry("SICK 4: exploding ReLU regressor, N(0,1), SGD 1e-2", exploding_regressor, issue_class=4,
          at_init=_sick("exploding_gradients", "error", "0"), after_steps=_sick("nonfinite", "error", first=False),
          truth="exploding_regressor: grad/weight 4e+05 .. 6e+08 in every layer (float64); SGD(1e-2) loss 1.7e+07 -> "
                "inf -> nan within 20 steps"),
    Entry("SICK 5: GAN generator step, generator lr 1e-9", gan_generator_step(GAN_STALLED_LR), issue_class=5,
          at_init=HEALTHY,
          after_steps=_sick("stalled_updates", "error", "G.0", "G.2", "G.4", absent=("D.0", "D.2", "D.4")),
          truth="gan: at lr 1e-9 G's weights move 0 .. 6e-08 of their size in 5 steps (< STALLED_ERROR 1e-7); D is in "
                "no optimizer, by design"),
    Entry("SICK 6: 60 of 64 ReLUs dead, 1-100 own stds below zero", mostly_dead_relu, issue_class=6,
          at_init=_sick("dead_units", "error", "3"), after_steps=_sick("dead_units", "error", "3"),
          truth="dead_relu: 93.8% of layer 2's units (60 of 64) are <= 0 on every one of the 128 inputs of the data "
                "set, each one's largest pre-activation 1-100 of its own stds below zero (so any margin up to one own "
                "std counts all 60). By the spread over units alone gradmedic read 48% (a warning), falling as the "
                "dead units spread out (all 1-3 stds deep: 92%; uniform 1-20: 69%; log-uniform 1-20: 58%, 1-100: 48%, "
                "1-1000: 42%); with the scale of each unit's weights on the layer's input as the bound: 88%"),
    Entry("SICK 7: 16-layer linear graph net, weights x0.5", tiny_graph_net(), issue_class=7,
          at_init=_sick("vanishing_gradients", "error", "layers.0"),
          after_steps=_sick("vanishing_gradients", "error", "layers.0"), truth="tiny_graph: grad/weight 1e-07..2e-07 "
                            "in every layer, flat (float64); signal first/last block "
                "5e-07; cross-entropy 1.406 -> 0.831 in 300 Adam(1e-3) steps where the x1 twin (grad/weight 2e-3) "
                "reaches 0.133: the absolute scale, not the profile, is what is wrong"),
    Entry("SICK 8: BERT-style head owning its zero bias + 10 sigmoid layers", head_bias_mlp(10, nn.Sigmoid),
          issue_class=8, at_init=_sick("vanishing_gradients", "error", "0"),
          after_steps=_sick("vanishing_gradients", "error", "0"), truth="head_bias: after 5 Adam steps grad/weight "
                            "of the first over the last hidden Linear is "
                "1.8e-08 (float64); cross-entropy 2.31 -> 2.215 in 200 more steps"),
    Entry("SICK 9: 24-layer post-LN transformer, Adam 1e-3", deep_transformer(False), issue_class=9,
          at_init=UNDETERMINED, after_steps=UNDETERMINED,
          truth="deep_transformers: width 128, 24 layers, Adam(1e-3), no warmup: cross-entropy 4.31 -> 2.94 in 150 "
                "steps "
                "(step 25: 2.52, step 50: 2.14, step 100: 3.03: it stalls and climbs back), where the pre-LN twin "
                "reaches "
                "0.035; at width 32 the same post-LN stack trains (4.30 -> 0.053 in 300 steps, pre-LN 0.051)"),
]


def entries() -> list[tuple[str, Entry]]:
    """(name, entry) pairs, as tests/corpus.py's families are."""
    return [(e.name, e) for e in ENTRIES]

