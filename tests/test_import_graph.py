"""The package layering, read from the sources (AST only: nothing is imported, torch is not needed).

Every ``import`` statement of every module of the four production packages counts: at module
level, inside functions, under ``if TYPE_CHECKING:``. The rule (README "Import direction"):

* ``models``   imports nothing of ours but ``models``;
* ``parallel`` imports ``parallel`` and ``models``;
* ``data``     imports nothing of ours but ``data`` (it sits beside the others);
* ``train``    imports any of the four;

and no cycle among the project's modules. An edge goes to the module an import names
(``from pkg import sub`` names ``pkg.sub`` when that is a module); a package's ``__init__``
counts only where it is named itself, not as the parent of every submodule imported.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "parallel", "train", "data")
ALLOWED: Dict[str, Set[str]] = {
    "models": {"models"},
    "parallel": {"parallel", "models"},
    "data": {"data"},
    "train": {"train", "parallel", "models", "data"},
}


def project_modules() -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file under the four packages (subpackages too)."""
    out: Dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_package(module: str, modules: Dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _absolute(node: ast.ImportFrom, module: str, modules: Dict[str, Path]) -> str:
    """The absolute name `from <...> import` refers to (relative imports resolved against `module`)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, modules):
        base = base[:-1]  # a plain module's relative imports are against its package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(name: str, modules: Dict[str, Path]) -> str | None:
    """The project module a dotted name lands in (its longest known prefix), or None if not ours."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: Dict[str, Path]) -> Dict[str, Set[Tuple[str, int]]]:
    """module -> {(imported project module, line)}; `from pkg import sub` counts as importing pkg.sub."""
    edges: Dict[str, Set[Tuple[str, int]]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, modules)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                hit = _ours(target, modules)
                if hit is not None and hit != module:
                    edges[module].add((hit, node.lineno))
    return edges


def direction_violations(edges: Dict[str, Set[Tuple[str, int]]]) -> List[str]:
    """Imports against train -> parallel -> models (data beside), as 'a:line imports b'."""
    bad = []
    for module, targets in sorted(edges.items()):
        pkg = module.split(".")[0]
        for target, line in sorted(targets):
            if target.split(".")[0] not in ALLOWED[pkg]:
                bad.append(f"{module}:{line} imports {target}")
    return bad


def import_cycles(edges: Dict[str, Set[Tuple[str, int]]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    graph = {m: sorted({t for t, _ in ts}) for m, ts in edges.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:  # recursion depth <= number of modules (~60)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _describe(cycle: List[str], edges: Dict[str, Set[Tuple[str, int]]]) -> str:
    members = set(cycle)
    links = [f"{m}:{line} -> {t}" for m in cycle for t, line in sorted(edges[m]) if t in members]
    return "{" + ", ".join(cycle) + "}: " + "; ".join(links)


def test_the_walker_sees_every_package_and_resolves_relative_imports():
    modules = project_modules()
    for pkg in PACKAGES:
        assert pkg in modules and any(m.startswith(pkg + ".") for m in modules), pkg
    edges = import_edges(modules)
    # data/loader.py imports `.config` and `.packing` relatively; models/transformer.py imports models.* absolutely
    assert {"data.config", "data.packing"} <= {t for t, _ in edges["data.loader"]}
    assert "models.moe" in {t for t, _ in edges["models.transformer"]}


def test_the_checks_catch_a_back_edge_and_a_cycle():
    edges = {"models.a": {("train.b", 3)}, "train.b": {("models.a", 5)}, "data.c": set()}
    assert direction_violations(edges) == ["models.a:3 imports train.b"]
    assert import_cycles(edges) == [["models.a", "train.b"]]


def test_imports_follow_train_parallel_models_with_data_beside():
    bad = direction_violations(import_edges(project_modules()))
    assert not bad, "imports against train -> parallel -> models (data beside):\n" + "\n".join(bad)


def test_no_import_cycle_among_the_project_modules():
    edges = import_edges(project_modules())
    cycles = import_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, edges) for c in cycles)
