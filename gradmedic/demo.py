"""``gradmedic demo``: the whole loop on a model that will not train, in about half a minute on a CPU.

A 10-layer sigmoid MLP on scikit-learn's digits is trained as a user would (Adam, lr 1e-3) under a
Monitor; the trace is diagnosed; ``treat`` is handed the run as it was made (the model as it was built, the run's
minibatches in order, its optimizer) and judges each remedy by re-running the run on a changed copy, as it judges
any finding from a training run; the treated copy is then retrained with the same budget and the treatment's
recipe (its optimizer, clipping and lr schedule).
Before/after numbers are printed and an HTML report is written.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import gradmedic as gm
from gradmedic._errors import GradmedicFindingWarning
from gradmedic._progress import held
from gradmedic._rich import BarColumn, MofNCompleteColumn, Progress, Table, TextColumn, TimeElapsedColumn
from gradmedic.lab.tasks import digits
from gradmedic.monitor import Monitor
from gradmedic.report import plots, report_page, write_page
from gradmedic.report.notebook import evidence_outcome

__all__ = ["DemoResult", "run_demo", "sick_model"]

LR = 1e-3  # Adam's default: the sick model is sick at the rate most users start with


def sick_model(depth: int = 10, width: int = 64, seed: int = 0) -> nn.Sequential:
    """Linear/Sigmoid x depth, PyTorch's default init: the textbook vanishing-gradient net."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [64] + [width] * depth
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


@dataclass
class Phase:
    """One training run's numbers."""

    final_loss: float
    test_acc: float
    ratio_init: float  # first Linear's gradient norm over the last one's, at step 0
    curve: list[float]
    trace: Any = field(repr=False, default=None)


@dataclass
class DemoResult:
    before: Phase
    after: Phase
    report: Any  # the diagnosis of the sick run
    treatment: Any
    html: Path | None = None


