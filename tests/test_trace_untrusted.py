"""Trace files are untrusted input: crafted documents, arrays, zips and bombs give one GradmedicError line.

The bombs are real deflate streams built here (a few MB on disk, gigabytes declared) and are fed to
``gradmedic report`` in a subprocess under an address-space limit, so a reader that inflated them would
die of MemoryError instead of passing.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradmedic as gm
from gradmedic._trace_file import MAX_TRACE_BYTES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> dict[str, bytes]:
    """The members of a real saved trace (with series, scalars and a NaN event), to be tampered with."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)),
                           "rnn": nn.RNN(2, 3, batch_first=True)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gm.Monitor(model, opt, preset="full") as mon:
        for step in range(3):
            x = torch.randn(4, 3)
            if step == 2:
                x[0, 0] = float("nan")
            loss = model["mlp"](x).sum() + model["rnn"](torch.randn(4, 5, 2))[0][:, -1].sum()
            loss.backward()
            mon.step(loss)
            opt.step()
            opt.zero_grad()
    path = mon.trace.save(tmp_path_factory.mktemp("trace") / "run.gmtrace")
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _npy_header(dtype: str, shape: tuple, fortran: bool = False) -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": fortran, "shape": shape})
    return out.getvalue()


def _doc(members: dict[str, bytes]) -> dict:
    return json.loads(members["trace.json"])


def _with_doc(members: dict[str, bytes], **changes) -> dict[str, bytes]:
    doc = _doc(members)
    for key, value in changes.items():
        if value is _DELETE:
            doc.pop(key, None)
        else:
            doc[key] = value
    return {**members, "trace.json": json.dumps(doc).encode()}


_DELETE = object()


def _assert_one_line_error(path, match: str | None = None) -> str:
    with pytest.raises(gm.GradmedicError) as info:
        gm.Trace.load(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    if match is not None:
        assert match in message, message
    return message


# --- the fifteen crafted files of the issue, and a few more --------------------------------------------------
def _cases(m: dict[str, bytes]) -> dict[str, tuple[dict[str, bytes], str]]:
    doc = _doc(m)
    steps = np.load(io.BytesIO(m["steps.npy"]))
    values = np.load(io.BytesIO(m["values.npy"]))
    deep = b"[" * 100_000 + b"]" * 100_000
    return {
        "layers is a number": (_with_doc(m, layers=5), "'layers' should be a list"),
        "meta is a list": (_with_doc(m, meta=[1, 2]), "'meta' should be an object"),
        "events is a string": (_with_doc(m, events="abc"), "'events' should be a list"),
        "no meta": (_with_doc(m, meta=_DELETE), "has no 'meta'"),
        "a list at the top": ({**m, "trace.json": b"[1, 2, 3]"}, "should hold an object"),
        "deep nesting": ({**m, "trace.json": deep}, "nested"),
        "deep nesting in meta": (_with_doc(m, meta={"x": json.loads("[" * 200 + "]" * 200)}), "nested"),
        "not JSON": ({**m, "trace.json": b"\xff\xfe{"}, "not JSON"),
        "version is a string": (_with_doc(m, version="1"), "'version'"),
        "newer version": (_with_doc(m, version=99), "newer gradmedic"),
        "an event without a step": (_with_doc(m, events=[{"kind": "nonfinite"}]), "events[0].step"),
        "an event with a float step": (_with_doc(m, events=[{**doc["events"][0], "step": 1.5}]), "events[0].step"),
        "meta.types not names": (_with_doc(m, meta={**doc["meta"], "types": [1]}), "meta.types"),
        "metrics twice": (_with_doc(m, metrics=doc["metrics"][:1] * 2), "twice"),
        "series not a dict": (_with_doc(m, series=["x"]), "'series' should be an object"),
        "values of strings": ({**m, "values.npy": _npy(values.astype(str))}, "should hold numbers"),
        "values 1-D": ({**m, "values.npy": _npy(values.reshape(-1))}, "has shape"),
        "values of the wrong shape": ({**m, "values.npy": _npy(values[:, :1])}, "has shape"),
        "float steps": ({**m, "steps.npy": _npy(steps.astype(float))}, "should hold integers"),
        "steps 2-D": ({**m, "steps.npy": _npy(steps.reshape(1, -1))}, "1-dimensional"),
        "object array": ({**m, "steps.npy": _npy_header("|O", (3,)) + b"\0" * 24}, "should hold integers"),
        "header asks for 7.28 TiB": ({**m, "values.npy": _npy_header("<f8", (10**12, 1, 1)) + b"\0" * 64},
                                     "has shape"),
        "header larger than its data": ({**m, "steps.npy": _npy_header("<i8", (10**9,)) + b"\0" * 8},
                                        "declares shape"),
        "not a .npy": ({**m, "steps.npy": b"hello"}, "not a .npy"),
        "a missing member": ({k: v for k, v in m.items() if k != "values.npy"}, "'values.npy' is missing"),
        "a missing series member": ({k: v for k, v in m.items() if not k.startswith("series/")}, "missing"),
    }


CASE_NAMES = list(_cases({"trace.json": b'{"events": [{}], "metrics": ["m"], "meta": {}}',
                          "steps.npy": _npy(np.zeros(1, np.int64)), "values.npy": _npy(np.zeros((1, 1, 1)))}))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_a_crafted_file_is_one_line(members, case, tmp_path):
    files, match = _cases(members)[case]
    path = tmp_path / "crafted.gmtrace"
    _zip(path, files)
    _assert_one_line_error(path, match)


def test_a_corrupt_deflate_stream_is_one_line(members, tmp_path):
    path = tmp_path / "corrupt.gmtrace"
    _zip(path, members)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("values.npy")
    start = info.header_offset + 30 + len(info.filename) + 10  # inside the member's deflate stream
    data[start:start + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))
    _assert_one_line_error(path)


