"""What the attention probe costs: a training step of a GPT-2 (transformers' own architecture from a config, random
weights; eager attention, where the probe reads the softmax, and sdpa, where it bounds the logits from q and k) plain,
as a second plain copy (the control: the noise floor), under the standard preset with and without the attention
probe, and with the attention probe alone at every step (its cost at a measured step).

Every variant runs its own copy of the same model; the variants take one step each in a shuffled order, again and
again (as ``benchmarks/overhead.py`` does), and a cell is the median over repeats of (variant time / plain time in the
same repeat), with the min-max over repeats beside it. Ratios only: no timed assertion anywhere.

    OMP_NUM_THREADS=1 python benchmarks/attention_overhead.py [--repeats 7] [--steps 20] [--attention sdpa]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradmedic as gm  # noqa: E402
from gradmedic.probes import AttentionProbe, build_probes  # noqa: E402

VARIANTS = ("plain", "control", "standard", "standard_without_attention", "attention_every_step")


def gpt2(implementation: str, vocab: int = 4096):
    import transformers  # a benchmark's optional dependency

    config = transformers.GPT2Config(n_layer=12, n_embd=256, n_head=4, n_positions=128, vocab_size=vocab,
                                     bos_token_id=0, eos_token_id=0, attn_implementation=implementation)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, vocab, (8, 128))

    def step(m: nn.Module) -> torch.Tensor:
        return m(ids, labels=ids).loss

    return model, step


def watcher(variant: str, model: nn.Module, opt: torch.optim.Optimizer) -> gm.Monitor | None:
    if variant in ("plain", "control"):
        return None
    if variant == "standard":
        return gm.Monitor(model, opt)
    if variant == "standard_without_attention":
        return gm.Monitor(model, opt, probes=[p for p in build_probes("standard") if p.name != "attention"])
    return gm.Monitor(model, opt, probes=[AttentionProbe(every=1)])


def measure(implementation: str, repeats: int, steps: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    base, loss_of = gpt2(implementation)
    runs = {}
    for variant in VARIANTS:
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        runs[variant] = (model, opt, watcher(variant, model, opt))

    def one(variant: str) -> float:
        model, opt, mon = runs[variant]
        start = time.perf_counter()
        loss = loss_of(model)
        loss.backward()
        if mon is not None:
            mon.step(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for variant in VARIANTS:  # warm-up, not timed
        for _ in range(2):
            one(variant)
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rng = random.Random(0)
    for _ in range(repeats):
        times = dict.fromkeys(VARIANTS, 0.0)
        for _ in range(steps):  # interleaved step by step: drift hits every variant alike
            order = list(VARIANTS)
            rng.shuffle(order)
            for variant in order:
                times[variant] += one(variant)
        for variant in VARIANTS:
            ratios[variant].append(times[variant] / times["plain"])
        ratios.setdefault("_plain_ms", []).append(1000 * times["plain"] / steps)
    for _, _, mon in runs.values():
        if mon is not None:
            mon.close()
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention", nargs="+", default=["eager", "sdpa"], help="attn_implementation(s) to time")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median (min-max) of variant / plain over "
          f"{args.repeats} repeats of {args.steps} interleaved steps")
    print("| attention | plain ms/step | " + " | ".join(VARIANTS[1:]) + " |")
    print("|---|---|" + "---|" * (len(VARIANTS) - 1))
    for implementation in args.attention:
        r = measure(implementation, args.repeats, args.steps)
        cells = [f"{statistics.median(r[v]):.3f} ({min(r[v]):.2f}-{max(r[v]):.2f})" for v in VARIANTS[1:]]
        print(f"| {implementation} | {statistics.median(r['_plain_ms']):.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
