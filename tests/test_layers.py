"""The package's layers import only downward, and its modules import without a cycle.

The import graph is read with ``ast`` from ``autoprune/**/*.py``: imports at module level and
inside functions both count, so a late import cannot hide a cycle. ``from PKG import name``
is an edge to ``PKG.name`` when that is a module, else to ``PKG`` itself (for the top package:
its facade ``__init__``, which imports every layer).
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autoprune"
TOP = PACKAGE.name

UPPER = ("autoprune.study", "autoprune.run", "autoprune.report", "autoprune.deploy")
CLI = ("autoprune.cli", "autoprune.spec")

# (modules the rule covers, what they must never import); a name covers its submodules.
# report/, run/ and deploy/ may import study/ and each other; only cli/ and spec.py sit on top.
LAYERS: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (
        (
            "autoprune.pruning",
            "autoprune.inference",
            "autoprune.task",
            "autoprune.devices",
            "autoprune.tasks",
            "autoprune.train",
            "autoprune.measure",
            "autoprune.trial",
            "autoprune.errors",
            "autoprune._files",
        ),
        ("optuna", *UPPER, *CLI),
    ),
    (("autoprune.study",), ("autoprune.run", "autoprune.report", "autoprune.deploy", *CLI)),
    (("autoprune.run", "autoprune.report", "autoprune.deploy"), ("autoprune.cli",)),
]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:``, which never run."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


@functools.cache
def import_graph(*, runtime_only: bool) -> dict[str, set[str]]:
    """Module -> what it imports: a module of the package, or an outside top-level name.

    With ``runtime_only``, imports under ``if TYPE_CHECKING:`` are left out (they make no
    cycle); the layering rules count them too.
    """
    mods = _modules()

    def resolve(name: str) -> str:
        if name.split(".")[0] != TOP:
            return name.split(".")[0]
        while name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree) if runtime_only else set()
        edges: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                edges.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    edges.add(full if full in mods else resolve(base))
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the package's modules, as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if target not in graph:
                continue  # outside the package
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle_and_nothing_for_a_tree() -> None:
    graph = {"a": {"b", "optuna"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": {"torch"}}) is None


def test_graph_reads_every_kind_of_import() -> None:
    graph = import_graph(runtime_only=False)
    assert len(graph) == len(_modules()) > 40
    # `from autoprune import measure` is the module, `from autoprune.pruning import structured`
    # the submodule, `import optuna` the outside name.
    assert {"autoprune.measure", "autoprune.pruning.structured"} <= graph["autoprune.trial"]
    assert "optuna" in graph["autoprune.study.study"]
    assert "autoprune.cli" in graph["autoprune.__main__"]


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph(runtime_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _covers(prefix: str, module: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize(("covered", "forbidden"), LAYERS, ids=lambda v: v[0])
def test_layers_import_only_downward(covered: tuple[str, ...], forbidden: tuple[str, ...]) -> None:
    graph = import_graph(runtime_only=False)
    subjects = [m for m in graph if any(_covers(c, m) for c in covered)]
    assert subjects, f"the rule covers no module: {covered}"
    bad = sorted(
        f"{module} imports {target}"
        for module in subjects
        for target in graph[module]
        if any(_covers(f, target) for f in forbidden)
    )
    assert not bad, "layering broken: " + "; ".join(bad)


def test_only_the_cli_imports_the_facade() -> None:
    """``autoprune/__init__`` imports every layer: a module below the CLI that took a name
    from it would import the layers above it."""
    graph = import_graph(runtime_only=False)
    users = sorted(m for m, targets in graph.items() if TOP in targets)
    assert all(_covers("autoprune.cli", m) or m == "autoprune.__main__" for m in users), users


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter() -> None:
    # __main__ runs the CLI when imported; it is one line that imports autoprune.cli.
    names = sorted(m for m in _modules() if m != "autoprune.__main__")
    code = "".join(f"import {name}\n" for name in names) + f"print({len(names)})\n"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PACKAGE.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(len(names))
