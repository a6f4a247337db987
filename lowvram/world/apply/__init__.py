"""`apply` and `revert`: write a Plan into a WebUI tree, and take out exactly what was put in.

Crash-safe order (docs/architecture.md#safety-on-the-users-tree): stale temps from a killed run are removed first; the manifest
and backups are written and fsynced before each change to the tree; an extension is recorded
before its clone is renamed into place. A kill at any moment leaves every file old or new, and
the next run finishes the job. The WebUI's lock is held throughout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.errors import ApplyError
from lowvram.core.facts import Facts
from lowvram.core.plan import Plan
from lowvram.world import fsutil, gitops, paths
from lowvram.world.apply import forge_settings, webui_user
from lowvram.world.apply import hook as hook_mod
from lowvram.world.apply.manifest import Manifest, check_applied, rel, sha256

if TYPE_CHECKING:
    from lowvram.world.apply.extensions import RegistryEntry

__all__ = ["ApplyResult", "RevertResult", "apply_plan", "check_applied", "check_writable", "not_writable",
           "refuse_sudo_on_own_folder", "revert", "write_error"]

NO_FILES_UIS = ("comfyui",)
# Files lowvram writes that a user may keep as links into another folder of the tree: a killed
# write leaves its temp file beside the link's target, so that folder is cleaned as well.
LINKABLE = ("webui-user.sh", "webui-user.bat", "webui.settings.bat", "webui.settings.sh", "config.json")
MAX_FILE_BYTES = 64 * 1024 * 1024  # what revert reads of a file it changed (webui-user, config.json)


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


def clean_stale(webui: Path, *also: Path) -> list[Path]:
    """Remove what a killed lowvram run left: temp files/dirs in the tree, extensions/, state dir
    (and `also`: the folder of a linked file's target). Never in a folder a link leads to outside
    the tree: nothing there is lowvram's to remove."""
    removed: list[Path] = []
    linked = [Path(os.path.realpath(webui / name)).parent for name in LINKABLE if os.path.islink(webui / name)]
    for directory in dict.fromkeys((webui, webui / "extensions", *linked, *also)):
        if fsutil.is_inside(directory, webui):
            removed += fsutil.clean_stale_temps(directory)
    for directory in (paths.webui_state_dir(webui), paths.backups_dir(webui)):
        removed += fsutil.clean_stale_temps(directory)
    return removed


def _links_preflight(webui: Path, target: Path, new: bytes, old: bytes | None, *, hook: bool) -> Path:
    """Every check that can fail before the first write, so a refused apply leaves all as it was:
    where the webui-user file is really written (a link inside the tree is kept and its target
    edited; out of the tree, refused), the hook folder, lowvram's own files, and free space.
    Returns the real path to write the webui-user file to."""
    real = fsutil.write_target(target, webui, "webui-user file")
    fsutil.check_replaceable(paths.manifest_path(webui), "manifest")
    fsutil.check_replaceable(paths.hook_config_path(webui), "hook config")
    hook_bytes = 0
    if hook:
        change = hook_mod.plan_hook(webui)
        if change.action in ("created", "modified"):
            hook_bytes = hook_mod.hook_bytes(paths.bundled_patches_dir())
    block_bytes = len(new) if new != old else 0
    if block_bytes or hook_bytes:  # nothing to write (a re-apply): a full disk is no reason to refuse
        parts = [f"writing {target.name}"] * bool(block_bytes) + ["copying lowvram's hook"] * bool(hook_bytes)
        fsutil.check_free_space(real.parent, block_bytes + hook_bytes, "while " + " and ".join(parts))
        fsutil.check_free_space(paths.state_dir(), 2 * len(old or b"") + 64 * 1024, "while writing lowvram's manifest")
    return real


def _hook_wanted(plan: Plan, ui: str) -> bool:
    return ui == "a1111" and bool(plan.hook.enabled)


# ---------------------------------------------------------------------------------------------
# Preconditions: checked before the first write, so a refused run leaves the tree as it was


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _mount_point(path: Path) -> Path:
    probe = Path(os.path.abspath(path))
    while not os.path.ismount(probe) and probe.parent != probe:
        probe = probe.parent
    return probe


def not_writable(folder: Path, exc: OSError) -> tuple[str, str]:
    """(why, what to do) for a folder lowvram cannot write in: a read-only mount, another user's
    folder, a full disk."""
    if exc.errno == errno.EROFS:
        return (str(exc.strerror or "Read-only file system"),
                f"remount it read-write (`sudo mount -o remount,rw {_mount_point(folder)}`) or copy the WebUI to a "
                "writable disk")
    if exc.errno in (errno.EACCES, errno.EPERM):
        try:
            owner = _user(folder.stat().st_uid)
        except OSError:
            owner = "another user"
        me = _user(os.geteuid()) if hasattr(os, "geteuid") else "this user"
        return (f"{exc.strerror or 'Permission denied'} (it belongs to {owner}; lowvram runs as {me})",
                f"run lowvram as {owner}, or make the folder writable for {me}")
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on the disk", "free some disk space and run again"
    return str(exc.strerror or exc), "check the folder and its permissions"


def _not_writable(folder: Path, exc: OSError) -> ApplyError:
    why, todo = not_writable(folder, exc)
    if exc.errno == errno.EROFS:
        todo = f"the WebUI folder is read-only: {todo}"
    return ApplyError(f"cannot write in {folder}: {why}", f"{todo}; nothing was changed")


def refuse_sudo_on_own_folder(folder: Path) -> None:
    """`sudo lowvram …` on the user's own WebUI: what root writes there would belong to root, so the
    UI (run as the user) could no longer save its config.json or update those extensions."""
    sudo_uid = os.environ.get("SUDO_UID", "")
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not sudo_uid.isdigit() or int(sudo_uid) == 0:
        return
    try:
        owner = folder.stat().st_uid
    except OSError:
        return
    if owner == int(sudo_uid):
        raise ApplyError(f"lowvram runs as root (sudo) and {folder} belongs to {_user(owner)}: what it wrote there "
                         "would belong to root, and the UI run as that user could not change it",
                         "run lowvram without sudo; nothing was changed")


def write_error(folder: Path) -> OSError | None:
    """Why no file can be made in `folder` (a read-only mount, another user's folder, no space), or
    None. As root a mode bit proves nothing, so a file is really made: an unnamed one (O_TMPFILE)
    where the file system has them, which a kill cannot leave behind; else a temp file of lowvram's
    (the next run's clean-up removes one a kill left)."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            os.close(os.open(folder, os.O_WRONLY | tmpfile, 0o600))
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP):
                return exc
    tmp = fsutil.temp_name(folder / "write-check")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        return exc
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


def _mount_points() -> set[str]:
    """Every mount point (Linux's /proc/self/mountinfo; empty elsewhere): a file can be one too."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return set()
    points = set()
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _check_replaceable(path: Path, mounts: set[str]) -> None:
    """A file lowvram replaces (a new file renamed over it): not a mount point of its own (a bind-
    mounted file, as Docker volumes make, refuses the rename: EBUSY), not a read-only one."""
    if str(path) in mounts:
        raise ApplyError(f"cannot replace {path}: it is a mount point of its own (a bind-mounted file)",
                         "lowvram writes a new file and renames it over the old one, which a mount point refuses: "
                         "mount its folder instead of the file; nothing was changed")
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)))
    except OSError as exc:
        if exc.errno == errno.EPERM:  # even root may not: chattr +i (or +a); a rename over it fails too
            raise ApplyError(f"cannot write {path}: {exc.strerror} (the file is marked immutable or append-only)",
                             f"see `lsattr {path}`; `sudo chattr -i -a {path}` clears it; nothing was changed") from exc
        if exc.errno == errno.EROFS:
            why, todo = not_writable(path, exc)
            raise ApplyError(f"cannot write {path}: {why}", f"the file is read-only: {todo}; nothing was changed") from exc


