"""The package's shape, checked from its source: layers, cycles, sizes, one pool, no test hooks.

``docs/architecture.md`` describes the layout these tests enforce. Each package owns one
stage and imports only from the layers below it (and from its own package); the shared
core imports no stage. Every import counts, including the lazy ones inside functions: a
lazy upward import is still an upward dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "medres"

# package (first component below medres) -> layer; a module may import lower layers and its
# own package only. Core modules (layer 0) may import each other.
LAYERS: dict[str, int] = {
    "": 0,  # medres/__init__.py
    "errors": 0,
    "stats": 0,
    "progress": 0,
    "io": 0,
    "runtime": 0,
    "phi": 0,
    "workers": 0,
    "dataset": 1,
    "ingest": 2,
    "synth": 2,
    "models": 3,
    "train": 4,
    "evaluate": 5,
    "score": 6,
    "demo": 7,
    "cli": 8,
    "__main__": 9,
}
# modules of a lower stage that a higher stage must not reach into (orchestration, not API)
PRIVATE_TO_PACKAGE = {"medres.ingest.pipeline": "ingest"}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every medres module that ``name`` imports (module level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod]
            # ``from pkg import submodule`` imports the submodule
            targets += [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES]
        else:
            continue
        for t in targets:
            if t == "medres" or t.startswith("medres."):
                # the longest known module prefix
                parts = t.split(".")
                while parts and ".".join(parts) not in MODULES:
                    parts.pop()
                if parts and ".".join(parts) != name:
                    found.add(".".join(parts))
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_package_has_a_layer():
    unknown = sorted({_package(m) for m in MODULES} - set(LAYERS))
    assert not unknown, f"add these packages to LAYERS (and docs/architecture.md): {unknown}"


def test_no_upward_or_sideways_imports():
    bad = []
    for mod, deps in GRAPH.items():
        pkg = _package(mod)
        for dep in deps:
            dpkg = _package(dep)
            if dpkg == pkg:
                continue
            if LAYERS[dpkg] == 0 and LAYERS[pkg] == 0:
                continue
            if LAYERS[dpkg] >= LAYERS[pkg]:
                bad.append(f"{mod} -> {dep}")
            owner = PRIVATE_TO_PACKAGE.get(dep)
            if owner and pkg not in (owner, "cli", "demo", "__main__"):
                bad.append(f"{mod} -> {dep} (orchestration of another stage)")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_inits_edges_removed() -> dict[str, set[str]]:
    """The graph without a package ``__init__``'s re-exports of its own submodules: Python
    runs a package's ``__init__`` before its submodules either way, so those edges are not
    cycles a reader has to untangle."""
    g: dict[str, set[str]] = {}
    for mod, deps in GRAPH.items():
        is_init = MODULES[mod].name == "__init__.py"
        g[mod] = {d for d in deps if not (is_init and d.startswith(mod + "."))}
    return g


def test_no_import_cycles():
    cycles = _cycles(_package_inits_edges_removed())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_MODULE_LINES, f"{name}: {n} lines; split it along its concerns"


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            # a CLI command's signature (its options) is not counted; everything else is
            start = node.body[0].lineno if "cli" in path.parts else node.lineno
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{node.name} (line {node.lineno}): {length} lines")
    return out


def test_function_sizes():
    bad = {name: f for name, path in MODULES.items() if (f := _long_functions(path))}
    assert not bad, "functions over 80 lines: " + "; ".join(f"{k}: {v}" for k, v in bad.items())


def test_every_module_says_what_it_owns():
    missing = [
        name
        for name, path in MODULES.items()
        if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert not missing, f"modules without a docstring: {missing}"


_POOLS = re.compile(
    r"ProcessPoolExecutor|multiprocessing\.Pool\b|mp\.Pool\b|\.Process\(|get_context\(\"fork\"\)"
)


def test_one_process_pool_implementation():
    users = sorted(
        name
        for name, path in MODULES.items()
        if name != "medres.workers" and _POOLS.search(path.read_text())
    )
    assert not users, f"process pools outside medres.workers: {users}"


def test_no_test_hooks_in_library_code():
    hooks = re.compile(r"PYTEST|\bpytest\b|_KILL_AFTER|MEDRES_TEST")
    found = sorted(name for name, path in MODULES.items() if hooks.search(path.read_text()))
    assert not found, f"test hooks in library code: {found}"
