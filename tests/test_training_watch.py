"""Watching a training run (issue 26): nothing non-finite goes unseen, findings are said while it trains (once, and
again only when worse), a mid-run diagnosis equals the end-of-run trace cut at that step, and a real Hugging Face
Trainer and a Lightning Trainer stop on an error with ``stop_on="error"``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm


def _nan_run(steps: int, flush_every: int = 100, bad_from: int = 5, on_finding=None, each_step=None, **kwargs):
    """A ReLU MLP fed an inf from ``bad_from`` on: its loss is NaN from that step (the run the issue names)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = gm.Monitor(model, opt, flush_every=flush_every, on_finding=on_finding, **kwargs)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        if step >= bad_from:
            x[0, 0] = float("inf")
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (32,), generator=gen))
        loss.backward()
        monitor.step(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if each_step is not None:
            each_step(step, monitor)
    return monitor, losses


def test_a_run_that_goes_nan_is_an_error_naming_its_first_step_under_the_default_preset():
    monitor, losses = _nan_run(60)
    first_bad = next(i for i, v in enumerate(losses) if not np.isfinite(v))  # independent: the losses themselves
    report = monitor.diagnose()
    assert not report.healthy
    nan = report.of_kind("nonfinite")[0]
    assert nan.severity == "error" and nan.evidence["step"] == first_bad == 5
    assert f"from step {first_bad}" in nan.message
    steps, values = monitor.trace.scalar("loss")  # the NaN losses are kept, not dropped
    assert list(steps) == list(range(60)) and np.isnan(values[first_bad:]).all()


def test_the_nan_probe_is_asked_for_the_step_after_a_flush_saw_a_nan_loss():
    monitor, _ = _nan_run(30, flush_every=10)
    nan = monitor.diagnose().of_kind("nonfinite")[0]
    # its period is 100 steps: without the request it would not have run before step 100; the loss sentinel saw the
    # NaN loss at step 5 and flushed there, so the probe looked at step 6 (at the flush of step 9 it would be 10)
    assert nan.evidence["probe_step"] == 6 and nan.evidence["phase"] == "input"  # the inf comes with the batch
    assert "model's input holds INF at step 6" in nan.message and nan.layers == []


def test_findings_are_said_while_it_trains_once_each():
    said = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _nan_run(60, flush_every=10, on_finding=said.append)
    lines = [str(w.message) for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)]
    # said at step 5 itself: the loss sentinel flushes at the NaN loss rather than waiting for the flush of step 9
    assert lines and lines[0].startswith("gradmedic at step 5: error nonfinite")
    # said when first seen (no probe yet) and once more when the probe found where it comes from (the batch): not at
    # every flush
    assert len(lines) == len(said) == 2
    assert "model's input" not in said[0].message and "model's input" in said[1].message


def test_live_false_says_nothing_and_a_healthy_run_says_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _nan_run(30, flush_every=10, live=False)
        _nan_run(30, flush_every=10, bad_from=10**6)
    assert not [w for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)]


def _kinds(report: gm.Report) -> list[tuple[str, str, tuple[str, ...], str]]:
    return [(f.kind, f.severity, tuple(f.layers), f.message) for f in report.findings]


def test_a_diagnosis_mid_run_equals_the_end_trace_cut_at_that_step():
    mid = {}

    def at_step(step, monitor):
        if step in (9, 19, 29):  # right after a scheduled flush: reading the trace flushes nothing new
            mid[step] = _kinds(gm.diagnose(monitor.trace))

    monitor, _ = _nan_run(40, flush_every=10, each_step=at_step)
    end = monitor.trace
    assert mid[9] and mid[9] != mid[29]  # the findings changed over the run (the NaN probe named the module)
    for step, kinds in mid.items():
        assert _kinds(gm.diagnose(end.until(step))) == kinds


# --- the trainers -----------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


