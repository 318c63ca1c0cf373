"""The depth experiment's table and figure, for ``gradmedic lab publish`` (and the HTML report).

``depth_cells`` reads the ``transformer_depth`` runs of a database into one cell per layout and depth (medians
and [min, max] over the seeds it ran); ``depth_markdown`` writes them as a Markdown table and ``depth_figure``
draws the stream's gradient (first block over last, what ``gm.check`` reads) against depth per layout, at init
and after training. The figure is drawn here, with matplotlib (the report extra) imported on first use, because
publishing is a lab command: the report floor sits above the lab and is not imported from it.
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import median
from typing import Any

from gradmedic._errors import GradmedicError
from gradmedic.lab.claim_checks import learns
from gradmedic.lab.claims import fmt
from gradmedic.lab.rows import label_number
from gradmedic.lab.suites import DEPTH_LAYOUTS

__all__ = ["DEPTH_EXPERIMENT", "INIT_EXPERIMENT", "depth_cells", "depth_figure", "depth_markdown", "save_depth_figure"]

DEPTH_EXPERIMENT = "transformer_depth"
INIT_EXPERIMENT = "transformer_depth_init"  # one step per run: the stream at init, every depth and seed


def _spread(values: list[float | None]) -> str:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1 or min(finite) == max(finite):
        return fmt(median(finite))
    return f"{fmt(median(finite))} [{fmt(min(finite))}, {fmt(max(finite))}]"


def _mid(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return median(finite) if finite else None


def _update_ratio(r: dict[str, Any]) -> float | None:
    """The last block's relative change of the stream over the first block's, after training."""
    changes = (r.get("stream") or {}).get("changes_trained") or []
    return changes[-1] / changes[0] if len(changes) >= 2 and changes[0] else None


def depth_cells(rows: list[tuple[dict[str, Any], dict[str, Any]]], experiment: str = DEPTH_EXPERIMENT
                ) -> list[dict[str, Any]]:
    """One cell per (layout, depth) of ``experiment``, by layout (the suite's order) and depth."""
    runs: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for config, result in rows:
        if config.get("experiment") == experiment:
            runs.setdefault(config["label"], []).append((config, result))
    cells = []
    for label, pairs in runs.items():
        results = [r for _, r in pairs]
        stream = [r.get("stream") or {} for r in results]
        cells.append({
            "label": label, "layout": label.rsplit(" d=", 1)[0], "depth": label_number(label, "d="),
            "steps": pairs[0][0].get("steps"), "seeds": len(pairs),
            "learns": sum(learns("", r).ok for r in results),
            "loss": [r.get("final_loss") for r in results], "baseline": results[0].get("baseline"),
            "stream_init": [s.get("ratio_init") for s in stream],
            "stream_trained": [s.get("ratio_trained") for s in stream],
            "update": [_update_ratio(r) for r in results], "wall_s": [r.get("wall_s") for r in results]})
    order = {label: i for i, (label, _, _) in enumerate(DEPTH_LAYOUTS)}
    return sorted(cells, key=lambda c: (order.get(c["layout"], len(order)), c["layout"], c["depth"]))


def _init_markdown(init: list[dict[str, Any]]) -> list[str]:
    """Layouts x depths: the stream's first/last-block gradient at init over the seeds."""
    depths = sorted({c["depth"] for c in init})
    seeds = sorted({c["seeds"] for c in init})
    lines = ["", f"The stream's gradient at init, first block / last (one step, {'/'.join(map(str, seeds))} seeds "
             "per cell):", "", "| layout | " + " | ".join(f"{d} blocks" for d in depths) + " |",
             "|---|" + "---|" * len(depths)]
    for layout in dict.fromkeys(c["layout"] for c in init):
        by_depth = {c["depth"]: c for c in init if c["layout"] == layout}
        lines.append(f"| {layout} | " + " | ".join(_spread(by_depth[d]["stream_init"]) if d in by_depth else "-"
                                                    for d in depths) + " |")
    return lines


def depth_markdown(cells: list[dict[str, Any]], figure: str | None = None,
                   init: list[dict[str, Any]] | None = None) -> str:
    """The depth table as Markdown, the table at init when its runs are there, and the figure's link."""
    lines = ["| layout | blocks | steps x seeds | learns | final loss | stream gradient first/last block, init | "
             "trained | last/first block relative update, trained | s per run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['layout']} | {c['depth']} | {c['steps']} x {c['seeds']} | {c['learns']}/{c['seeds']} | "
                     f"{_spread(c['loss'])} | {_spread(c['stream_init'])} | {_spread(c['stream_trained'])} | "
                     f"{_spread(c['update'])} | {fmt(_mid(c['wall_s']))} |")
    if init:
        lines += _init_markdown(init)
    if figure:
        lines += ["", f"![The residual stream's gradient, first block over last, against depth per layout]({figure})"]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib  # optional: the report extra
    except ImportError:
        raise GradmedicError("The depth figure needs matplotlib: pip install 'gradmedic[report]'") from None
    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt  # optional: the report extra

    return plt


def depth_figure(cells: list[dict[str, Any]], init: list[dict[str, Any]] | None = None):
    """Two panels, at init and after training: the median over seeds of the stream's first/last-block gradient
    against depth (log-log), one line per layout. The init panel reads ``init`` (the one-step runs at every depth)
    when given. A cell without the number is left out of its line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.9), layout="constrained", sharey=True)
    layouts = list(dict.fromkeys(c["layout"] for c in cells + (init or [])))
    for ax, key, title, panel in ((axes[0], "stream_init", "at init", init or cells),
                                  (axes[1], "stream_trained", "after training", cells)):
        for i, layout in enumerate(layouts):
            points = [(c["depth"], _mid(c[key])) for c in panel if c["layout"] == layout]
            points = [(d, v) for d, v in sorted(points) if v is not None and v > 0]
            if points:
                ax.plot(*zip(*points, strict=True), label=layout, marker="osD^v<>"[i % 7], markersize=4, linewidth=1.4,
                        color=f"C{i % 10}")  # one colour per layout in both panels
        ax.set_xscale("log")
        ax.set_yscale("log")
        depths = sorted({c["depth"] for c in panel})
        ax.set_xticks(depths, [str(d) for d in depths])  # the depths run, not 10^k
        ax.minorticks_off()
        ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
        ax.set_xlabel("blocks")
        ax.set_title(f"Residual stream gradient, first block / last, {title}", fontsize=9)
    axes[0].set_ylabel("RMS dL/d(block output): first / last")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def save_depth_figure(cells: list[dict[str, Any]], path: Path, init: list[dict[str, Any]] | None = None) -> None:
    plt = _pyplot()
    fig = depth_figure(cells, init)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=90)
    finally:
        plt.close(fig)