def _batches(task, steps: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The run's minibatches in order: the same for the sick run, treat's re-runs and the treated run."""
    gen = torch.Generator().manual_seed(seed)
    return [(task.x_train[i], task.y_train[i]) for i in
            (torch.randint(0, len(task.x_train), (batch,), generator=gen) for _ in range(steps))]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, task, batches, clip=None, schedule=None,
           progress=None, say=None) -> Phase:
    """Train on ``batches`` under a Monitor; what it says while it trains goes to ``say`` as one line each (the
    demo's console) instead of a Python warning with its source line."""
    steps = len(batches)
    losses = []
    scheduler = schedule(optimizer) if schedule is not None else None
    said = {}

    def on_finding(f) -> None:
        if say is not None:
            say(f"  [dim]said while it trains, step {said['monitor'].step_count - 1}:[/] {f.severity} {f.kind}"
                + (f" at '{f.layers[0]}'" if f.layers else ""))
    with warnings.catch_warnings(), Monitor(model, optimizer, every=max(1, steps // 20),
                                            on_finding=on_finding) as monitor:
        warnings.simplefilter("ignore", GradmedicFindingWarning)
        said["monitor"] = monitor
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.step(loss)
            if clip is not None:
                clip(list(model.parameters()))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress()
    model.eval()
    with torch.no_grad():
        acc = float((model(task.x_test).argmax(1) == task.y_test).float().mean())
    model.train()
    trace = monitor.trace
    norms = trace.metric("grad_norm")[0]
    linear = [j for j, name in enumerate(trace.layers) if trace.meta["types"].get(name) == "Linear"]
    ratio = float(norms[linear[0]] / norms[linear[-1]])
    return Phase(float(np.mean(losses[-max(1, steps // 10):])), acc, ratio, losses, trace)


def run_demo(steps: int = 300, depth: int = 10, seed: int = 0, html: str | Path | None = "gradmedic-demo.html",
             console=None, threads: int | None = 1) -> DemoResult:
    """``threads``: torch's intra-op threads for the demo (restored after). One, as the lab pins its runs: the
    numbers are then the same on every machine, and on a small net many threads cost more than they give
    (torch's default took 2-4 min where one thread takes about half a minute)."""
    before_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(steps, depth, seed, html, console)
    finally:
        torch.set_num_threads(before_threads)


def _run_demo(steps: int, depth: int, seed: int, html: str | Path | None, console) -> DemoResult:
    task = digits(seed)
    model = sick_model(depth, seed=seed)
    batch = 64
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"[bold]gradmedic demo[/]: a {depth}-layer sigmoid MLP on scikit-learn's digits "
        f"({len(task.x_train)} train / {len(task.x_test)} test images), Adam lr {LR:g}, {steps} steps, batch {batch}")
    as_built = copy.deepcopy(model)
    batches = _batches(task, steps, batch, seed)
    with _progress(console, 2 * steps) as advance:
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        before = _train(model, optimizer, task, batches, progress=advance, say=say)
        report = gm.diagnose(before.trace)
        # a finding from a run is judged by re-running the run: the model as built, its batches, its optimizer
        treatment = gm.treat(as_built, report, data=batches, optimizer=optimizer, loss_fn=F.cross_entropy)
        after = _train(treatment.model, treatment.optimizer(), task, batches, clip=treatment.clip,
                       schedule=treatment.schedule, progress=advance)
    result = DemoResult(before, after, report, treatment)
    if console is not None:
        _print(console, result)
    if html:
        result.html = _write_html(result, html, depth, steps)
        say(f"Report written to [bold]{result.html}[/]")
    return result


class _progress:
    """A rich progress bar over both training runs (or nothing without a console)."""

    def __init__(self, console, total: int):
        self.console, self.total, self.bar = console, total, None

    def __enter__(self):
        if self.console is None:
            return None

        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, transient=True)
        self.bar.start()
        self.held = held()  # gm.treat's verification bars stay off while this one is up
        self.held.__enter__()
        task = self.bar.add_task("", total=self.total)
        return lambda: self.bar.update(task, advance=1)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.held.__exit__(None, None, None)


def _print(console, result: DemoResult) -> None:

    console.print(result.report.table() if result.report.findings else "No findings.")
    for f in result.report.findings:
        console.print(f"[bold]{f.severity}[/] {f.kind}: {f.message}")
    console.print("[bold]Treatment[/] (gm.treat):")
    console.print(str(result.treatment))
    table = Table(title="Before and after, same data, steps and seed", title_justify="left")
    for header in ("", "final train loss", "test accuracy", "first/last layer gradient at init"):
        table.add_column(header, justify="right" if header else "left")
    for name, phase in (("sick model", result.before), ("treated model", result.after)):
        table.add_row(name, f"{phase.final_loss:.3f}", f"{phase.test_acc:.1%}", f"{phase.ratio_init:.1e}")
    console.print(table)


def _write_html(result: DemoResult, path: str | Path, depth: int, steps: int) -> Path:
    page = report_page(result.report, title=f"gradmedic demo: a {depth}-layer sigmoid MLP on digits")
    page.heading("Treatment")
    page.table(("remedy", "what was done", "why"), result.treatment.applied or [("none", "", "")])
    if result.treatment.evidence:
        page.table(("stage", f"mean loss, last steps of the {steps}-step re-run", "outcome"),
                   [(e.stage, f"{e.score:.3f}", evidence_outcome(e)) for e in result.treatment.evidence])
    if result.treatment.recipe:
        page.paragraph("Training recipe: " + ", ".join(result.treatment.recipe))
    page.heading("Before and after")
    page.table(("", "final train loss", "test accuracy", "first/last layer gradient at init"),
               [(name, f"{p.final_loss:.3f}", f"{p.test_acc:.1%}", f"{p.ratio_init:.1e}")
                for name, p in (("sick model", result.before), ("treated model", result.after))])
    steps_axis = list(range(steps))
    page.figure(plots.loss_curves({"sick": (steps_axis, result.before.curve),
                                   "treated": (steps_axis, result.after.curve)}, title="Training loss"),
                "loss before and after")
    page.figure(_bars(result, plots), "per-layer gradient before and after")
    return write_page(page, path)


def _bars(result: DemoResult, plots):
    norms = {}
    for name, phase in (("sick, step 0", result.before), ("treated, step 0", result.after)):
        trace = phase.trace
        row = trace.metric("grad_norm")[0]
        norms[name] = [float(v) for v, layer in zip(row, trace.layers, strict=True)
                       if trace.meta["types"].get(layer) == "Linear"]
    n = min(len(v) for v in norms.values())
    return plots.layer_bars([f"Linear {i}" for i in range(n)], {k: v[:n] for k, v in norms.items()},
                            title="Gradient per Linear layer at the first step")
