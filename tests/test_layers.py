"""The package's floors: every module imports only from its own floor or those below it, and no imports form a
cycle. Read from the source with ``ast`` (imports inside functions count too: a lazy import hides an arrow, it does
not remove it), so the test holds whatever is imported at run time."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "gradmedic"

# Floors, lowest first: the data flows probes -> monitor -> trace -> diagnosis -> remedies -> lab/report, and the
# import order follows it except where a stage *uses* a later one's reading: the Monitor delivers findings as it
# runs, so it sits above diagnosis (diagnosis reads only the trace). A module may import from its own floor and
# from any floor below; a name matches its longest prefix here. "gradmedic" alone is the package's public API
# (``gradmedic/__init__.py``), on which the integrations and the CLI build; it sits above the lab and the reports
# (which name the stages they read directly), and imports the report stage's notebook drawings.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("gradmedic._errors", "gradmedic._tensors", "gradmedic._compile", "gradmedic._rich",
              "gradmedic._inputs", "gradmedic._graph", "gradmedic._terminal", "gradmedic._files", "gradmedic._progress",
              "gradmedic._display", "gradmedic._startup", "gradmedic._paths", "gradmedic._verdict",
              "gradmedic.architecture")),
    ("probes", ("gradmedic.probes",)),
    ("trace", ("gradmedic._trace_file", "gradmedic._trace_meta", "gradmedic.trace")),
    ("diagnosis", ("gradmedic.diagnosis",)),
    ("monitor", ("gradmedic._sinks", "gradmedic._distributed", "gradmedic._run_scalars", "gradmedic._live",
                 "gradmedic._sentinel", "gradmedic._first_look",
                 "gradmedic._arguments", "gradmedic._budget", "gradmedic._lifecycle",
                 "gradmedic.monitor")),
    ("check", ("gradmedic.check",)),
    ("remedies", ("gradmedic.remedies",)),
    ("lab", ("gradmedic.lab",)),
    ("report", ("gradmedic.report",)),
    ("api", ("gradmedic",)),
    ("integrations", ("gradmedic.integrations",)),
    ("entry", ("gradmedic.cli", "gradmedic._cli_common", "gradmedic._cli_commands", "gradmedic.demo",
               "gradmedic.__main__")),
]


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _arrows() -> set[tuple[str, str]]:
    """(importer, imported) for every gradmedic module imported anywhere in a gradmedic module. ``from pkg import
    sub`` is an arrow to ``pkg.sub`` when ``sub`` is a module, else to ``pkg`` (its ``__init__``)."""
    modules = _modules()
    arrows = set()
    for name, (path, is_package) in modules.items():
        package = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[:len(package) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if not source.startswith("gradmedic"):
                    continue
                subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else subs + [source]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.split(".")[0] == "gradmedic"]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    arrows.add((name, target))
    return arrows


def _floor(module: str) -> int:
    best, floor = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, floor = len(prefix), i
    if floor is None:
        pytest.fail(f"{module} is on no floor: add it to FLOORS in {__file__}")
    return floor


def test_every_module_is_on_a_floor():
    for module in _modules():
        _floor(module)


def test_no_import_runs_up_a_floor():
    up = sorted(f"{a} ({FLOORS[_floor(a)][0]}) -> {b} ({FLOORS[_floor(b)][0]})"
                for a, b in _arrows() if _floor(b) > _floor(a))
    assert not up, "imports running up a floor:\n" + "\n".join(up)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for a, b in _arrows():
        graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path else f"{node}->{nxt}")
            elif nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# "about 400 lines" (STYLE.md, habit 7): a module a reader holds in their head at once
MAX_MODULE_LINES = 400


def test_modules_stay_short():
    long = sorted(f"{p.relative_to(PACKAGE.parent)}: {n}" for p, _ in _modules().values()
                  if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES)
    assert not long, "modules over about 400 lines:\n" + "\n".join(long)


def test_no_private_name_is_imported_from_another_module():
    """A name with a leading underscore is its module's own: another module that needs it needs a public name."""
    modules = _modules()
    private = []
    for name, (path, _) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradmedic"):
                private += [f"{name}: from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.endswith("__")
                            and f"{node.module}.{a.name}" not in modules]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_no_private_attribute_of_another_module_is_read():
    """``module._name`` across modules is a private import by another road (``surgery._SATURATING`` outlived its
    move to architecture.py that way, and broke only when called)."""
    modules = _modules()
    found = []
    for name, (path, _) in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradmedic"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in modules:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.endswith("__"):
                found.append(f"{name}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not found, "private names read from another module:\n" + "\n".join(found)
