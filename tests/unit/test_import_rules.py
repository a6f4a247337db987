"""The shape rules of docs/architecture.md#layers-and-import-rules, checked on the AST of every module.

ruff's banned-api list covers who may import typer, rich, pynvml, torch and GitPython; this file checks
what ruff cannot: the layers (core and ui decide, world touches the world, cli on top), that the pure
layers do no I/O, that no two modules import each other (counting lazy imports and the package
__init__ an import runs), and that no function or class grows past what one reader holds in mind.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "lowvram"
PURE_LAYERS = ("core", "ui")  # decide from values: no files, no processes, no clock, no environment
LAYER_MAY_IMPORT = {
    "core": {"core", "ui"},
    "ui": {"core", "ui"},
    "world": {"core", "ui", "world"},
    "cli": {"core", "ui", "world", "cli"},
}
IMPURE_MODULES = {"os", "sys", "subprocess", "socket", "time", "datetime", "shutil", "signal", "platform",
                  "urllib", "http", "tempfile", "psutil", "ctypes", "threading", "multiprocessing", "glob",
                  "random", "secrets", "pynvml", "git", "torch"}
IMPURE_CALLS = {"open", "print", "input", "exit"}
IMPURE_METHODS = {"read_text", "read_bytes", "write_text", "write_bytes", "open", "exists", "is_file", "is_dir",
                  "iterdir", "glob", "rglob", "stat", "lstat", "mkdir", "unlink", "rename", "touch", "rmdir",
                  "symlink_to", "samefile", "readlink"}
# The UI adapters read their own flag tables, data shipped inside the package (lowvram/ui/flags/): constants
# kept as text so a maintainer edits a table, not code.
PACKAGE_DATA_READERS = {("ui/base.py", "read_text")}
MAX_LINES = 100
MAX_POLICY_STEP_LINES = 60


def _module_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "_bundled" not in p.parts)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def _imported_names(tree: ast.AST) -> Iterator[tuple[ast.AST, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node, node.module
            for alias in node.names:
                yield node, f"{node.module}.{alias.name}"


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYER_MAY_IMPORT else None


MODULES = {_module_name(p): p for p in _module_files()}


def _resolve(name: str) -> str | None:
    """The lowvram module an imported name lives in (`lowvram.core.plan.Plan` -> `lowvram.core.plan`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _import_graph() -> dict[str, set[str]]:
    """Module -> modules it imports, lazy imports included; importing a.b.c also runs a and a.b."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _node, name in _imported_names(ast.parse(path.read_text(encoding="utf-8"))):
            target = _resolve(name) if name.startswith("lowvram") else None
            if not target:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                run = ".".join(parts[:i])
                if run in MODULES and run != module and not module.startswith(run + "."):
                    graph[module].add(run)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("path", _module_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_respects_the_layering(path: Path) -> None:
    rel, module = _rel(path), _module_name(path)
    names = [name for _node, name in _imported_names(ast.parse(path.read_text(encoding="utf-8")))]
    top = {name.split(".")[0] for name in names}
    if "typer" in top or "rich" in top:
        assert rel.startswith("cli/"), f"{rel} imports typer/rich"
    if "pynvml" in top:
        assert rel == "world/detect/nvml.py", f"{rel} imports pynvml"
    assert "torch" not in top, f"{rel} imports torch; only patches/ may"
    if "git" in top:
        assert rel in {"world/apply/extensions.py", "world/setup_ui.py", "world/gitops.py"}, f"{rel} imports GitPython"
    layer = _layer(module)
    if layer is None:
        return
    bad = sorted({n for n in names if n.startswith("lowvram.") and _layer(n) not in LAYER_MAY_IMPORT[layer]
                  and _layer(n) is not None})
    assert not bad, f"{rel} ({layer}) imports what its layer may not: {bad}"


def _impurities(path: Path) -> list[str]:
    rel = _rel(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in IMPURE_MODULES]
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in IMPURE_CALLS:
                found.append(f"line {node.lineno}: calls {func.id}()")
            elif (isinstance(func, ast.Attribute) and func.attr in IMPURE_METHODS
                  and (rel, func.attr) not in PACKAGE_DATA_READERS):
                found.append(f"line {node.lineno}: calls .{func.attr}()")
    return found


@pytest.mark.parametrize("path", [p for p in _module_files() if _layer(_module_name(p)) in PURE_LAYERS],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_pure_layers_touch_nothing(path: Path) -> None:
    assert not _impurities(path), f"{_rel(path)} is in a pure layer but touches the world: {_impurities(path)}"


def test_every_module_sits_in_a_layer() -> None:
    loose = sorted(_rel(p) for p in _module_files()
                   if _layer(_module_name(p)) is None and _rel(p) not in {"__init__.py", "__main__.py"})
    assert not loose, f"modules outside core/, ui/, world/, cli/: {loose}"


def test_no_import_cycles() -> None:
    assert not _cycles(_import_graph()), f"import cycles: {_cycles(_import_graph())}"


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _bodies(path: Path) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield f"{path.relative_to(REPO)}:{node.lineno} {node.name}", (node.end_lineno or node.lineno) - node.lineno + 1


def test_no_function_or_class_over_100_lines() -> None:
    files = _module_files() + sorted((REPO / "patches").rglob("*.py"))
    long = sorted(f"{where} ({n} lines)" for path in files for where, n in _bodies(path) if n > MAX_LINES)
    assert not long, f"split these by responsibility: {long}"


def test_policy_steps_stay_short() -> None:
    files = sorted((PKG / "core" / "policy").rglob("*.py"))
    assert files, "the policy package moved; update this test"
    long = sorted(f"{where} ({n} lines)" for path in files for where, n in _bodies(path)
                  if n > MAX_POLICY_STEP_LINES and not where.split()[-1][:1].isupper())
    assert not long, f"policy steps over {MAX_POLICY_STEP_LINES} lines: {long}"


def test_patches_import_nothing_from_lowvram() -> None:
    for path in (REPO / "patches").rglob("*.py"):
        top = {name.split(".")[0] for _node, name in _imported_names(ast.parse(path.read_text(encoding="utf-8")))}
        assert "lowvram" not in top, f"{path} imports lowvram; the hook runs inside the UI's Python"