def test_the_genuine_file_still_loads(members, tmp_path):
    path = tmp_path / "ok.gmtrace"
    _zip(path, members)
    trace = gm.Trace.load(path)
    assert trace.events and trace.series("time_grad_rms") and "loss" in trace.scalar_names
    assert "mlp.0" in trace.summary()


def test_fortran_order_and_other_numeric_dtypes_load(members, tmp_path):
    values = np.load(io.BytesIO(members["values.npy"]))
    steps = np.load(io.BytesIO(members["steps.npy"]))
    path = tmp_path / "f.gmtrace"
    _zip(path, {**members, "values.npy": _npy(np.asfortranarray(values.astype(">f4"))),
                "steps.npy": _npy(steps.astype(np.uint16))})
    trace = gm.Trace.load(path)
    np.testing.assert_allclose(trace.values, values.astype(np.float32), equal_nan=True)
    assert trace.steps.dtype == np.int64


# --- bombs ------------------------------------------------------------------------------------------------
_BLOCK = 1 << 20


def _zeros_bomb(header: bytes, blocks: int) -> tuple[bytes, int, int]:
    """A raw deflate stream of ``header`` then zeros, ``blocks`` MiB in all: (stream, crc32, size).
    Full-flush blocks of zeros compress identically, so the stream is built from one of them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(header + bytes(_BLOCK - len(header))) + packer.flush(zlib.Z_FULL_FLUSH)
    block = packer.compress(bytes(_BLOCK)) + packer.flush(zlib.Z_FULL_FLUSH)
    last = packer.flush()
    crc = zlib.crc32(header + bytes(_BLOCK - len(header)))
    zeros = bytes(64 * _BLOCK)
    for _ in range((blocks - 1) // 64):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(((blocks - 1) % 64) * _BLOCK), crc)
    return first + block * (blocks - 1) + last, crc, blocks * _BLOCK


def _raw_zip(path, entries: list[tuple[str, bytes, int, int]]) -> None:
    """A zip written by hand from (name, raw deflate stream, crc32, uncompressed size) entries."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, stream, crc, size in entries:
        offset = local.tell()
        encoded = name.encode()
        local.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(stream), size,
                                len(encoded), 0) + encoded + stream)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(stream), size,
                                  len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    directory = central.getvalue()
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(entries), len(entries), len(directory), local.tell(), 0)
    with open(path, "wb") as f:
        f.write(local.getvalue() + directory + end)


def _deflated(name: str, data: bytes) -> tuple[str, bytes, int, int]:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return name, packer.compress(data) + packer.flush(), zlib.crc32(data), len(data)


def _bomb(path, members: dict[str, bytes], mib: int) -> None:
    """A trace whose values.npy is an honest deflate of a consistent .npy of zeros, ``mib`` MiB long."""
    rows = mib * _BLOCK // 8
    header = b""
    for _ in range(3):  # the header's length depends on the digits of the row count
        header = _npy_header("<f8", (rows, 1, 1))
        rows = (mib * _BLOCK - len(header)) // 8
    doc = {**_doc(members), "layers": ["a"], "metrics": ["grad_norm"], "series": {}, "scalars": [], "events": []}
    _raw_zip(path, [_deflated("trace.json", json.dumps(doc).encode()),
                    # the steps match the grid only for a small file (a big one is refused before they are read)
                    _deflated("steps.npy", _npy(np.arange(rows if rows < 10**6 else 1, dtype=np.int64))),
                    ("values.npy", *_zeros_bomb(header, mib))])


