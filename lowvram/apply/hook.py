"""The startup hook: copy patches/ into extensions/lowvram-layout and write its config.

The copy goes through a temp dir beside the target and a rename, so the UI never imports a
half-copied hook; it is redone only when the shipped bytes changed. Python's bytecode caches
(`__pycache__`) are neither copied nor compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from lowvram import fsutil, markers, paths
from lowvram.apply.manifest import Manifest
from lowvram.plan import Plan

_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def _skipped(relpath: Path) -> bool:
    return any(part in _SKIP_DIRS for part in relpath.parts) or relpath.suffix in (".pyc", ".pyo")


def file_hashes(root: Path) -> dict[str, str]:
    """relpath → sha256 of every file under `root` (caches left out)."""
    out: dict[str, str] = {}
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*")):
        relpath = path.relative_to(root)
        if _skipped(relpath) or not path.is_file() or path.is_symlink():
            continue
        out[relpath.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def hook_dir(webui: Path) -> Path:
    return Path(webui) / "extensions" / markers.HOOK_EXTENSION_DIR


@dataclass(frozen=True)
class HookChange:
    path: Path
    action: str  # created | modified | unchanged | missing (no hook files in this build)
    reason: str = ""


def plan_hook(webui: Path, source: Path | None = None) -> HookChange:
    source = source or paths.bundled_patches_dir()
    shipped = file_hashes(source)
    dest = hook_dir(webui)
    if not shipped:
        return HookChange(dest, "missing", f"this lowvram has no hook files ({source} is empty or missing)")
    if not dest.exists():
        return HookChange(dest, "created")
    return HookChange(dest, "unchanged" if file_hashes(dest) == shipped else "modified")


def install_hook(webui: Path, manifest: Manifest, source: Path | None = None) -> HookChange:
    """Copy the shipped hook into the tree when it is missing or differs from what ships."""
    source = source or paths.bundled_patches_dir()
    change = plan_hook(webui, source)
    if change.action in ("unchanged", "missing"):
        if change.action == "unchanged" and manifest.hook is None:
            manifest.record_hook(change.path, file_hashes(source))
            manifest.save()
        return change
    dest = change.path
    ext_dir = dest.parent
    if not ext_dir.exists():
        manifest.record_dir_created(ext_dir)
        manifest.save()
        ext_dir.mkdir(parents=True, exist_ok=True)
    tmp = fsutil.temp_name(dest)
    try:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*_SKIP_DIRS, "*.pyc", "*.pyo"))
    except OSError as exc:
        with contextlib.suppress(OSError):
            fsutil.remove_tree(tmp)
        raise fsutil._describe_os_error(tmp, exc) from exc
    manifest.record_hook(dest, file_hashes(tmp))
    manifest.save()
    fsutil.kill_point("hook:before-rename")
    old = None
    if dest.exists():
        old = fsutil.temp_name(dest)
        dest.rename(old)  # a kill here leaves no hook; the next run removes `old` and installs again
        fsutil.kill_point("hook:old-moved-aside")
    tmp.rename(dest)
    if old is not None:
        fsutil.remove_tree(old)
    return change


def remove_hook(webui: Path, manifest: Manifest) -> tuple[str, str]:
    """(status, reason): removed | kept | gone. Kept when someone edited the copied files."""
    if manifest.hook is None:
        return "gone", ""
    dest = Path(webui) / str(manifest.hook.get("dir") or f"extensions/{markers.HOOK_EXTENSION_DIR}")
    if dest.name != markers.HOOK_EXTENSION_DIR:
        return "kept", "the manifest names an unexpected hook folder"
    if not dest.exists():
        return "gone", ""
    recorded = manifest.hook.get("files")
    current = file_hashes(dest)
    if isinstance(recorded, dict) and current != recorded:
        changed = sorted(set(current) ^ set(recorded) | {k for k in current if recorded.get(k) != current[k]})
        return "kept", f"{dest.name} holds files lowvram did not put there or changed: {', '.join(changed[:3])}"
    tmp = fsutil.temp_name(dest)
    dest.rename(tmp)
    fsutil.remove_tree(tmp)
    return "removed", ""


def write_config(plan: Plan, webui: Path, *, driver: str | None = None, vram_total_mb: int | None = None) -> Path:
    """The hook's config (paths.hook_config_path) from the plan; returns its path."""
    from lowvram.hookconfig import build_hook_config, write_hook_config

    path = paths.hook_config_path(webui)
    write_hook_config(path, build_hook_config(plan, webui, driver=driver, vram_total_mb=vram_total_mb))
    return path