class _NanAfter(torch.utils.data.Dataset):
    """Random tokens for a tiny GPT-2; the labels are fine, the model's embedding is poisoned by the callback below."""

    def __init__(self, n: int = 64):
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_a_hugging_face_trainer_run_that_goes_bad_is_told_and_stopped(tmp_path, capsys):
    from gradmedic.integrations.huggingface import GradmedicCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)

    class Poison(transformers.TrainerCallback):
        """At step 5 the weights go NaN (what a too-hot step or a bad batch does)."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    model.transformer.wte.weight[3] = float("nan")

    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=60,
                                          learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, logging_steps=1, seed=0)
    callback = GradmedicCallback(stop_on="error", verbose=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_NanAfter(), callbacks=[Poison(), callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)]
    assert any("nonfinite" in line for line in said)  # told while it trained
    assert callback.stop.tripped is not None and callback.stop.tripped.kind == "nonfinite"
    assert trainer.state.global_step < 30  # stopped at the first flush after the NaN, not at max_steps (60)
    stopped = [line for line in capsys.readouterr().err.splitlines() if "stopping training" in line]
    assert len(stopped) == 1 and "stop_on='error'" in stopped[0] and "nonfinite" in stopped[0]  # said once, why


class _Copy(torch.utils.data.Dataset):
    """A copy task: 8 random tokens, then the same 8 again (the second half is learnable only by attending back)."""

    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        half = torch.randint(2, 32, (8,), generator=torch.Generator().manual_seed(i))
        ids = torch.cat([half, half])
        return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_healthy_transformer_that_plateaus_before_it_learns_is_not_warned(tmp_path, seed, one_thread):
    """A GPT-NeoX under SDPA on the copy task sits at chance for about 100 steps, then learns while its attention
    sharpens (the queries' and keys' bound on the logits grows x5-8 per 100 steps to ~50-80): a plateau and the
    growth of a learning attention, neither a stall nor a drift toward divergence. Both were warned of before."""
    from gradmedic.integrations.huggingface import GradmedicCallback

    torch.manual_seed(seed)
    config = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    model = transformers.GPTNeoXForCausalLM(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=260,
                                          learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, logging_steps=1000, seed=seed)
    callback = GradmedicCallback(verbose=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Copy(), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)]
    assert said == []
    trace = gm.Trace.load(tmp_path / "gradmedic.gmtrace")
    _, loss = trace.scalar("loss")
    assert np.median(loss[-20:]) < 0.85 * loss[0]  # it learned (chance is ln 30 = 3.4; it ends near 2.6)
    bound = trace.metric("attn_logit_max")
    assert np.nanmax(bound) > 40  # the attention sharpened: the case the watch level is for


def test_a_healthy_trainer_run_with_a_warmup_from_zero_is_not_told_stalled_nor_stopped(tmp_path, one_thread):
    """Hugging Face's linear warmup gives lr 0 at step 0, so the first look's update (step 1) is zero: a schedule, not
    a stall. It was said as an error at step 1, and stop_on="error" ended the healthy run there."""
    from gradmedic.integrations.huggingface import GradmedicCallback

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=60,
                                          warmup_steps=30, learning_rate=1e-3, report_to=[], use_cpu=True,
                                          save_strategy="no", disable_tqdm=True, logging_steps=1000, seed=0)
    callback = GradmedicCallback(stop_on="error", verbose=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_NanAfter(), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if issubclass(w.category, gm.GradmedicFindingWarning)]
    assert said == [] and callback.stop.tripped is None and trainer.state.global_step == 60


def test_a_lightning_run_that_goes_bad_is_told_and_stopped(tmp_path):
    L = pytest.importorskip("lightning")
    from gradmedic.integrations.lightning import GradmedicCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.global_step >= 5:
                x = x.clone()
                x[0, 0] = float("inf")  # a NaN from the data
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 8, generator=gen), torch.randint(0, 3, (512,), generator=gen)
    data = torch.utils.data.TensorDataset(x, y)
    callback = GradmedicCallback(stop_on="error", verbose=False)
    trainer = L.Trainer(max_steps=100, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        accelerator="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=4))
    assert any(issubclass(w.category, gm.GradmedicFindingWarning) and "nonfinite" in str(w.message) for w in caught)
    assert callback.stop.tripped is not None and callback.stop.tripped.kind == "nonfinite"
    assert trainer.global_step < 40  # not max_steps (100)
