"""Every metric, series and scalar name that a rule, the report or a sink reads is one that a probe (or the Monitor's
run scalars) declares it writes: a renamed or misspelt metric would otherwise make its rule silently read nothing."""

from __future__ import annotations

import ast
import pathlib

from gradmedic._run_scalars import SCALARS
from gradmedic.probes import METRICS, PROBES, SERIES

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gradmedic"
# the readers: diagnosis reads the trace; the report, the findings' table and the sinks show it
READERS = ["diagnosis", "report", "_sinks.py", "integrations"]
# calls whose first string argument (second for ``latest(trace, name)``) names a metric, series or scalar
_READ_BY = {"metric": METRICS, "last": METRICS, "latest": METRICS, "series": SERIES, "scalar": set(SCALARS)}


def _reads() -> list[tuple[str, str, set[str]]]:
    found = []
    for reader in READERS:
        root = PACKAGE / reader
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                    if name not in _READ_BY:
                        continue
                    args = node.args[1:2] if name == "latest" else node.args[:1]
                    for arg in args:
                        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                            found.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", arg.value, _READ_BY[name]))
                elif isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.In) and \
                        isinstance(node.left, ast.Constant) and isinstance(node.left.value, str) and \
                        isinstance(node.comparators[0], ast.Attribute) and node.comparators[0].attr == "metrics":
                    found.append((f"{path.relative_to(PACKAGE)}:{node.lineno}", node.left.value, METRICS))
    return found


def test_the_probes_declare_their_names_once():
    seen: dict[str, str] = {}
    for probe in PROBES.values():
        for name in (*probe.metrics, *probe.series):
            assert name not in seen, f"{name!r} is declared by both {seen[name]} and {probe.__name__}"
            seen[name] = probe.__name__


def test_every_name_a_reader_reads_is_declared():
    reads = _reads()
    assert len(reads) > 30  # the scan finds the rules' reads (a broken scan would pass on nothing)
    undeclared = [f"{where}: {name!r}" for where, name, declared in reads if name not in declared]
    assert not undeclared, "read but declared by no probe:\n" + "\n".join(undeclared)
