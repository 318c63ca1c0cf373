"""A real transformers.Trainer (tiny GPT-2 from a config, random tokens, CPU, no network) with the
one-line callback: the recorded total gradient norm is the Trainer's pre-clip norm, the recorded loss is
the Trainer's logged loss, with and without gradient accumulation; no hook is left after training."""

import numpy as np
import pytest
import torch

import gradmedic as gm
from tests.helpers import hook_state

transformers = pytest.importorskip("transformers")
from gradmedic.integrations.huggingface import GradmedicCallback  # noqa: E402

STEPS = 4
MAX_GRAD_NORM = 0.2  # below the tiny model's gradient norms (0.6-3), so clipping acts at every step


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, length=16, vocab=64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config)


class NoLossKwargs(torch.nn.Module):
    """A model whose forward takes no **kwargs: the Trainer gives it no num_items_in_batch and divides each
    micro-batch's (mean) loss by the number of micro-batches instead."""

    def __init__(self):
        super().__init__()
        self.transformer = tiny_gpt2().transformer
        self.lm_head = torch.nn.Linear(32, 64, bias=False)

    def forward(self, input_ids, labels):
        logits = self.lm_head(self.transformer(input_ids).last_hidden_state)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return {"loss": loss, "logits": logits}


def train(tmp_path, accumulation, report_to=(), make_model=tiny_gpt2, every=1, **callback_kwargs):
    model = make_model()
    before = hook_state(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=STEPS, logging_steps=1, max_grad_norm=MAX_GRAD_NORM, learning_rate=1e-3, report_to=list(report_to),
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    callback = GradmedicCallback(every=every, **callback_kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(4 * accumulation * STEPS),
                                   callbacks=[callback])
    trainer.train()
    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    return model, before, callback, logged


@pytest.mark.parametrize("accumulation,make_model", [(1, tiny_gpt2), (4, tiny_gpt2), (4, NoLossKwargs)])
def test_trainer_pre_clip_norm_and_logged_loss(tmp_path, accumulation, make_model, capsys):
    model, before, callback, logged = train(tmp_path, accumulation, make_model=make_model, report=accumulation == 1)
    trace = gm.Trace.load(tmp_path / "gradmedic.gmtrace")  # saved at the end of training
    assert [h["step"] for h in logged] == list(range(1, STEPS + 1))
    hf_norm = np.array([h["grad_norm"] for h in logged])
    assert (hf_norm > 2 * MAX_GRAD_NORM).all()  # clipping really changed the gradients
    ours = trace.metric("total_grad_norm")[:, trace.layers.index("")]
    np.testing.assert_allclose(ours, hf_norm, rtol=1e-5)  # float32 norms, summed in another order
    steps, loss = trace.scalar("loss")
    assert list(steps) == list(range(STEPS))
    np.testing.assert_allclose(loss, [h["loss"] for h in logged], rtol=1e-5)
    # the optimizer's learning rate at each update, as the Trainer logs it (before the scheduler steps)
    np.testing.assert_allclose(trace.scalar("lr")[1], [h["learning_rate"] for h in logged], rtol=1e-6)
    # nothing left behind: module hooks, tensor hooks, post-accumulate-grad hooks
    assert hook_state(model) == before
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    assert (tmp_path / "gradmedic-report.html").is_file() == (accumulation == 1)
    assert "finding(s)" in capsys.readouterr().out
    assert callback.result is not None and "transformer.h.0.attn.c_attn" in trace.layers
    assert callback._scaled == (make_model is tiny_gpt2)  # both of the Trainer's loss conventions were exercised


def test_update_ratio_when_measuring_every_other_step(tmp_path):
    # every=2: the weights are snapshotted at the end of the step before each measured one, before the optimizer
    # steps (taken after it, the snapshot equalled the measured step's weights and the ratio read 0). Training is
    # the same with every=1 or 2 (the callback changes nothing), so the ratio at step 2 is the same too
    ratios = {}
    for every in (1, 2):
        train(tmp_path / str(every), accumulation=2, every=every, report=False, verbose=False)
        trace = gm.Trace.load(tmp_path / str(every) / "gradmedic.gmtrace")
        ratios[every] = trace.metric("update_to_weight")[list(trace.steps).index(2)]
    measured = ~np.isnan(ratios[1])
    assert measured.sum() >= 10 and (ratios[2][measured] > 0).all()
    np.testing.assert_allclose(ratios[2][measured], ratios[1][measured], rtol=1e-5)


def test_trainer_logs_on_its_step_axis_and_to_its_tensorboard(tmp_path, monkeypatch):
    got = {}
    train(tmp_path, 1, log_to=lambda step, metrics: got.update({step: metrics}))
    assert sorted(got) == list(range(1, STEPS + 1))  # the Trainer's global_step
    assert "gradmedic/grad_norm/transformer.h.1.mlp.c_fc" in got[1]
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    _, _, _, logged = train(tmp_path / "run", 1, report_to=["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb" / "gradmedic"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("gradmedic/total_grad_norm")
    assert [e.step for e in events] == [h["step"] for h in logged]
    np.testing.assert_allclose([e.value for e in events], [h["grad_norm"] for h in logged], rtol=1e-5)
