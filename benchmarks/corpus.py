"""How long ``gm.check`` takes on each family of the corpus of real architectures (tests/corpus.py), and its
verdict: one check per family at init, timed on one thread, beside a plain forward+backward of the same
model (the ratio is what transfers across machines).

    python benchmarks/corpus.py      # writes its section of BENCHMARKS.md
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gradmedic as gm  # noqa: E402
from benchmarks._markdown import replace_section  # noqa: E402
from gradmedic._inputs import split_inputs  # noqa: E402
from gradmedic.check import _forward_loss  # noqa: E402
from tests.corpus import hf_families, torch_families  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- corpus:begin -->", "<!-- corpus:end -->"
REPEATS = 3


def _plain(model, inputs, kwargs) -> float:
    args, kw = split_inputs(inputs)
    start = time.perf_counter()
    loss, _ = _forward_loss(model, args, kw, kwargs.get("targets"), kwargs.get("loss_fn"))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for name, build in hf_families() + torch_families():
        model, inputs, kwargs = build()
        gm.check(model, inputs, **kwargs)  # warm-up (lazy inits, first-call costs)
        times, plain = [], []
        for _ in range(REPEATS):
            start = time.perf_counter()
            report = gm.check(model, inputs, **kwargs)
            times.append(time.perf_counter() - start)
            plain.append(_plain(model, inputs, kwargs))
        worst = ", ".join(f"{f.severity}:{f.kind}" for f in report.findings if f.severity != "info")
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, statistics.median(times), statistics.median(plain),
                     "healthy" if report.healthy else worst))
        print(rows[-1], flush=True)
    lines = [MARK_BEGIN, "## gm.check on real architectures (issue 9)", "",
             "`python benchmarks/corpus.py`: each family of `tests/corpus.py` built from its `transformers` "
             "config (random weights, tiny: hidden 32-64, 2-4 blocks, sequence 16, images 32x32, batch 4) or "
             f"from torch.nn, checked at init on one thread (median of {REPEATS}); `plain` is one forward+backward "
             "of the same model and loss.", "",
             "| family | parameters | check (s) | plain f+b (s) | ratio | verdict at init |",
             "|---|---|---|---|---|---|"]
    for name, params, t, p, verdict in rows:
        lines.append(f"| {name} | {params:,} | {t:.2f} | {p:.3f} | {t / p:.0f}x | {verdict} |")
    lines.append(MARK_END)
    replace_section(ROOT / "BENCHMARKS.md", MARK_BEGIN, MARK_END, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
