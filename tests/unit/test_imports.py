"""Imports point down: no import cycle between posttrain modules, and no library module imports the commands.

Read from the source with Python's ``ast`` (nothing is imported), counting every import statement: module level,
inside functions, under ``if TYPE_CHECKING``. A function-local import is still a dependency; hiding one inside a
function does not make a cycle acceptable.

The graph has one node per module (a package is its ``__init__.py``) and an edge ``m -> t`` when ``m`` imports
``t``:

- ``import a.b.c`` and ``from a.b.c import name`` import the module ``a.b.c``; ``from a.b import c`` imports the
  submodule ``a.b.c`` when ``c`` is one, and otherwise takes the name ``c`` from ``a.b`` (its ``__init__``).
  Relative imports are resolved against ``m``'s package.
- Importing ``a.b.c`` also runs the packages ``a`` and ``a.b`` first, so ``m`` depends on their ``__init__``
  too, except on the packages that contain ``m`` itself: those are already being imported before ``m`` runs.
  So a package ``__init__`` that imports its own submodules is an edge down, and it is a cycle only when one of
  those submodules imports back from the package (``from posttrain.verify import x`` inside
  ``posttrain/verify/pool.py``), which is exactly the pattern that breaks with a partially initialised module.
- ``posttrain.cli`` loads the command modules by name (``importlib``); that is not an edge (and it is allowed).

A cycle is reported as a path ``a -> b -> ... -> a`` with the file and line of every import on it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import posttrain

SRC = Path(posttrain.__file__).resolve().parent
COMMANDS = "posttrain.commands"
ENTRY_POINTS = {"posttrain.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    """The posttrain modules one import statement names (before adding the packages that run first)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "posttrain"]
    if node.level:  # relative: from the package that holds `module`
        package = module if is_package else module.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "posttrain":
        return []
    out = []
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.append(sub if sub in modules else source)
    return out


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path], list[str]]:
    """(edges ``{module: {imported module: line}}``, the modules' files, imports of modules that do not exist)."""
    modules = _modules()
    edges: dict[str, dict[str, int]] = defaultdict(dict)
    missing = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own = set(_ancestors(name)) | {name}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _imported(node, name, _is_package(path), modules):
                if target not in modules:
                    missing.append(f"{path.relative_to(SRC.parent)}:{node.lineno} imports {target}")
                    continue
                for t in [*_ancestors(target), target]:
                    if t != name and (t == target or t not in own):
                        edges[name].setdefault(t, node.lineno)
    return edges, modules, missing


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component with more than one module."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def strongconnect(v):  # Tarjan; the graph is a few hundred nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            comps.append(comp)

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    cycles = []
    for comp in comps:
        if len(comp) < 2:
            continue
        members, start = set(comp), min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in edges[v]]:  # BFS back to start
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in edges[v])
        path = [last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def _describe(cycle: list[str], edges, modules) -> str:
    steps = [f"{a} -> {b} ({modules[a].relative_to(SRC.parent)}:{edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "\n    ".join(steps)


def test_no_import_cycles():
    edges, modules, _ = import_graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles between posttrain modules:\n  " + "\n  ".join(
        _describe(c, edges, modules) for c in cycles)


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(edges, modules, importer, imported) -> list[str]:
    """``file:line imports target`` for every edge from a module ``importer(m)`` accepts to one ``imported(t)``
    accepts (the deepest target of each import statement only)."""
    found: dict[tuple[str, int], str] = {}
    for m, targets in sorted(edges.items()):
        for t, line in targets.items():
            if importer(m) and imported(t) and len(t) > len(found.get((m, line), "")):
                found[(m, line)] = t
    return [f"{modules[m].relative_to(SRC.parent)}:{line} imports {t}" for (m, line), t in sorted(found.items())]


def test_library_never_imports_commands():
    edges, modules, _ = import_graph()
    bad = _violations(edges, modules, lambda m: m not in ENTRY_POINTS and not _inside(m, COMMANDS),
                      lambda t: _inside(t, COMMANDS))
    assert not bad, "library modules import posttrain.commands (move the shared code into the library):\n  " + \
        "\n  ".join(bad)


def test_lower_layers_do_not_import_upper_ones():
    """The verifier is a library of its own (it imports nothing else of posttrain), and the rollout engines do not
    know about evaluation (evaluation drives them)."""
    edges, modules, _ = import_graph()
    bad = _violations(edges, modules, lambda m: _inside(m, "posttrain.verify"),
                      lambda t: not _inside(t, "posttrain.verify") and t != "posttrain")
    bad += _violations(edges, modules, lambda m: _inside(m, "posttrain.rollout"),
                       lambda t: _inside(t, "posttrain.evaluation"))
    assert not bad, "imports that point up:\n  " + "\n  ".join(bad)


def test_every_posttrain_import_names_a_module():
    edges, modules, missing = import_graph()
    assert len(modules) > 50 and sum(map(len, edges.values())) > 100  # the graph really holds the package
    assert not missing, "imports of posttrain modules that do not exist:\n  " + "\n  ".join(missing)


def test_the_graph_sees_function_local_and_relative_imports():
    """The checker itself: a cycle closed by a function-local import, through a package's ``__init__``, is found;
    a package importing its own submodules is not a cycle."""
    modules = {"posttrain.a": Path("a.py"), "posttrain.a.x": Path("a/x.py"), "posttrain.b": Path("b.py")}
    pkg = ast.parse("from . import x\nfrom posttrain.a.x import f")
    assert {t for n in ast.walk(pkg) if isinstance(n, ast.ImportFrom)
            for t in _imported(n, "posttrain.a", True, modules)} == {"posttrain.a.x"}
    fn = ast.parse("def g():\n    from posttrain.a import thing\n")
    node = next(n for n in ast.walk(fn) if isinstance(n, ast.ImportFrom))
    assert _imported(node, "posttrain.b", False, modules) == ["posttrain.a"]
    assert _cycles({"posttrain.a": {"posttrain.a.x": 1}, "posttrain.a.x": {}}) == []
    loop = {"posttrain.a": {"posttrain.a.x": 1}, "posttrain.a.x": {"posttrain.b": 1}, "posttrain.b": {"posttrain.a": 2}}
    assert _cycles(loop) == [["posttrain.a", "posttrain.a.x", "posttrain.b", "posttrain.a"]]
