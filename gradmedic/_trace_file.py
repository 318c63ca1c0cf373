"""Reading a ``.gmtrace`` written by someone else: every byte of it is untrusted input.

A trace is a zip of ``.npy`` arrays and one JSON document. Before anything is decompressed the zip's
central directory is checked: the total uncompressed size against a cap, and every large member's
compression ratio (a few MB of deflated zeros can declare gigabytes). Each array is then read from the
zip stream straight into one preallocated buffer, after its ``.npy`` header (dtype, shape) has been
checked against the JSON document and against the member's size, so a header cannot ask for more
memory than the member holds. The document is checked against the schema that ``Trace.save`` writes.
Whatever is wrong becomes one ``GradmedicError`` line naming it; nothing is unpickled or executed.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from gradmedic._errors import GradmedicError, first_line
from gradmedic.probes.base import Chunk

__all__ = ["MAX_TRACE_BYTES", "read_trace"]

FORMAT = "gradmedic-trace"
VERSION = 1

# Total uncompressed size of a trace file we agree to read. A long run of a large model, 10,000 measured
# steps x 1,000 layers x 13 metrics in float64, is 1.0 GiB; twice that leaves room and still fits the
# memory of a laptop (the grid is held twice while a trace is built). Pass max_bytes to go beyond it.
MAX_TRACE_BYTES = 2 * 1024**3
# trace.json holds names, events and metadata, never arrays: 64 MiB is ~100x a 1,000-layer model's.
MAX_JSON_BYTES = 64 * 1024**2
# Deflate cannot do better than ~1032:1, which deflated zeros reach. The grid of a trace (float64, with
# the NaN of sparse metrics) measured ~6:1 for the standard and full presets; a constant column such as the
# learning rate alone reaches ~120:1, so the ratio is taken over the whole file, which the grid dominates.
MAX_RATIO = 200
RATIO_FLOOR = 16 * 1024**2  # below this total size, the ratio is not checked (small files compress freely)
MAX_MEMBERS = 100_000  # a trace has 2 + 2 per series layer + 2 per scalar members
MAX_DEPTH = 32  # nesting of the JSON document (ours is 4 deep); json itself stops near 1,000 (RecursionError)
_NPY_HEADER_BYTES = 10_000  # numpy's own default limit on a .npy header


class _Bad(Exception):
    """What is wrong with the file, as a phrase; becomes the GradmedicError."""


def read_trace(path: Path, max_bytes: int = MAX_TRACE_BYTES) -> tuple[dict[str, Any], Chunk]:
    """The (meta, chunk) stored at ``path``; raises GradmedicError with one line if anything is wrong."""
    try:
        with zipfile.ZipFile(path) as zf:
            _check_sizes(zf, max_bytes)
            doc = _read_document(zf)
            return doc["meta"], _read_chunk(zf, doc)
    except _Bad as error:
        reason = str(error)
    except GradmedicError:
        raise
    except MemoryError:
        reason = "it needs more memory than is free"
    except RecursionError:
        reason = "trace.json is nested too deeply"
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
            TypeError, OverflowError, NotImplementedError, RuntimeError) as error:
        # a corrupt zip or deflate stream, an encrypted or unknown compression method, a short member
        reason = f"{type(error).__name__}: {first_line(error)}"
    reason = " ".join(reason.split())[:300]  # one line, whatever the file put in it
    raise GradmedicError(f"{str(path)!r} is not a readable gradmedic trace ({reason}); save one with "
                         "Monitor.trace.save(path).") from None


# --- the zip ------------------------------------------------------------------------------------------
def _check_sizes(zf: zipfile.ZipFile, max_bytes: int) -> None:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _Bad(f"{len(infos)} members, over the {MAX_MEMBERS} a trace can have")
    total = sum(info.file_size for info in infos)
    if total > max_bytes:
        raise GradmedicError(f"{zf.filename!r} declares {_size(total)} of uncompressed data, over the "
                             f"{_size(max_bytes)} limit on trace files; if you trust it, call "
                             f"Trace.load(path, max_bytes={total}).")
    packed = sum(info.compress_size for info in infos)
    ratio = total / max(packed, 1)
    if total > RATIO_FLOOR and ratio > MAX_RATIO:
        raise _Bad(f"its members expand {ratio:.0f}-fold to {_size(total)}, over the {MAX_RATIO}:1 a trace "
                   "ever needs: a zip bomb")


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _member(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(name)
    except KeyError:
        raise _Bad(f"member {name!r} is missing") from None


# --- the JSON document --------------------------------------------------------------------------------
def _read_document(zf: zipfile.ZipFile) -> dict[str, Any]:
    info = _member(zf, "trace.json")
    if info.file_size > MAX_JSON_BYTES:
        raise _Bad(f"trace.json is {_size(info.file_size)}, over {_size(MAX_JSON_BYTES)}")
    try:
        doc = json.loads(zf.read(info))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _Bad(f"trace.json is not JSON: {first_line(error)}") from None
    _check_depth(doc)
    if not isinstance(doc, dict):
        raise _Bad(f"trace.json should hold an object, not {_kind(doc)}")
    if doc.get("format") != FORMAT:
        raise _Bad("trace.json does not say format 'gradmedic-trace'")
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        raise _Bad(f"'version' should be a positive integer, not {_kind(version)}")
    if version > VERSION:
        raise _Bad(f"written by a newer gradmedic (format {version}); upgrade gradmedic to read it")
    meta = _field(doc, "meta", dict)
    for key, kind in (("model", str), ("preset", str), ("dtype", str), ("device", str), ("torch", str)):
        if key in meta and not isinstance(meta[key], kind):
            raise _Bad(f"meta.{key} should be a string, not {_kind(meta[key])}")
    if "modules" in meta:
        _names(meta["modules"], "meta.modules", unique=False)
    if "types" in meta:
        _mapping(meta["types"], "meta.types", lambda v: isinstance(v, str), "strings")
    if "params" in meta:
        _mapping(meta["params"], "meta.params", _is_int, "integers")
    if "frozen" in meta:
        _names(meta["frozen"], "meta.frozen")
    if "roles" in meta:  # read by the depth rules and the report
        _mapping(meta["roles"], "meta.roles", lambda v: isinstance(v, str), "strings")
    if "check" in meta:  # written by gm.check, read by the rules and gm.treat
        _check_meta(meta["check"])
    _names(_field(doc, "layers", list), "layers")
    _names(_field(doc, "metrics", list), "metrics")
    _names(doc.setdefault("scalars", []), "scalars")
    series = _field(doc, "series", dict)
    for name, layers in series.items():
        _names(layers, f"series[{name!r}]")
    for i, event in enumerate(_field(doc, "events", list)):
        _check_event(i, event)
    return doc


def _check_meta(check: Any) -> None:
    """meta.check: {"steps": int >= 0, "loss": str, "loss_from": str}, each optional."""
    if not isinstance(check, dict):
        raise _Bad(f"meta.check should be an object, not {_kind(check)}")
    steps = check.get("steps", 0)
    if not _is_int(steps) or steps < 0:
        raise _Bad(f"meta.check.steps should be a non-negative integer, not {_kind(steps)}")
    for key in ("loss", "loss_from"):
        if key in check and not isinstance(check[key], str):
            raise _Bad(f"meta.check.{key} should be a string, not {_kind(check[key])}")


def _check_depth(doc: Any) -> None:
    """Refuse a document nested deeper than ours ever is (walked without recursion)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Bad(f"trace.json is nested more than {MAX_DEPTH} deep")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _check_event(i: int, event: Any) -> None:
    if not isinstance(event, dict):
        raise _Bad(f"events[{i}] should be an object, not {_kind(event)}")
    if not _is_int(event.get("step")):
        raise _Bad(f"events[{i}].step should be an integer, not {_kind(event.get('step'))}")
    if not isinstance(event.get("kind"), str):
        raise _Bad(f"events[{i}].kind should be a string, not {_kind(event.get('kind'))}")
    if event["kind"] == "nonfinite":
        for key in ("phase", "module", "value"):
            if not isinstance(event.get(key), str):
                raise _Bad(f"events[{i}].{key} should be a string, not {_kind(event.get(key))}")


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise _Bad(f"trace.json has no {key!r}")
    if not isinstance(doc[key], kind):
        raise _Bad(f"{key!r} should be {'an object' if kind is dict else 'a list'}, not {_kind(doc[key])}")
    return doc[key]