def _report_under_limit(path, tmp_path, limit: int) -> tuple[int, str, str, int]:
    """``gradmedic report`` in a subprocess with RLIMIT_AS; (exit code, stdout, stderr, peak RSS bytes)."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gradmedic.cli", "report", str(path), "-o",
                             str(tmp_path / "r.html")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=cap, env=env, text=True)
    out, err = proc.communicate(timeout=120)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc.returncode, out, err, usage.ru_maxrss * 1024


AS_LIMIT = 3 * 1024**3 // 2  # 1.5 GiB: `gradmedic report` of a genuine trace runs in it (torch, matplotlib)


@pytest.mark.slow
@pytest.mark.parametrize("mib,why", [(3500, "over the 2.00 GiB limit"), (1900, "zip bomb")])
def test_a_bomb_through_gradmedic_report_is_one_line_in_bounded_memory(members, tmp_path, mib, why):
    path = tmp_path / "bomb.gmtrace"
    _bomb(path, members, mib)
    assert path.stat().st_size < 4 * 1024**2  # a few MB on disk
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("values.npy").file_size == mib * _BLOCK  # declaring 1.9 or 3.4 GiB
    assert (mib * _BLOCK > MAX_TRACE_BYTES) == (why != "zip bomb")
    code, out, err, peak = _report_under_limit(path, tmp_path, AS_LIMIT)
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and why in err, err
    assert peak < AS_LIMIT


def test_a_bomb_loads_when_trusted_explicitly(members, tmp_path):
    """The limits are a default, not a wall: a small honest file of zeros beyond a tiny cap is refused
    with the fix in the message, and loads when the caller raises the cap."""
    path = tmp_path / "zeros.gmtrace"
    _bomb(path, members, 2)
    assert gm.Trace.load(path).values.shape == ((2 * _BLOCK - 128) // 8, 1, 1)  # under every default limit
    with pytest.raises(gm.GradmedicError, match="max_bytes=") as info:
        gm.Trace.load(path, max_bytes=_BLOCK)
    assert "\n" not in str(info.value)
    with pytest.raises(gm.GradmedicError, match="Argument max_bytes"):
        gm.Trace.load(path, max_bytes=-1)


# --- property tests ----------------------------------------------------------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
KEYS = ["format", "version", "meta", "layers", "metrics", "events", "series", "scalars"]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _loads_or_one_line(tmp_path, files: dict[str, bytes]) -> None:
    path = tmp_path / "p.gmtrace"
    _zip(path, files)
    try:
        trace = gm.Trace.load(path)
    except gm.GradmedicError as error:
        assert "\n" not in str(error)
        return
    # what loads is a trace like any other: it materialises, prints and is diagnosed
    assert trace.values.shape == (len(trace.steps), len(trace.layers), len(trace.metrics))
    trace.summary()
    gm.diagnose(trace)


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(KEYS), JSON | st.just(_DELETE), min_size=1, max_size=3))
def test_property_documents(members, tmp_path, changes):
    _loads_or_one_line(tmp_path, _with_doc(members, **changes))


@PROPERTY
@given(top=JSON)
def test_property_whole_documents(members, tmp_path, top):
    _loads_or_one_line(tmp_path, {**members, "trace.json": json.dumps(top).encode()})


DTYPES = ["<i8", "<u2", "<f8", ">f4", "<f2", "|b1", "<c16", "<U3", "|S2", "|V8", "<M8[s]", "<m8[s]"]


@PROPERTY
@given(member=st.sampled_from(["steps.npy", "values.npy", "scalars/loss.values.npy", "scalars/lr.steps.npy",
                               "series/time_grad_rms/0.values.npy", "series/time_grad_rms/0.steps.npy"]),
       dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 4), max_size=4),
       fortran=st.booleans(), cut=st.integers(-8, 8))
def test_property_arrays(members, tmp_path, member, dtype, shape, fortran, cut):
    body = np.zeros(int(np.prod(shape)), dtype=np.dtype(dtype)).tobytes()
    body = body[:cut] if cut < 0 else body + bytes(cut)
    _loads_or_one_line(tmp_path, {**members, member: _npy_header(dtype, tuple(shape), fortran) + body})


@PROPERTY
@given(data=st.data())
def test_property_corrupted_bytes(members, tmp_path, data):
    path = tmp_path / "c.gmtrace"
    _zip(path, members)
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        gm.Trace.load(path)
    except gm.GradmedicError as error:
        assert "\n" not in str(error)