def check_writable(paths_: Iterable[Path]) -> None:
    """Refuse (ApplyError, one line) before the first write when lowvram cannot write what it is
    about to: a folder (for one not made yet, its nearest existing parent) or a file it replaces
    (and that file's folder); or when the folder is the user's own and lowvram runs under sudo."""
    seen: set[Path] = set()
    mounts: set[str] | None = None
    for path in paths_:
        probe = Path(path)
        replaced = probe if probe.is_file() and not probe.is_symlink() else None
        if replaced is not None:
            probe = probe.parent
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if probe.is_dir() and probe not in seen:
            seen.add(probe)
            refuse_sudo_on_own_folder(probe)
            err = write_error(probe)
            if err is not None:
                raise _not_writable(probe, err) from err
        if replaced is not None:  # (its folder first: a read-only mount is said as such)
            mounts = _mount_points() if mounts is None else mounts
            _check_replaceable(replaced, mounts)


def _extension_entries(plan: Plan, ui: str) -> list[RegistryEntry]:
    """The plan's extensions as registry entries: the plan's URL, pin and folder; the registry's
    knowledge of where each works."""
    from lowvram.world.apply import extensions as ext_mod

    if not plan.extensions:
        return []
    registry = ext_mod.load_registry()
    entries = []
    for spec in plan.extensions:
        known = registry.get(spec.name)
        entries.append(ext_mod.RegistryEntry(
            name=spec.name, url=spec.url or (known.url if known else ""),
            ref=spec.ref or (known.ref if known else ""),
            dir=spec.dir or (known.dir if known else ext_mod.dir_for_url(spec.url)),
            uis=known.uis if known else (ui,), file=known.file if known else "",
            why=spec.reason or (known.why if known else ""), skip=known.skip if known else ()))
    return entries


