"""Matplotlib figures of gradient flow. Each function takes plain arrays and returns a Figure, so the
same plot serves a lab suite, a Monitor trace and a check report.

Gradient norms span many orders of magnitude, so every gradient axis is logarithmic; zeros and NaNs
(a layer with no gradient) are left blank rather than drawn at an arbitrary floor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from gradmedic._errors import GradmedicError

__all__ = ["gradient_heatmap", "layer_bars", "loss_curves", "role_profile", "time_curves"]

_MAX_LABELS = 40  # layer names shown on an axis; beyond that every k-th
# the largest magnitude drawn (and 1 / it the smallest positive one): a value beyond is drawn at the limit. matplotlib
# pads a log axis by a share of its decades and its tick locator rounds them, so 1e308 (a float64 trace read from a
# file) overflowed to inf inside matplotlib (OverflowError). No model trains in a dtype past float32's 3.4e38.
PLOT_LIMIT = 1e100


def _pyplot():
    try:
        import matplotlib  # optional: the report extra
    except ImportError:
        raise GradmedicError("Reports need matplotlib: pip install 'gradmedic[report]'") from None

    matplotlib.use("Agg", force=False)  # no display needed; keeps working in CI and over ssh
    import matplotlib.pyplot as plt  # optional: the report extra

    return plt


def _plain(text: str) -> str:
    """User text (layer names, labels) as literal text: a ``$`` would start matplotlib's mathtext, and a
    name such as ``a$\\frac{1}{$`` would crash the drawing. A leading ``_`` would hide a legend entry."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _short(name: str, width: int = 28) -> str:
    """A layer name cut to ``width`` characters without losing what tells it from its neighbours: its block numbers
    and its last segment. Leading segments are shortened to their first letter, one at a time, until it fits
    (``model.layers.11.self_attn.q_proj`` -> ``m.layers.11.self_attn.q_proj``); then the last segment loses its
    head (``f.3.…ong_name``). Cutting the name's head alone left ``…_long_name`` on every bar of a stack."""
    if len(name) <= width:
        return _plain(name)
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if not parts[i].isdigit():
            parts[i] = parts[i][:1]
            if len(".".join(parts)) <= width:
                return _plain(".".join(parts))
    head = ".".join(parts[:-1])
    room = width - len(head) - 2  # the dot and the ellipsis
    if head and room >= 4:
        return _plain(f"{head}.…{parts[-1][-room:]}")
    return _plain("…" + name[-(width - 1):])


def _values(seq, positive: bool = False) -> np.ndarray:
    """Floats with None as NaN; with ``positive``, zeros and negatives too (they have no place on a log axis)."""
    y = np.array([np.nan if v is None else v for v in seq], dtype=float)
    finite = np.isfinite(y)
    tiny = finite & (y != 0) & (np.abs(y) < 1 / PLOT_LIMIT)
    y = np.where(finite, np.clip(y, -PLOT_LIMIT, PLOT_LIMIT), y)  # PLOT_LIMIT: drawn at the limit
    y = np.where(tiny, np.sign(y) / PLOT_LIMIT, y)
    return np.where(y > 0, y, np.nan) if positive else y


def _positive_log(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(values), np.nan)


def _finish(ax, xlabel: str, ylabel: str, title: str, legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(_plain(title), fontsize=10)


def gradient_heatmap(steps: Sequence[int], layers: Sequence[str], values: np.ndarray, title: str = "",
                     quantity: str = "|dL/dW|"):
    """Layers (rows, input at the top) x steps (columns), colour = log10 of the gradient norm. A gradient of
    exactly zero has no logarithm: it is drawn black (and said so in the title), so that it does not read as the
    blank of a step that was not measured."""
    plt = _pyplot()  # first: without matplotlib, its one-line message rather than an import traceback
    from matplotlib.colors import ListedColormap  # optional: the report extra

    raw = np.asarray(values, dtype=float).T  # (layers, steps)
    data = _positive_log(raw)
    height = min(9.0, 1.6 + 0.22 * len(layers))
    fig, ax = plt.subplots(figsize=(7.5, height), layout="constrained")
    masked = np.ma.masked_invalid(data)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest")
    zero = raw == 0
    if zero.any():
        ax.imshow(np.ma.masked_where(~zero, np.ones_like(raw)), aspect="auto", cmap=ListedColormap(["black"]),
                  interpolation="nearest")
        title = f"{title or 'Gradient flow'} (black: exactly 0)"
    ax.set_xlabel("training step")
    step_ticks = _step_ticks(steps, 8)
    ax.set_xticks(step_ticks, [str(int(steps[i])) for i in step_ticks])
    every = max(1, len(layers) // _MAX_LABELS + (len(layers) % _MAX_LABELS > 0))
    rows = list(range(0, len(layers), every))
    ax.set_yticks(rows, [_short(layers[i]) for i in rows], fontsize=7)
    fig.colorbar(image, ax=ax, label=f"log10 {quantity}")
    ax.set_title(_plain(title or "Gradient flow"), fontsize=10)
    return fig


def _step_ticks(steps: Sequence[int], most: int) -> list[int]:
    """Columns to label on a heatmap whose columns are measured steps, which need not be evenly spaced (the Monitor's
    first looks add steps 1, 3, 7 and 15 to a schedule of every 20th): from the first step, every multiple of a
    stride in steps (the schedule's usual gap times 1, 2, 5, 10...), at the first column at or after it. A stride in
    columns labelled 0, 1, 3, 7, 15, 20 unevenly, or 49, 119, 189 where the steps were 0, 100, 200."""
    at = np.asarray(steps, dtype=np.int64)
    if at.size < 2:
        return list(range(at.size))
    gap = max(int(np.median(np.diff(at))), 1)
    stride = gap * _nice_stride(-(-int(at[-1] - at[0] + 1) // gap), most)
    columns = {int(np.searchsorted(at, t)) for t in range(int(at[0]), int(at[-1]) + 1, stride)}
    return sorted(c for c in columns if c < at.size)


def _nice_stride(n: int, most: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... that puts at most ``most`` ticks on ``n`` columns."""
    stride, scale = 1, 1
    while -(-n // stride) > most:
        for m in (1, 2, 5):
            stride = m * scale
            if -(-n // stride) <= most:
                return stride
        scale *= 10
    return stride


def layer_bars(layers: Sequence[str], norms: Mapping[str, Sequence[float | None]], title: str = "",
               quantity: str = "|dL/dW| at init"):
    """Per-layer gradient norms (log scale), one bar group per layer, one colour per label. A gradient of exactly
    zero has no bar on a log axis: it is marked with a black x on the axis floor (and said so in the title), so
    that it does not read as a layer that was not measured."""
    plt = _pyplot()
    labels = list(norms)
    n = max(1, len(labels))
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained")
    width = 0.8 / n
    zeros: list[float] = []
    for i, label in enumerate(labels):
        raw = _values(norms[label])
        at = x[: len(raw)] + (i - (n - 1) / 2) * width
        ax.bar(at, np.where(raw > 0, raw, np.nan), width=width, label=_plain(label))
        zeros += list(at[raw == 0])
    ax.set_yscale("log")
    shown = np.concatenate([_values(v, positive=True) for v in norms.values()]) if norms else np.array([])
    shown = shown[np.isfinite(shown)]
    if shown.size and shown.max() < 10 * shown.min():  # a narrow range: a tight log axis makes 0.42 look like 0
        ax.set_ylim(shown.min() / 3, shown.max() * 1.5)
    if zeros:
        if not ax.get_ylim()[0] > 0 or not np.isfinite(ax.get_ylim()).all():
            ax.set_ylim(1e-3, 1.0)  # nothing positive to scale the axis by
        limits = ax.get_ylim()
        ax.plot(zeros, [limits[0]] * len(zeros), linestyle="none", marker="x", color="black", clip_on=False, zorder=3)
        ax.set_ylim(limits)  # the marks sit on the floor; they must not move it
        title = f"{title or 'Gradient per layer'} (x: exactly 0)"
    every = max(1, len(layers) // 25 + (len(layers) % 25 > 0))
    ax.set_xticks(x[::every], [_short(layers[i], 18) for i in range(0, len(layers), every)], rotation=60,
                  ha="right", fontsize=7)
    _finish(ax, "layer (input → output)", quantity, title or "Gradient per layer", legend=len(labels) > 1)
    return fig


def loss_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float | None]]], baseline: float | None = None,
                title: str = "", lr: tuple[Sequence[int], Sequence[float | None]] | None = None):
    """Training loss per label; the task's input-blind baseline as a dashed line; where a loss first went NaN or
    infinite, a dotted line (a curve that silently stops reads as a run that ended); ``lr``: the learning rate on a
    second axis, since a spike that follows a schedule's jump is read off the two together."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained")
    seen: list[np.ndarray] = []
    for label, (steps, loss) in curves.items():
        y = _values(loss)
        seen.append(y[np.isfinite(y)])
        ax.plot(list(steps)[: len(y)], y, label=_plain(label), linewidth=1.4)
        bad = np.flatnonzero(~np.isfinite(np.asarray([np.nan if v is None else v for v in loss], dtype=float)))
        if bad.size:
            at = list(steps)[int(bad[0])]
            ax.axvline(at, color="crimson", linestyle=":", linewidth=1.2, label=f"first non-finite loss (step {at})")
            ax.set_xlim(min(steps), max(steps))  # the steps after it were run too: the axis spans them
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="input-blind baseline")
    finite = np.concatenate(seen) if seen else np.array([])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:  # log only when it spans decades
        ax.set_yscale("log")
    if lr is not None:
        right = ax.twinx()
        right.plot(list(lr[0]), _values(lr[1]), color="grey", linewidth=1, alpha=0.8, label="learning rate")
        right.set_ylabel("learning rate", color="grey")
        right.tick_params(axis="y", colors="grey", labelsize=7)
        right.legend(fontsize=7, loc="upper center")
    _finish(ax, "training step", "training loss", title or "Loss")
    return fig


def time_curves(curves: Mapping[str, Sequence[float | None]], title: str = ""):
    """RMS of dL/dx_t against t, one line per label: how the gradient decays back through time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.4), layout="constrained")
    for label, values in curves.items():
        y = _values(values, positive=True)
        ax.plot(np.arange(1, len(y) + 1), y, label=_plain(label), linewidth=1.4)
    ax.set_yscale("log")
    _finish(ax, "time step t (the loss is read at the last)", "RMS of dL/dx_t", title or "Gradient through time")
    return fig


def role_profile(lines: Mapping[str, tuple[Sequence[int], Sequence[float | None]]], title: str = "",
                 quantity: str = "|dL/dW|"):
    """The depth profile of a model made of repeated blocks: block index on the x axis, one line per
    role (attention q/k/v/out, MLP in/out, each norm), log scale. Reads at a glance where a 48-block
    transformer's 300 per-layer bars would be a comb."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.0, 3.8), layout="constrained")
    markers = "osD^v<>ph*"
    for i, (label, (blocks, values)) in enumerate(lines.items()):
        ax.plot(list(blocks), _values(values, positive=True), label=label, linewidth=1.4,
                marker=markers[i % len(markers)], markersize=3)
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator  # optional: the report extra

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # block indices: no 0.5 between blocks
    _finish(ax, "block (input → output)", quantity, title or "Gradient per role across blocks", legend=False)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)  # beside, not over, the lines
    return fig


def run_profiles(profiles: Mapping[str, Mapping[str, float]], quantity: str = "|dL/dW|", title: str = ""):
    """Several runs' last per-layer values (label -> {layer: value}), one line per run, log scale. Runs that share
    their layer names are drawn against the names; runs of different models against relative depth (first layer
    0, last 1), since no name matches."""
    plt = _pyplot()
    lasts = list(profiles.values())
    same_layers = all(list(last) == list(lasts[0]) for last in lasts)
    fig, ax = plt.subplots(figsize=(8.5, 3.6), layout="constrained")
    markers = "osD^v<>ph*"
    for i, (label, last) in enumerate(profiles.items()):
        values = _values(list(last.values()), positive=True)
        x = np.arange(len(values)) if same_layers else np.linspace(0.0, 1.0, max(len(values), 1))[: len(values)]
        ax.plot(x, values, label=_plain(label), linewidth=1.4, marker=markers[i % len(markers)], markersize=3)
    ax.set_yscale("log")
    if same_layers and lasts:
        layers = list(lasts[0])
        every = max(1, -(-len(layers) // 25))
        ax.set_xticks(np.arange(0, len(layers), every), [_short(layers[j], 18) for j in range(0, len(layers), every)],
                      rotation=60, ha="right", fontsize=7)
        xlabel = "layer (input → output)"
    else:
        xlabel = "relative depth (first layer 0, last 1): the runs' layers differ"
    _finish(ax, xlabel, quantity, title or "Gradient per layer, last recorded step of each run")
    return fig