def _names(value: Any, what: str, unique: bool = True) -> None:
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _Bad(f"{what} should be a list of strings, not {_kind(value)}")
    if unique and len(set(value)) != len(value):
        raise _Bad(f"{what} names something twice")


def _mapping(value: Any, what: str, ok: Any, of: str) -> None:
    if not isinstance(value, dict) or not all(ok(v) for v in value.values()):
        raise _Bad(f"{what} should map names to {of}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, list) and value:
        return f"a list of {type(value[0]).__name__}"
    return type(value).__name__


# --- the arrays ---------------------------------------------------------------------------------------
def _read_chunk(zf: zipfile.ZipFile, doc: dict[str, Any]) -> Chunk:
    layers, metrics = doc["layers"], doc["metrics"]
    steps = _read_array(zf, "steps.npy", "iu", ndim=1)
    values = _read_array(zf, "values.npy", "fiu", shape=(len(steps), len(layers), len(metrics)))
    chunk = Chunk(steps=steps, layers=list(layers), metrics=list(metrics), values=values,
                  events=list(doc["events"]))
    for name in doc["scalars"]:
        s = _read_array(zf, f"scalars/{name}.steps.npy", "iu", ndim=1)
        chunk.scalars[name] = (s, _read_array(zf, f"scalars/{name}.values.npy", "fiu", shape=(len(s),)))
    for name, series_layers in doc["series"].items():
        chunk.series[name] = {}
        for i, layer in enumerate(series_layers):
            s = _read_array(zf, f"series/{name}/{i}.steps.npy", "iu", ndim=1)
            v = _read_array(zf, f"series/{name}/{i}.values.npy", "fiu", ndim=2)
            if v.shape[0] != len(s):
                raise _Bad(f"series {name!r} of {layer!r} has {v.shape[0]} rows for {len(s)} steps")
            chunk.series[name][layer] = (s, v)
    return chunk


def _read_array(zf: zipfile.ZipFile, name: str, kinds: str, shape: tuple[int, ...] | None = None,
                ndim: int | None = None) -> np.ndarray:
    """One .npy member: header checked, then read into a single buffer. Integers (``kinds`` "iu") come
    back as int64, numbers (``kinds`` "fiu") as float64."""
    info = _member(zf, name)
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=_NPY_HEADER_BYTES)
            elif version == (2, 0):
                found, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=_NPY_HEADER_BYTES)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, SyntaxError, TypeError) as error:
            raise _Bad(f"{name} is not a .npy array ({first_line(error)})") from None
        if dtype.hasobject or dtype.kind not in kinds or dtype.fields is not None or dtype.subdtype is not None:
            want = "integers" if kinds == "iu" else "numbers"
            raise _Bad(f"{name} should hold {want}, not dtype {dtype.str!r}")
        if any(not isinstance(n, int) or n < 0 for n in found):
            raise _Bad(f"{name} has an invalid shape {found!r}")
        if shape is not None and tuple(found) != shape:
            raise _Bad(f"{name} has shape {tuple(found)}, but trace.json says {shape}")
        if ndim is not None and len(found) != ndim:
            raise _Bad(f"{name} should be {ndim}-dimensional, not shape {tuple(found)}")
        count = math.prod(found)
        data_bytes = info.file_size - f.tell()
        if count * dtype.itemsize != data_bytes:
            raise _Bad(f"{name} declares shape {tuple(found)} ({count * dtype.itemsize} bytes) but holds "
                       f"{data_bytes} bytes")
        array = np.empty(count, dtype=dtype)
        _read_into(f, memoryview(array.view(np.uint8)), name)
    array = array.reshape(found, order="F" if fortran else "C")
    return array.astype(np.int64 if kinds == "iu" else np.float64, copy=False)


def _read_into(f: io.BufferedIOBase, view: memoryview, name: str) -> None:
    filled = 0
    while filled < len(view):
        n = f.readinto(view[filled:])
        if not n:
            raise _Bad(f"{name} ends early")
        filled += n
    if f.read(1):  # also makes the zip check the member's CRC at its end
        raise _Bad(f"{name} is longer than it declares")