def _apply_preflight(webui: Path, manifest: Manifest, *, target: Path | None, hook: bool,
                     entries: list[RegistryEntry], ui: str, sources: Mapping[str, str] | None,
                     update: bool) -> None:
    """Refuse before the first write: git missing or refusing a checkout, or a folder apply would
    write in that cannot be written."""
    from lowvram.world.apply import extensions as ext_mod

    folders = [target] if target is not None else []
    if hook and hook_mod.plan_hook(webui).action in ("created", "modified"):
        folders.append(hook_mod.hook_dir(webui).parent)
    folders += ext_mod.preflight(webui, entries, manifest, ui=ui, sources=sources, update=update)
    check_writable(folders)


def _write_block(manifest: Manifest, target: webui_user.Target, change: webui_user.FileChange,
                 previous: Mapping[str, Any], real_target: Path) -> None:
    """Record the webui-user change (and back the user's bytes up), then write it atomically."""
    backup = None
    if change.old is not None:
        backup = webui_user.remove_block(change.old, target.kind, added_newline=bool(previous.get("added_newline")),
                                         where=str(target.path), recorded=previous.get("block_sha256"))
    manifest.record_file(target.path, change.old, change.new, block=change.block,
                         added_newline=change.added_newline, backup_data=backup)
    manifest.save()
    if change.action != "unchanged":
        fsutil.atomic_write_bytes(real_target, change.new)  # a link's target inside the tree: the link stays


def _apply_hook(plan: Plan, webui: Path, facts: Facts, manifest: Manifest, result: ApplyResult, *,
                staged: hook_mod.StagedHook | None) -> None:
    """The staged hook into place (dry run: what would happen), and its config in the state dir."""
    hchange = hook_mod.plan_hook(webui) if staged is None else hook_mod.commit_hook(webui, manifest, staged)
    if hchange.action == "missing":
        result.notes.append(hchange.reason)
    else:
        result.changes.append({"path": str(hchange.path), "action": hchange.action})
    if staged is not None:
        gpu = facts.usable_gpus[0] if facts.usable_gpus else None
        cfg_path = hook_mod.write_config(plan, webui, driver=gpu.driver if gpu else None,
                                         vram_total_mb=gpu.vram_total_mb if gpu else None)
        result.notes.append(f"hook config: {cfg_path}")


