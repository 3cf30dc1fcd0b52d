"""The layout of ``runtime/`` (docs/design.md, "Layout of runtime/"), checked on the source itself:

- the module graph of ``runtime/**.py`` has no cycle. Every import counts: at module level, inside
  functions (a lazy import only hides a cycle) and under ``TYPE_CHECKING`` (a cycle for the reader and
  for any tool that evaluates annotations);
- ``runtime/`` imports nothing from ``web/`` or the HTTP stack (Quart, Hypercorn): it knows no HTTP;
- nothing outside ``runtime/store/`` imports the SQLite backend module itself;
- ``bench/`` uses the runtime's public names only (no ``_private`` name imported or read off a runtime
  module), so a benchmark never pins an internal that a refactoring may rename.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "runtime"
BENCH = ROOT / "bench"
# Top-level packages runtime/ must never import: the server layer and the HTTP stack under it.
HTTP_PACKAGES = {"web", "quart", "quart_trio", "hypercorn"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(RUNTIME.rglob("*.py"))}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def import_targets(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The runtime modules that importing ``name`` (at ``path``) runs: each imported module and every
    package on the way to it. A package that contains ``name`` is left out when only a submodule of it
    is imported (it is already being imported when ``name`` runs), and kept when a name defined in its
    ``__init__`` is imported (that really needs its ``__init__`` to have run that far)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)} | {package}
    targets: set[str] = set()

    def add(module: str, needs_init: bool) -> None:
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix not in modules or prefix == name:
                continue
            if prefix in ancestors and not (needs_init and prefix == module):
                continue
            targets.add(prefix)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, needs_init=False)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: package.count(".") + 2 - node.level]
                assert base, f"{path}: relative import above the top package"
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                if submodule in modules:
                    add(submodule, needs_init=False)
                else:
                    add(module, needs_init=True)
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that starts and ends at the same node, or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for target in sorted(graph[node]):
            if colour[target] == GREY:
                return stack[stack.index(target):] + [target]
            if colour[target] == WHITE and (cycle := visit(target)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def runtime_graph() -> dict[str, set[str]]:
    modules = runtime_modules()
    return {name: import_targets(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_the_imports_it_must_see():
    """The walk finds imports at every place a cycle can hide: module level, inside a function, under
    TYPE_CHECKING, and a name read from a package's ``__init__``."""
    graph = runtime_graph()
    assert {"runtime.engine", "runtime.store", "runtime.sessions", "runtime.engine.engine",
            "runtime.store.sqlite", "runtime.sessions.service", "runtime.core"} <= graph.keys()
    assert "runtime.sessions" in graph["runtime.core"]  # module level
    assert "runtime.mcp" in graph["runtime.core"]  # inside Runtime.open
    assert "runtime.models.tools" in graph["runtime.engine.engine"]  # inside a method
    assert "runtime.store" in graph["runtime.idempotency"]  # under TYPE_CHECKING
    assert "runtime.store.sqlite" in graph["runtime.store"]  # the package re-exports its backend
    assert "runtime.engine" not in graph["runtime.engine.engine"]  # its own package, submodules only


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_among_runtime_modules():
    cycle = find_cycle(runtime_graph())
    assert cycle is None, "import cycle in runtime/: " + " -> ".join(cycle)


def test_runtime_imports_no_http():
    found = []
    for name, path in runtime_modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found += [(name, a.name) for a in node.names if a.name.split(".")[0] in HTTP_PACKAGES]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module.split(".")[0] in HTTP_PACKAGES:
                    found.append((name, node.module))
    assert found == []


def test_store_backend_is_reached_through_its_package():
    """Nothing outside runtime/store/ names ``runtime.store.sqlite``: callers take the store's names from
    ``runtime.store``, the one place a second backend (postgres.py) will be chosen."""
    modules = runtime_modules()
    found = []
    for path in sorted(p for d in ("runtime", "web", "tests", "bench", "examples") for p in project_files(ROOT / d)):
        if path.is_relative_to(RUNTIME / "store"):
            continue
        if "sqlite" not in path.read_text():  # no import can name the module without the word: no need to parse
            continue
        if path.is_relative_to(RUNTIME):
            targets = import_targets(module_name(path), path, modules)
        else:
            targets = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    targets |= {a.name for a in node.names}
        if "runtime.store.sqlite" in targets:
            found.append(str(path.relative_to(ROOT)))
    assert found == []


def private_uses(path: Path) -> list[str]:
    """Every ``_private`` name ``path`` takes from ``runtime``: imported, in a module path, or read as
    an attribute of a name it imported from ``runtime``."""
    uses: list[str] = []
    bound: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "runtime":
                    uses += [alias.name for part in alias.name.split(".") if is_private(part)]
                    bound.add(alias.asname or "runtime")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "runtime":
            uses += [node.module for part in node.module.split(".") if is_private(part)]
            for alias in node.names:
                if is_private(alias.name):
                    uses.append(f"{node.module}.{alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            if is_private(node.attr):
                uses.append(f"{node.value.id}.{node.attr}")
    return uses


def test_private_use_finder(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from runtime.sessions import _upsert_index, upsert_index\n"
                      "from runtime import store as st, __version__\n"
                      "import runtime._hidden\n"
                      "from other import _fine\n"
                      "st._iconn, st.Store, _fine._x\n")
    assert sorted(private_uses(sample)) == ["runtime._hidden", "runtime.sessions._upsert_index", "st._iconn"]


def project_files(folder: Path, root: Path = ROOT) -> list[Path]:
    """The project's own ``*.py`` under ``folder``: not a venv inside it (``make bench-peer`` installs
    LangGraph's server into bench/peer/.venv, thousands of files that are not ours)."""
    return sorted(p for p in folder.rglob("*.py") if ".venv" not in p.relative_to(root).parts)


def test_project_files_leave_out_venvs(tmp_path):
    for name in ("bench/run.py", "bench/peer/run.py", "bench/peer/.venv/lib/site-packages/langgraph/graph.py",
                 ".venv/lib/site.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    found = [str(p.relative_to(tmp_path)) for p in project_files(tmp_path / "bench", tmp_path)]
    assert found == ["bench/peer/run.py", "bench/run.py"]


@pytest.mark.parametrize("path", project_files(BENCH), ids=lambda p: str(p.relative_to(ROOT)))
def test_bench_uses_public_runtime_names_only(path):
    assert private_uses(path) == []
