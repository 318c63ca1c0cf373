"""Trace: what a Monitor recorded, as steps x layers x metrics, plus per-time-step series and events.

Saved as a zip of ``.npy`` arrays and one JSON document, loaded with ``allow_pickle=False``: a trace
file from someone else cannot run code. Writes go to a temporary file renamed into place, so an
interrupted save never leaves a half-written trace over a good one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gradmedic._display import html_of
from gradmedic._errors import GradmedicError, bad_argument
from gradmedic._files import write_atomic
from gradmedic._terminal import csv_cell, printable
from gradmedic._trace_file import FORMAT, MAX_TRACE_BYTES, VERSION, read_trace
from gradmedic._trace_meta import TraceMeta
from gradmedic.probes.base import Chunk

__all__ = ["Trace"]

# Columns of the summary table: (metric, header); the first measured value per layer is the last step's.
SUMMARY_COLUMNS = (
    ("grad_norm", "|grad|"),
    ("backward_rms", "dL/dout"),
    ("grad_to_weight", "|g|/|w|"),
    ("update_to_weight", "|dw|/|w|"),
    ("saturated_frac", "satur."),
    ("dead_frac", "dead"),
    ("time_grad_ratio", "dx0/dxT"),
)


class Trace:
    """Steps x layers x metrics; NaN where a metric was not measured at a step."""

    def __init__(self, meta: TraceMeta | dict[str, Any] | None = None):
        self.meta = TraceMeta.of(dict(meta or {}))
        self._chunks: list[Chunk] = []
        self._cache: tuple[np.ndarray, list[str], list[str], np.ndarray] | None = None
        # set by a rank-aware Monitor on ranks other than 0: "" writes nothing, ".rankN" writes NAME.rankN.EXT
        self.rank_suffix: str | None = None

    # --- building -------------------------------------------------------------------------------
    def extend(self, chunk: Chunk) -> None:
        self._chunks.append(chunk)
        self._cache = None

    def _materialise(self) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
        if self._cache is not None:
            return self._cache
        order = {name: i for i, name in enumerate(self.meta.get("modules", []))}
        layers: list[str] = []
        metrics: list[str] = []
        for c in self._chunks:
            layers += [x for x in c.layers if x not in layers]
            metrics += [m for m in c.metrics if m not in metrics]
        layers.sort(key=lambda name: order.get(name, len(order)))
        steps = np.unique(np.concatenate([c.steps for c in self._chunks])) if self._chunks else \
            np.zeros(0, dtype=np.int64)
        values = np.full((len(steps), len(layers), len(metrics)), np.nan)
        li = {x: i for i, x in enumerate(layers)}
        mi = {m: j for j, m in enumerate(metrics)}
        for c in self._chunks:
            if not c.layers:
                continue
            si = np.searchsorted(steps, c.steps)
            lidx = np.array([li[x] for x in c.layers])
            midx = np.array([mi[m] for m in c.metrics])
            block = values[np.ix_(si, lidx, midx)]
            values[np.ix_(si, lidx, midx)] = np.where(np.isnan(c.values), block, c.values)
        self._cache = (steps.astype(np.int64), layers, metrics, values)
        return self._cache

    # --- reading --------------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        return self._materialise()[0]

    @property
    def layers(self) -> list[str]:
        return list(self._materialise()[1])

    @property
    def metrics(self) -> list[str]:
        return list(self._materialise()[2])

    @property
    def values(self) -> np.ndarray:
        """(steps, layers, metrics) float64 array; NaN where not measured."""
        return self._materialise()[3]

    @property
    def nbytes(self) -> int:
        """Bytes of recorded numbers this trace holds (grids, series, scalars), without building the dense
        steps x layers x metrics array that ``values`` returns (which can be much larger: NaN where a
        metric was not measured)."""
        total = 0
        for c in self._chunks:
            total += c.values.nbytes + c.steps.nbytes
            total += sum(s.nbytes + v.nbytes for per_layer in c.series.values() for s, v in per_layer.values())
            total += sum(s.nbytes + v.nbytes for s, v in c.scalars.values())
        return total

    def __len__(self) -> int:
        return len(self.steps)

    def metric(self, name: str) -> np.ndarray:
        """One metric as a (steps, layers) array."""
        _, _, metrics, values = self._materialise()
        if name not in metrics:
            known = ", ".join(metrics) or "none yet"
            raise GradmedicError(f"No metric {name!r} in this trace; it has: {known}.")
        return values[:, :, metrics.index(name)]

    def last(self, name: str) -> dict[str, float]:
        """The last measured value of a metric for each layer that has one."""
        if name not in self.metrics:
            return {}
        column = self.metric(name)
        out = {}
        for j, layer in enumerate(self.layers):
            measured = np.flatnonzero(~np.isnan(column[:, j]))
            if measured.size:
                out[layer] = float(column[measured[-1], j])
        return out

    def series(self, name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """A per-step vector series, e.g. ``"time_grad_rms"``: layer -> (steps (S,), values (S, T))."""
        parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for c in self._chunks:
            for layer, pair in c.series.get(name, {}).items():
                parts.setdefault(layer, []).append(pair)
        out = {}
        for layer, pairs in parts.items():
            width = max(v.shape[1] for _, v in pairs)
            padded = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=np.nan) for _, v in pairs]
            out[layer] = (np.concatenate([s for s, _ in pairs]), np.concatenate(padded))
        return out

    def scalar(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A run-level number recorded at every step, e.g. ``"loss"`` or ``"lr"``: (steps, values)."""
        pairs = [c.scalars[name] for c in self._chunks if name in c.scalars]
        if not pairs:
            known = ", ".join(self.scalar_names) or "none"
            raise GradmedicError(f"No scalar {name!r} in this trace (it has: {known}); pass the loss with "
                                 "monitor.step(loss) and the optimizer to Monitor(model, optimizer).")
        return np.concatenate([s for s, _ in pairs]), np.concatenate([v for _, v in pairs])

    @property
    def scalar_names(self) -> list[str]:
        return sorted({name for c in self._chunks for name in c.scalars})

    @property
    def series_names(self) -> list[str]:
        return sorted({name for c in self._chunks for name in c.series})

    @property
    def events(self) -> list[dict[str, Any]]:
        """Discrete happenings, e.g. the first module with a NaN: dicts with ``step`` and ``kind``."""
        return [e for c in self._chunks for e in c.events]

    def release(self) -> None:
        """Drop the dense steps x layers x metrics grid built for reading (it is built again on the next read): a
        diagnosis mid-run reads it once per flush, and a long run would otherwise hold a grid its chunks already
        hold, mostly NaN, until the next flush."""
        self._cache = None

    def until(self, step: int) -> Trace:
        """The trace as it stood after ``step``: every measurement at a later step left out (grids, series, scalars,
        events). What a diagnosis mid-run saw, so that it can be compared with the end of the run cut there."""
        cut = Trace(self.meta)
        for c in self._chunks:
            rows = c.steps <= step
            series = {name: {layer: (s[s <= step], v[s <= step]) for layer, (s, v) in per_layer.items()}
                      for name, per_layer in c.series.items()}
            scalars = {name: (s[s <= step], v[s <= step]) for name, (s, v) in c.scalars.items()}
            cut.extend(Chunk(steps=c.steps[rows], layers=c.layers, metrics=c.metrics, values=c.values[rows],
                             series=series, events=[e for e in c.events if e.get("step", 0) <= step],
                             scalars=scalars))
        return cut

    # --- export ---------------------------------------------------------------------------------
    def to_pandas(self):
        """A DataFrame indexed by (step, layer), one column per metric; unmeasured rows dropped."""
        try:
            import pandas as pd  # optional: the pandas extra
        except ImportError as error:
            raise GradmedicError("Trace.to_pandas() needs pandas: pip install pandas") from error
        steps, layers, metrics, values = self._materialise()
        index = pd.MultiIndex.from_product([steps, layers], names=["step", "layer"])
        frame = pd.DataFrame(values.reshape(-1, len(metrics)), index=index, columns=metrics)
        return frame.dropna(how="all")

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write step, layer and one column per metric; rows with nothing measured are left out. A layer name that a
        spreadsheet would run as a formula (``=...``) is written after a ``'`` (gradmedic._terminal.csv_cell)."""

        steps, layers, metrics, values = self._materialise()
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "layer", *metrics])
        for s, step in enumerate(steps):
            for j, layer in enumerate(layers):
                row = values[s, j]
                if np.all(np.isnan(row)):
                    continue
                writer.writerow([int(step), csv_cell(layer), *("" if math.isnan(v) else repr(float(v)) for v in row)])
        return write_atomic(path, buffer.getvalue().encode())

    def save(self, path: str | os.PathLike) -> Path | None:
        """Save to ``path`` (conventionally ``.gmtrace``): a zip of .npy arrays and trace.json.

        Under torch.distributed only rank 0 writes (None elsewhere), unless the Monitor was made with
        ``rank_files=True``: then rank N writes ``NAME.rankN.gmtrace`` beside it."""
        if self.rank_suffix is not None:
            if not self.rank_suffix:
                return None
            path = Path(path)
            path = path.with_name(f"{path.stem}{self.rank_suffix}{path.suffix}")
        steps, layers, metrics, values = self._materialise()
        series_index: dict[str, list[str]] = {}
        arrays: dict[str, np.ndarray] = {"steps.npy": steps, "values.npy": values}
        for name in self.series_names:
            series = self.series(name)
            series_index[name] = list(series)
            for i, (s, v) in enumerate(series.values()):
                arrays[f"series/{name}/{i}.steps.npy"] = s
                arrays[f"series/{name}/{i}.values.npy"] = v
        for name in self.scalar_names:
            arrays[f"scalars/{name}.steps.npy"], arrays[f"scalars/{name}.values.npy"] = self.scalar(name)
        doc = {"format": FORMAT, "version": VERSION, "meta": self.meta.to_dict(), "layers": layers, "metrics": metrics,
               "events": self.events, "series": series_index, "scalars": self.scalar_names}
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("trace.json", json.dumps(doc, indent=1, default=_json_default))
            for name, array in arrays.items():
                out = io.BytesIO()
                np.save(out, np.ascontiguousarray(array), allow_pickle=False)
                zf.writestr(name, out.getvalue())
        return write_atomic(path, buffer.getvalue())  # whole or not at all, fsynced, never through a link

    @classmethod
    def load(cls, path: str | os.PathLike, max_bytes: int = MAX_TRACE_BYTES) -> Trace:
        """Load a saved trace. The file is treated as untrusted: its size, arrays and document are checked
        before anything large is read (``max_bytes`` caps the uncompressed size), and whatever is wrong is
        one GradmedicError line."""
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise bad_argument("max_bytes", "a non-negative int (bytes of uncompressed data)", max_bytes)
        path = Path(path)
        if not path.is_file():
            raise GradmedicError(f"No trace file at {str(path)!r}: check the path (traces are written by "
                                 "Monitor.trace.save).")
        meta, chunk = read_trace(path, max_bytes)
        trace = cls(meta)
        trace.extend(chunk)
        return trace

    # --- display --------------------------------------------------------------------------------
    def table(self, title: str | None = None):
        """A rich Table: one row per layer, the last measured value of the main metrics."""
        from gradmedic._rich import Table, Text  # rich on first use: `import gradmedic` stays light

        layers = self.layers
        columns = [(m, h) for m, h in SUMMARY_COLUMNS if m in self.metrics]
        types = self.meta.get("types", {})
        table = Table(title=title, title_justify="left", caption="dL/dout: RMS gradient w.r.t. the layer's "
                      "output; dx0/dxT: dL/dx at the first over the last time step", caption_justify="left")
        table.add_column("layer", overflow="fold")  # folded on a narrow terminal, never cut short
        table.add_column("type")
        for _, header in columns:
            table.add_column(header, justify="right")
        last = {m: self.last(m) for m, _ in columns}
        for layer in layers:
            cells = [_fmt(last[m].get(layer), m) for m, _ in columns]
            if all(c == "" for c in cells):
                continue
            # names come from the user's code (or a file): Text, never markup or emoji codes
            # and are shown with their control characters escaped (gradmedic._terminal)
            table.add_row(Text(printable(layer, newlines=False) or "(model)"),
                          Text(printable(str(types.get(layer, "")), newlines=False)), *cells)
        return table

    def summary(self) -> str:
        """The per-layer table and the events, as plain text."""
        from gradmedic._rich import Console, Text  # rich on first use: `import gradmedic` stays light

        console = Console(file=io.StringIO(), width=120, color_system=None)
        steps = self.steps
        span = f"steps {int(steps[0])}..{int(steps[-1])}" if len(steps) else "no steps"
        model = printable(str(self.meta.get("model", "a model")), newlines=False)
        console.print(Text(f"gradmedic trace of {model}: {len(steps)} measured {span}"))
        if "loss" in self.scalar_names:
            loss_steps, loss = self.scalar("loss")
            console.print(f"loss {loss[0]:.4g} at step {loss_steps[0]} -> {loss[-1]:.4g} at step {loss_steps[-1]}")
        console.print(self.table())
        for e in self.events[:10]:
            if e.get("kind") == "nonfinite":
                where = "the model's input" if e["phase"] == "input" else f"the {e['phase']} pass at {e['module']!r}"
                console.print(Text(printable(f"step {e['step']}: first {e['value']} in {where}", newlines=False)))
        return console.file.getvalue()

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        metrics = ", ".join(self.metrics[:6]) + (f" and {len(self.metrics) - 6} more" if len(self.metrics) > 6 else "")
        return (f"Trace(steps={len(self.steps)}, layers={len(self.layers)}, metrics=[{metrics}], "
                f"events={len(self.events)}, model={self.meta.get('model', '?')!r})")

    def _repr_html_(self) -> str:
        """Jupyter: span, figures and the folded per-layer table (``gm.diagnose(trace)`` for the findings)."""
        return html_of(self)  # drawn by the report stage (gradmedic.report.notebook registers it)


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return ""
    if metric.endswith("_frac"):
        return f"{100 * value:.0f}%"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.2e}"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