def _apply_forge_settings(change: forge_settings.ConfigChange, manifest: Manifest, result: ApplyResult, *,
                          dry_run: bool) -> None:
    """Forge's memory settings into config.json (world/apply/forge_settings.py); the dry run names them."""
    if not dry_run:
        forge_settings.commit(change, manifest)
    action = ("created" if change.old is None else "modified") if change.changed else "unchanged"
    result.changes.append({"path": str(change.path), "action": action})
    verb = "would write" if dry_run and change.changed else "holds" if not change.changed else "wrote"
    result.notes.append(f"Forge's memory settings: config.json {verb} {change.describe()} (a browser page load "
                        "resets Swap Method and Swap Location to Queue and CPU, and GPU Weights to the UI preset's "
                        "value; with --nowebui Forge applies the stored values only once one is posted to "
                        "/sdapi/v1/options)")


def apply_plan(plan: Plan, webui: Path, facts: Facts, *, dry_run: bool = False,
               progress: gitops.Progress | None = None, lock_held: bool = False,
               sources: Mapping[str, str] | None = None, update: bool = False) -> ApplyResult:
    """Write `plan` into the WebUI at `webui`: the managed block, the hook, the extensions.

    `lock_held=True` when the caller (launch) already holds the WebUI's lock. An extension that
    cannot be fetched does not stop the rest: it is reported "failed" and exit_code is 1.
    """
    from lowvram.world.apply import extensions as ext_mod

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
    target = webui_user.choose_target(webui, os_name, ui)
    result.target = str(target.path)

    with _locked(webui, held=lock_held or dry_run):
        manifest = Manifest.load(webui, read_only=dry_run)
        label = rel(webui, target.path)
        previous = manifest.files.get(label, {})
        change = webui_user.plan_change(target, bvars,
                                        previously_added_newline=bool(previous.get("added_newline")),
                                        recorded=previous.get("block_sha256"))
        real_target = _links_preflight(webui, target.path, change.new, change.old, hook=hook_wanted)
        if not dry_run:
            clean_stale(webui, real_target.parent)
        result.diff = webui_user.unified_diff(label, change.old, change.new)
        result.changes.append({"path": str(target.path), "action": change.action})
        entries = _extension_entries(plan, ui)
        if dry_run:
            ext_mod.require_git_for(entries, ui=ui)  # what apply would refuse, the dry run says too
        else:
            _apply_preflight(webui, manifest, target=target.path if change.action != "unchanged" else None,
                             hook=hook_wanted, entries=entries, ui=ui, sources=sources, update=update)
        forge_change = forge_settings.plan_change(webui, plan)  # a damaged config.json: refused before any write
        if forge_change is not None and forge_change.changed and not dry_run:
            check_writable([forge_change.real])

        # 1. the hook is copied beside its place first: a copy that fails (a full disk) leaves the
        # tree as it was; 2. the managed block; 3. the hook renamed into place
        staged = hook_mod.stage_hook(webui, manifest) if hook_wanted and not dry_run else None
        try:
            if not dry_run and (change.action != "unchanged" or label not in manifest.files):
                # (unchanged but unrecorded: the block is there from a run whose manifest was lost)
                _write_block(manifest, target, change, previous, real_target)
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        if forge_change is not None:
            _apply_forge_settings(forge_change, manifest, result, dry_run=dry_run)
        if hook_wanted:
            _apply_hook(plan, webui, facts, manifest, result, staged=staged)

        # 3. the extensions the plan lists
        if entries:
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
    current = fsutil.read_regular_bytes(path, MAX_FILE_BYTES, "file")  # type checked first: never blocks
    if current is None:
        return "unchanged"
    unchanged_since = entry.get("written_sha256") == sha256(current)
    if "block_sha256" in entry:
        kind = webui_user.SH if key.endswith(".sh") else webui_user.BAT
        if unchanged_since and entry.get("backup"):
            restored = manifest.read_backup(str(entry["backup"]))
            new = restored if restored is not None else webui_user.remove_block(
                current, kind, added_newline=bool(entry.get("added_newline")), where=str(path),
                recorded=entry.get("block_sha256"))
        else:
            new = webui_user.remove_block(current, kind, added_newline=bool(entry.get("added_newline")),
                                          where=str(path), recorded=entry.get("block_sha256"))
        if entry.get("created") and new.strip() == b"":
            fsutil.kill_point("revert:file:before-unlink")
            fsutil.write_target(path, webui).unlink()  # a link's target: the link stays as it was
            return "removed"
    elif unchanged_since and entry.get("created") and not entry.get("backup") and key == forge_settings.CONFIG:
        fsutil.write_target(path, webui).unlink()  # config.json apply made, as it wrote it: gone again
        return "removed"
    # config.json: the exact old bytes when nobody touched it since; else put the keys back.
    elif unchanged_since and entry.get("backup"):
        restored = manifest.read_backup(str(entry["backup"]))
        if restored is None:
            return "unchanged"
        new = restored
    else:
        from lowvram.world.apply import extensions as ext_mod

        changes = manifest.config_keys.get(key, {})
        put = ext_mod.config_put_back(webui, key, changes)
        put = forge_settings.put_back(webui, key, changes) or put  # Forge's memory keys lowvram wrote
        return "modified" if put else "unchanged"
    if new == current:
        return "unchanged"
    fsutil.atomic_write_bytes(path, new, within=webui)
    return "modified"


