"""`apply` and `revert`: write a Plan into a WebUI tree, and take out exactly what was put in.

Crash-safe order (DESIGN.md §6): stale temps from a killed run are removed first; the manifest
and backups are written and fsynced before each change to the tree; an extension is recorded
before its clone is renamed into place. A kill at any moment leaves every file old or new, and
the next run finishes the job. The WebUI's lock is held throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram import fsutil, gitops, paths
from lowvram.apply import hook as hook_mod
from lowvram.apply import webui_user
from lowvram.apply.manifest import Manifest, check_applied, rel, sha256
from lowvram.facts import Facts
from lowvram.plan import Plan

__all__ = ["ApplyResult", "RevertResult", "apply_plan", "check_applied", "revert"]

NO_FILES_UIS = ("comfyui",)


@dataclass
class ApplyResult:
    changes: list[dict[str, str]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    diff: str = ""
    exit_code: int = 0
    target: str | None = None
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "extensions": self.extensions, "diff": self.diff,
                "target": self.target, "notes": self.notes, "dry_run": self.dry_run}


@dataclass
class RevertResult:
    changes: list[dict[str, str]] = field(default_factory=list)
    extensions: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"changes": self.changes, "extensions": self.extensions, "notes": self.notes}


@contextlib.contextmanager
def _locked(webui: Path, held: bool) -> Iterator[None]:
    if held:
        yield
        return
    with fsutil.webui_lock(paths.lock_path(webui), what=f"the WebUI at {webui}"):
        yield


def clean_stale(webui: Path) -> list[Path]:
    """Remove what a killed lowvram run left: temp files/dirs in the tree, extensions/, state dir."""
    removed: list[Path] = []
    for directory in (webui, webui / "extensions", paths.webui_state_dir(webui), paths.backups_dir(webui)):
        removed += fsutil.clean_stale_temps(directory)
    return removed


def _hook_wanted(plan: Plan, ui: str) -> bool:
    return ui == "a1111" and bool(plan.hook.enabled)


def apply_plan(plan: Plan, webui: Path, facts: Facts, *, dry_run: bool = False,
               progress: gitops.Progress | None = None, lock_held: bool = False,
               sources: Mapping[str, str] | None = None, update: bool = False) -> ApplyResult:
    """Write `plan` into the WebUI at `webui`: the managed block, the hook, the extensions.

    `lock_held=True` when the caller (launch) already holds the WebUI's lock. An extension that
    cannot be fetched does not stop the rest: it is reported "failed" and exit_code is 1.
    """
    from lowvram.apply import extensions as ext_mod

    webui = Path(webui).resolve()
    ui = plan.ui or (facts.webui.flavor if facts.webui else "a1111")
    result = ApplyResult(dry_run=dry_run)
    if ui in NO_FILES_UIS:
        result.notes.append("ComfyUI has no webui-user file or extensions/ folder: apply writes nothing there; "
                            "`lowvram launch` passes the flags on main.py's command line")
        return result
    os_name = facts.system.os if facts.system else "linux"
    hook_wanted = _hook_wanted(plan, ui)
    hook_config = str(paths.hook_config_path(webui)) if hook_wanted else None
    bvars = webui_user.block_vars(plan, hook_config)
    target = webui_user.choose_target(webui, os_name)
    result.target = str(target.path)

    with _locked(webui, held=lock_held or dry_run):
        if not dry_run:
            clean_stale(webui)
        manifest = Manifest.load(webui)
        label = rel(webui, target.path)
        previous = manifest.files.get(label, {})
        change = webui_user.plan_change(target, bvars,
                                        previously_added_newline=bool(previous.get("added_newline")))
        result.diff = webui_user.unified_diff(label, change.old, change.new)
        result.changes.append({"path": str(target.path), "action": change.action})

        # 1. the managed block
        if not dry_run and (change.action != "unchanged" or label not in manifest.files):
            # (unchanged but unrecorded: the block is there from a run whose manifest was lost)
            backup = None
            if change.old is not None:
                backup = webui_user.remove_block(change.old, target.kind,
                                                 added_newline=bool(previous.get("added_newline")),
                                                 where=str(target.path))
            manifest.record_file(target.path, change.old, change.new, block=change.block,
                                 added_newline=change.added_newline, backup_data=backup)
            manifest.save()
            if change.action != "unchanged":
                fsutil.atomic_write_bytes(target.path, change.new)

        # 2. the hook
        if hook_wanted:
            hchange = hook_mod.plan_hook(webui) if dry_run else hook_mod.install_hook(webui, manifest)
            if hchange.action == "missing":
                result.notes.append(hchange.reason)
            else:
                result.changes.append({"path": str(hchange.path), "action": hchange.action})
            if not dry_run:
                gpu = facts.usable_gpus[0] if facts.usable_gpus else None
                cfg_path = hook_mod.write_config(plan, webui, driver=gpu.driver if gpu else None,
                                                 vram_total_mb=gpu.vram_total_mb if gpu else None)
                result.notes.append(f"hook config: {cfg_path}")

        # 3. the extensions the plan lists
        if plan.extensions:
            registry = ext_mod.load_registry()
            entries = []
            for spec in plan.extensions:
                # The plan's URL, pin and folder; the registry's knowledge of where it works.
                known = registry.get(spec.name)
                entries.append(ext_mod.RegistryEntry(
                    name=spec.name, url=spec.url or (known.url if known else ""),
                    ref=spec.ref or (known.ref if known else ""),
                    dir=spec.dir or (known.dir if known else ext_mod.dir_for_url(spec.url)),
                    uis=known.uis if known else (ui,), file=known.file if known else "",
                    why=spec.reason or (known.why if known else ""), skip=known.skip if known else ()))
            results = ext_mod.install(webui, entries, manifest, ui=ui, sources=sources, update=update,
                                      progress=progress, dry_run=dry_run)
            result.extensions = [r.to_dict() for r in results]
            for r in results:
                if r.status == "installed" and not dry_run:
                    result.changes.append({"path": str(webui / "extensions" / r.dir), "action": "created"})
                elif r.status == "updated" and not dry_run:
                    result.changes.append({"path": str(webui / "extensions" / r.dir), "action": "modified"})
            if any(r.status == "failed" for r in results):
                result.exit_code = 1
        config_key = "config.json"
        if not dry_run and config_key in manifest.files and any("enabled again" in e.get("reason", "")
                                                                 for e in result.extensions):
            result.changes.append({"path": str(webui / config_key), "action": "modified"})
    return result


def _revert_file(webui: Path, key: str, entry: dict[str, Any], manifest: Manifest) -> str:
    """Undo one file change; returns the action (removed | modified | unchanged)."""
    path = webui / key
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        return "unchanged"
    unchanged_since = entry.get("written_sha256") == sha256(current)
    if "block_sha256" in entry:
        kind = webui_user.SH if key.endswith(".sh") else webui_user.BAT
        if unchanged_since and entry.get("backup"):
            restored = manifest.read_backup(str(entry["backup"]))
            new = restored if restored is not None else webui_user.remove_block(
                current, kind, added_newline=bool(entry.get("added_newline")), where=str(path))
        else:
            new = webui_user.remove_block(current, kind, added_newline=bool(entry.get("added_newline")),
                                          where=str(path))
        if entry.get("created") and new.strip() == b"":
            fsutil.kill_point("revert:file:before-unlink")
            path.unlink()
            return "removed"
    # config.json: the exact old bytes when nobody touched it since; else put the keys back.
    elif unchanged_since and entry.get("backup"):
        restored = manifest.read_backup(str(entry["backup"]))
        if restored is None:
            return "unchanged"
        new = restored
    else:
        from lowvram.apply import extensions as ext_mod

        changes = manifest.config_keys.get(key, {})
        return "modified" if ext_mod.config_put_back(webui, key, changes) else "unchanged"
    if new == current:
        return "unchanged"
    fsutil.atomic_write_bytes(path, new)
    return "modified"


def _revert_unrecorded(webui: Path) -> list[dict[str, str]]:
    """Without a manifest: take the managed block out of the webui-user files that hold one.

    The marker lines are lowvram's alone, so this is safe; a webui.settings.bat left empty was
    lowvram's own (the stock tree has none).
    """
    changes: list[dict[str, str]] = []
    for name, kind in (("webui-user.sh", webui_user.SH), ("webui-user.bat", webui_user.BAT),
                       ("webui.settings.bat", webui_user.BAT)):
        path = webui / name
        data = webui_user.read_bytes(path)
        if data is None or webui_user.find_block(data, kind, str(path)) is None:
            continue
        new = webui_user.remove_block(data, kind, where=str(path))
        if name == "webui.settings.bat" and not new.strip():
            path.unlink()
            changes.append({"path": str(path), "action": "removed"})
        else:
            fsutil.atomic_write_bytes(path, new)
            changes.append({"path": str(path), "action": "modified"})
    return changes


def revert(webui: Path, *, lock_held: bool = False) -> RevertResult:
    """Undo exactly what manifest.json records (DESIGN.md §6 Revert)."""
    from lowvram.apply import extensions as ext_mod

    webui = Path(webui).resolve()
    result = RevertResult()
    with _locked(webui, held=lock_held):
        clean_stale(webui)
        manifest = Manifest.load(webui)
        if not manifest.exists:
            result.changes = _revert_unrecorded(webui)
            why = ("lowvram's manifest for this WebUI was unreadable (kept aside as manifest.broken.json)"
                   if manifest.broken else "lowvram has no manifest for this WebUI")
            if result.changes:
                result.notes.append(f"{why}: took out the managed block, found by its marker lines; anything else "
                                    "lowvram installed (extensions/) is left as it is")
            else:
                result.notes.append("lowvram has not changed anything in this WebUI (no manifest)" if not manifest.broken
                                    else f"{why}; no managed block found")
            return result
        for key, entry in sorted(manifest.files.items()):
            action = _revert_file(webui, key, entry, manifest)
            result.changes.append({"path": str(webui / key), "action": action})
        for name, entry in sorted(manifest.extensions.items()):
            status, reason = ext_mod.remove_installed(webui, name, entry)
            result.extensions.append({"name": name, "dir": entry.get("dir"), "url": entry.get("url"),
                                      "ref": entry.get("ref"), "status": status, "reason": reason})
            if status == "removed":
                result.changes.append({"path": str(webui / "extensions" / str(entry.get("dir"))),
                                       "action": "removed"})
            elif status == "restored":
                result.changes.append({"path": str(webui / "extensions" / str(entry.get("dir"))),
                                       "action": "modified"})
        if manifest.hook is not None:
            status, reason = hook_mod.remove_hook(webui, manifest)
            hook_path = webui / str(manifest.hook.get("dir"))
            if status == "removed":
                result.changes.append({"path": str(hook_path), "action": "removed"})
            elif status == "kept":
                result.notes.append(f"kept {hook_path}: {reason}")
        for directory in sorted(manifest.dirs_created, key=len, reverse=True):
            path = webui / directory
            with contextlib.suppress(OSError):
                path.rmdir()  # only once empty: whatever the user put there stays
                result.changes.append({"path": str(path), "action": "removed"})
        with contextlib.suppress(OSError):
            paths.hook_config_path(webui).unlink()
        manifest.delete()
    return result
