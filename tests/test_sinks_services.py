"""W&B (offline) and MLflow (local file store) as ``log_to`` sinks, used the way a training loop uses them: the
user logs its own loss at every step as well. Every gradmedic value must be in the run's history afterwards,
read back from the files the library wrote (not from the sink's own bookkeeping)."""

import json
import struct
import time

import numpy as np
import pytest
import torch
from torch import nn

import gradmedic as gm

STEPS, FLUSH = 11, 4


def train(log_to, user_log, steps=STEPS):
    """A small tanh MLP; ``user_log(step, loss)`` is the user's own logging, called at every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gm.Monitor(model, opt, every=1, flush_every=FLUSH, log_to=log_to)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        loss = model(torch.randn(8, 4, generator=gen)).square().mean()
        loss.backward()
        mon.step(loss)
        opt.step()
        opt.zero_grad()
        if user_log is not None:
            user_log(step, loss.item())
    mon.close()
    return mon.trace


def expected(trace):
    """step -> {tag: value} straight from the trace (an independent path from the sink's records)."""
    out = {int(s): {} for s in trace.steps}
    for metric in trace.metrics:
        if metric == "forward_index":
            continue
        grid = trace.metric(metric)
        for i, step in enumerate(trace.steps):
            for j, layer in enumerate(trace.layers):
                if np.isfinite(grid[i, j]):
                    out[int(step)][f"gradmedic/{metric}/{layer}" if layer else f"gradmedic/{metric}"] = grid[i, j]
    for name in ("loss", "lr"):
        for step, value in zip(*trace.scalar(name), strict=True):
            out.setdefault(int(step), {})[f"gradmedic/{name}"] = value
    return out


def assert_all_there(got, trace):
    want = expected(trace)
    assert sorted(got) == sorted(want) == list(range(STEPS))
    n = 0
    for step, values in want.items():
        assert set(values) <= set(got[step]), f"step {step}: missing {sorted(set(values) - set(got[step]))[:5]}"
        for key, value in values.items():
            np.testing.assert_allclose(got[step][key], value, rtol=1e-6, err_msg=f"{key} at step {step}")
            n += 1
    assert n > STEPS * 10  # per-layer metrics, not only the loss


# --- W&B ------------------------------------------------------------------------------------------------------
def wandb_history(run_dir, timeout_s=60.0):
    """The history rows of an offline run, read from its ``.wandb`` file: LevelDB's log format (32 KiB blocks of
    records, each a 7-byte header: CRC32, length, kind; kinds 1 full, 2 first, 3 middle, 4 last) after a 7-byte
    ``:W&B`` file header, each record a ``wandb_internal_pb2.Record``.

    ``wandb.finish()`` returns before W&B's service process has written the file's tail (a test that read at
    once missed the last rows one run in three), so the file is read again until its ``exit`` record is there."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        rows, done = _read_wandb(path.read_bytes())
        if done or time.monotonic() > deadline:
            assert done, f"{path} has no exit record after {timeout_s} s"
            return rows
        time.sleep(0.1)


def _read_wandb(data):
    from wandb.proto import wandb_internal_pb2

    pos, part, rows, done = 7, b"", [], False
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            which = record.WhichOneof("record_type")
            done = done or which == "exit"
            if which == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows, done


@pytest.fixture
def wandb_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="gradmedic-test", dir=str(tmp_path), settings=wandb.Settings(console="off"))
    yield wandb, run
    if wandb.run is not None:
        wandb.finish()


def by_gradmedic_step(rows):
    return {int(r["gradmedic/step"]): r for r in rows if "gradmedic/step" in r}


@pytest.mark.parametrize("user", ["step=", "no step", "nothing", "run"])
def test_wandb_keeps_every_value_beside_the_users_own_logging(wandb_run, tmp_path, user, recwarn):
    wandb, run = wandb_run
    user_log = {"step=": lambda s, loss: wandb.log({"train/loss": loss}, step=s),
                "no step": lambda s, loss: wandb.log({"train/loss": loss}),
                "nothing": None, "run": lambda s, loss: run.log({"train/loss": loss}, step=s)}[user]
    trace = train(run if user == "run" else wandb.log, user_log)
    wandb.finish()
    rows = wandb_history(tmp_path)
    assert_all_there(by_gradmedic_step(rows), trace)
    if user_log is not None:  # the user's own values are all kept too
        assert [r["train/loss"] for r in rows if "train/loss" in r] == pytest.approx(trace.scalar("loss")[1], 1e-6)
    if user == "step=":  # on the user's own step axis: one row per training step, nothing dropped
        assert [r["_step"] for r in rows] == list(range(len(rows)))
    assert not [w for w in recwarn if "gradmedic" in str(w.message)]


def test_wandb_log_before_init_says_so_in_one_warning(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    if wandb.run is not None:
        wandb.finish()
    with pytest.warns(gm.GradmedicWarning, match=r"log_to failed .*wandb.init\(\)"):
        train(wandb.log, None, steps=5)


# --- MLflow -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["files", "sqlite"])
def test_mlflow_local_store_keeps_every_value(tmp_path, monkeypatch, store):
    """MLflow takes past steps, so a flush's records go in as they are. MLflow 3 puts its file store in
    maintenance mode (an opt-in) and points to SQLite; both are local files."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri() if store == "files" else f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as active:
        trace = train(mlflow.log_metrics, lambda s, loss: mlflow.log_metric("train/loss", loss, step=s))
    client = mlflow.tracking.MlflowClient()
    keys = client.get_run(active.info.run_id).data.metrics
    got: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(active.info.run_id, key):
            got.setdefault(m.step, {})[key] = m.value
    train_loss = {s: v.pop("train/loss") for s, v in got.items()}
    assert_all_there(got, trace)
    assert list(train_loss.values()) == pytest.approx(trace.scalar("loss")[1], 1e-6)


# --- TensorBoard through tensorboardX, the other writer the README names -----------------------------------
def test_tensorboardx_writer_keeps_every_value(tmp_path):
    tensorboardX = pytest.importorskip("tensorboardX")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = tensorboardX.SummaryWriter(logdir=str(tmp_path))
    trace = train(writer, lambda s, loss: writer.add_scalar("train/loss", loss, s))
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got: dict[int, dict[str, float]] = {}
    for key in acc.Tags()["scalars"]:
        for event in acc.Scalars(key):
            got.setdefault(event.step, {})[key] = event.value
    train_loss = {s: v.pop("train/loss") for s, v in got.items()}
    want = expected(trace)
    assert sorted(got) == sorted(want)
    for step, values in want.items():
        for key, value in values.items():
            np.testing.assert_allclose(got[step][key], value, rtol=1e-6)  # float32 in the event file
    assert list(train_loss.values()) == pytest.approx(trace.scalar("loss")[1], 1e-6)


def test_lightning_wandb_logger_gets_every_value_through_the_callback(wandb_run, tmp_path):
    """The README: the Lightning callback's numbers reach a W&B logger "without extra setup". WandbLogger logs
    without ``step=`` (its own axis, ``trainer/global_step``), so a flush's past steps are kept."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.loggers import WandbLogger

    from gradmedic.integrations.lightning import GradmedicCallback
    from tests.test_lightning import Net

    wandb, run = wandb_run
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8 * STEPS, 8, generator=gen),
                                          torch.randint(0, 3, (8 * STEPS,), generator=gen))
    callback = GradmedicCallback(every=1, flush_every=FLUSH, verbose=False)
    logger = WandbLogger(experiment=run, save_dir=str(tmp_path))  # else the trace is saved in the working dir
    trainer = L.Trainer(max_steps=STEPS, logger=logger, callbacks=[callback], log_every_n_steps=1, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=8))
    trace = callback.result.trace
    wandb.finish()
    rows = wandb_history(tmp_path)
    got: dict[int, dict[str, float]] = {}
    for r in rows:
        if any(k.startswith("gradmedic/") for k in r):
            got.setdefault(int(r["trainer/global_step"]), {}).update(r)
    assert_all_there(got, trace)
    assert len([r for r in rows if "train_loss" in r]) == STEPS