def _revert_unrecorded(webui: Path) -> list[dict[str, str]]:
    """Without a manifest: take the managed block out of the webui-user files that hold one.

    The marker lines are lowvram's alone, so this is safe; a webui.settings.bat/.sh left empty was
    lowvram's own (no stock tree has one).
    """
    changes: list[dict[str, str]] = []
    for name, kind in (("webui-user.sh", webui_user.SH), ("webui-user.bat", webui_user.BAT),
                       ("webui.settings.bat", webui_user.BAT), ("webui.settings.sh", webui_user.SH)):
        path = webui / name
        data = webui_user.read_bytes(path)
        if data is None or webui_user.find_block(data, kind, str(path)) is None:
            continue
        new = webui_user.remove_block(data, kind, where=str(path))
        if name.startswith("webui.settings.") and not new.strip():
            fsutil.write_target(path, webui).unlink()
            changes.append({"path": str(path), "action": "removed"})
        else:
            fsutil.atomic_write_bytes(path, new, within=webui)
            changes.append({"path": str(path), "action": "modified"})
    return changes


def _revert_preflight(webui: Path, manifest: Manifest) -> None:
    """Refuse before the first write: git missing or refusing an extension lowvram installed, or a
    folder revert would write in that cannot be written."""
    from lowvram.world.apply import extensions as ext_mod

    folders = [webui / key for key in manifest.files if (webui / key).exists()]
    if manifest.hook is not None and hook_mod.hook_dir(webui).exists():
        folders.append(hook_mod.hook_dir(webui).parent)
    folders += ext_mod.revert_preflight(webui, manifest.extensions)
    check_writable(folders)


def revert(webui: Path, *, lock_held: bool = False) -> RevertResult:
    """Undo exactly what manifest.json records (docs/architecture.md#safety-on-the-users-tree, "Revert")."""
    from lowvram.world.apply import extensions as ext_mod

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
        for key in manifest.files:  # a link that leads out of the tree now: refused before any change
            if os.path.lexists(webui / key):
                real = fsutil.write_target(webui / key, webui)
                clean_stale(webui, real.parent)  # a linked file's target: a killed write's temp is beside it
        _revert_preflight(webui, manifest)
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
