"""The import rules of docs/architecture.md#layers-and-import-rules, checked on the AST of every module (ruff bans cover the coarse part)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "lowvram"

CORE = {"policy", "profiles", "estimate", "reserve", "observations", "plan", "facts", "tuning"}
EDGES = ("lowvram.detect", "lowvram.apply", "lowvram.launch", "lowvram.cli", "lowvram.tune", "lowvram.setup_ui")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def _module_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "_bundled" not in p.parts)


def _is_core(path: Path) -> bool:
    rel = path.relative_to(PKG)
    return rel.parts[0] == "ui" or (len(rel.parts) == 1 and rel.stem in CORE)


@pytest.mark.parametrize("path", _module_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_respects_the_layering(path: Path) -> None:
    rel = path.relative_to(PKG).as_posix()
    imports = _imports(path)
    top = {name.split(".")[0] for name in imports}
    if "typer" in top or "rich" in top:
        assert rel.startswith("cli/") or rel == "render.py", f"{rel} imports typer/rich"
    if "pynvml" in top:
        assert rel == "detect/nvml.py", f"{rel} imports pynvml"
    if "torch" in top:
        pytest.fail(f"{rel} imports torch; only patches/ may")
    if "git" in top:
        assert rel in {"apply/extensions.py", "setup_ui.py", "gitops.py"}, f"{rel} imports GitPython"
    if _is_core(path):
        bad = [n for n in imports if n.startswith(EDGES)]
        assert not bad, f"core module {rel} imports an edge: {bad}"


def test_patches_import_nothing_from_lowvram() -> None:
    for path in (REPO / "patches").rglob("*.py"):
        top = {name.split(".")[0] for name in _imports(path)}
        assert "lowvram" not in top, f"{path} imports lowvram; the hook runs inside the UI's Python"
