"""The startup hook: copy patches/ into extensions/lowvram-layout and write its config.

The copy goes through a temp dir beside the target and a rename, so the UI never imports a
half-copied hook; it is redone only when the shipped bytes changed. Python's bytecode caches
(`__pycache__`) are neither copied nor compared.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from lowvram.core import markers
from lowvram.core.errors import ApplyError
from lowvram.core.plan import Plan
from lowvram.world import fsutil, paths
from lowvram.world.apply.manifest import Manifest

_SKIP_DIRS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
MAX_FILE_BYTES = 16 * 1024 * 1024  # a hook file is a few KiB; a bigger one is not lowvram's
BLOCK = 4096  # what a small file costs on disk, at least


def _skipped(relpath: Path) -> bool:
    return any(part in _SKIP_DIRS for part in relpath.parts) or relpath.suffix in (".pyc", ".pyo")


def _entry_hash(path: Path) -> str:
    """A file's sha256; a link, FIFO, socket or device as what it is (never opened, never followed)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"link:{fsutil.link_text(path)}"
    kind = fsutil.special_kind(st.st_mode)
    if kind is not None:
        return f"special:{kind}"
    try:
        data = fsutil.read_regular_bytes(path, MAX_FILE_BYTES, "hook file")
    except fsutil.UnsafeFileError:
        return "unreadable"
    return hashlib.sha256(data or b"").hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """relpath → sha256 of every file under `root` (caches left out). Links inside are not followed
    and nothing is opened before its type is known: a FIFO in the folder cannot block."""
    out: dict[str, str] = {}
    if not os.path.isdir(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in [*(d for d in dirnames if (here / d).is_symlink()), *filenames]:
            relpath = (here / name).relative_to(root)
            if not _skipped(relpath):
                out[relpath.as_posix()] = _entry_hash(here / name)
    return dict(sorted(out.items()))


def hook_dir(webui: Path) -> Path:
    return Path(webui) / "extensions" / markers.HOOK_EXTENSION_DIR


@dataclass(frozen=True)
class HookChange:
    path: Path
    action: str  # created | modified | unchanged | missing (no hook files in this build)
    reason: str = ""
    real: Path | None = None  # where the folder really is (extensions/ may be a link inside the tree)
    foreign: bool = False  # unchanged, but in a place lowvram may not change (not recorded as lowvram's)


def _kind_of(path: Path) -> tuple[str, os.stat_result] | None:
    st = fsutil.lstat_or_none(path, str(path))
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "link", st
    return fsutil.special_kind(st.st_mode) or "file", st


def writable_hook_dir(webui: Path, source: Path | None = None) -> Path:
    """Where the hook folder really is, when lowvram may install it there; else one ApplyError.

    extensions/ may be a link to a folder inside the tree (followed). A link out of the tree, a
    dangling or looping link, or a FIFO/file in place of a folder is refused: lowvram never changes
    anything a link leads to outside the tree. extensions/lowvram-layout itself must be lowvram's
    folder, not a link.
    """
    webui = Path(os.path.realpath(webui))
    shipped = source or paths.bundled_patches_dir()
    try:
        ext = fsutil.writable_folder(webui / "extensions", webui, "extensions folder")
    except ApplyError as exc:
        if "outside the WebUI folder" not in exc.message:
            raise
        real = Path(os.path.realpath(webui / "extensions")) / markers.HOOK_EXTENSION_DIR
        raise ApplyError(exc.message, f"copy the hook there yourself (cp -r \"{shipped}\" \"{real}\") and run "
                                      "again, or start the UI without it (`lowvram launch --no-hook`)") from exc
    dest = ext / markers.HOOK_EXTENSION_DIR
    found = _kind_of(dest)
    if found is None:
        return dest
    if found[0] == "link":
        raise ApplyError(f"{dest} is a link (to {fsutil.link_text(dest)}), not lowvram's hook folder",
                         "remove the link (lowvram installs its hook there as a folder of its own) and run again")
    if found[0] != "folder":
        raise ApplyError(f"{dest} is {_a(found[0])}, not lowvram's hook folder", "move it away and run again")
    return dest


def _a(kind: str) -> str:
    return "a file" if kind == "file" else kind


def plan_hook(webui: Path, source: Path | None = None) -> HookChange:
    """What installing the hook would do; refuses (ApplyError) where it may not write."""
    source = source or paths.bundled_patches_dir()
    shipped = file_hashes(source)
    dest = hook_dir(webui)
    if not shipped:
        return HookChange(dest, "missing", f"this lowvram has no hook files ({source} is empty or missing)")
    try:
        real = writable_hook_dir(webui, source)
    except ApplyError:
        if file_hashes(dest) == shipped:  # reading through a link is fine: what ships is there already
            return HookChange(dest, "unchanged", foreign=True)
        raise
    if not os.path.lexists(real):
        return HookChange(dest, "created", real=real)
    return HookChange(dest, "unchanged" if file_hashes(real) == shipped else "modified", real=real)


def hook_bytes(source: Path) -> int:
    """What a copy of the hook takes on disk, about (each file rounded up to a block, each folder one)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        total += BLOCK
        for name in filenames:
            size = os.path.getsize(os.path.join(dirpath, name))
            total += -(-size // BLOCK) * BLOCK
    return total


def _copy_hook(source: Path, tmp: Path) -> None:
    """Copy the shipped files (caches left out) into `tmp`, each fsynced; raises OSError as it is."""
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        relative = Path(dirpath).relative_to(source)
        (tmp / relative).mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames):
            if _skipped(relative / name):
                continue
            src, dst = Path(dirpath) / name, tmp / relative / name
            try:
                _copy_file(src, dst)
            except OSError as exc:
                raise _CopyError(exc, relative / name) from exc


def _copy_file(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    with open(dst, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        shutil.copymode(src, dst)
    except OSError as exc:  # FAT/exFAT keep no Unix modes (EPERM, ENOSYS): the copy is whole
        if exc.errno not in (errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise


class _CopyError(OSError):
    """An OSError while copying one hook file, naming the file's place in the hook folder."""

    def __init__(self, exc: OSError, relpath: Path) -> None:
        super().__init__(exc.errno, exc.strerror)
        self.relpath = relpath


def _copy_failed(exc: OSError, dest: Path, needed: int) -> ApplyError:
    """One line: a full disk says which disk and how much the hook needs; anything else names the file."""
    where = dest / exc.relpath if isinstance(exc, _CopyError) else dest
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(dest.parent).free
        return fsutil.no_space(dest.parent, needed, free, f"while copying lowvram's hook to {dest}")
    return fsutil._describe_os_error(where, exc)


@dataclass
class StagedHook:
    """A hook copied into a temp folder beside its place, not yet renamed into it."""

    change: HookChange
    tmp: Path | None = None  # None: nothing to copy (unchanged, missing)
    made: Path | None = None  # extensions/, when this run made it

    def discard(self) -> None:
        """Back to the tree as it was: the temp copy and an extensions/ this run made go."""
        if self.tmp is not None:
            fsutil.remove_tree(self.tmp)
            self.tmp = None
        if self.made is not None:
            with contextlib.suppress(OSError):
                self.made.rmdir()
            self.made = None


def stage_hook(webui: Path, manifest: Manifest, source: Path | None = None) -> StagedHook:
    """Copy the shipped hook into a temp folder beside its place, when it is missing or differs.

    Free space is checked first; a copy that fails anyway (a full disk, a quota, a file size
    limit) is one ApplyError line and leaves the tree as it was.
    """
    source = source or paths.bundled_patches_dir()
    change = plan_hook(webui, source)
    if change.action not in ("created", "modified"):
        return StagedHook(change)
    dest = change.real or change.path
    ext_dir = dest.parent
    needed = hook_bytes(source)
    fsutil.check_free_space(ext_dir, needed, f"while copying lowvram's hook to {change.path}")
    staged = StagedHook(change)
    fsutil.kill_point("hook:before-copy")  # nothing of this run is in the tree yet
    if not os.path.lexists(ext_dir):
        manifest.record_dir_created(ext_dir)
        manifest.save()
        ext_dir.mkdir(parents=True, exist_ok=True)
        staged.made = ext_dir
    staged.tmp = fsutil.temp_name(dest)
    try:
        _copy_hook(source, staged.tmp)
    except OSError as exc:
        staged.discard()
        raise _copy_failed(exc, change.path, needed) from exc
    return staged


def commit_hook(webui: Path, manifest: Manifest, staged: StagedHook, source: Path | None = None) -> HookChange:
    """Record the staged hook in the manifest, then rename it into place (the old one aside first)."""
    change = staged.change
    if staged.tmp is None:
        if change.action == "unchanged" and manifest.hook is None and not change.foreign:
            manifest.record_hook(change.path, file_hashes(source or paths.bundled_patches_dir()))
            manifest.save()
        return change
    try:
        manifest.record_hook(change.path, file_hashes(staged.tmp))
        manifest.save()
    except BaseException:
        staged.discard()
        raise
    fsutil.kill_point("hook:before-rename")
    dest = change.real or change.path
    old = None
    if os.path.lexists(dest):
        old = fsutil.temp_name(dest)
        dest.rename(old)  # a kill here leaves no hook; the next run removes `old` and installs again
        fsutil.kill_point("hook:old-moved-aside")
    staged.tmp.rename(dest)
    staged.tmp = staged.made = None
    if old is not None:
        fsutil.remove_tree(old)
    return change


def install_hook(webui: Path, manifest: Manifest, source: Path | None = None) -> HookChange:
    """Copy the shipped hook into the tree when it is missing or differs from what ships."""
    return commit_hook(webui, manifest, stage_hook(webui, manifest, source), source)


def remove_hook(webui: Path, manifest: Manifest) -> tuple[str, str]:
    """(status, reason): removed | kept | gone. Kept when someone edited the copied files, and
    whenever the folder is now a link or lies outside the tree (nothing there is lowvram's to remove)."""
    if manifest.hook is None:
        return "gone", ""
    dest = Path(webui) / str(manifest.hook.get("dir") or f"extensions/{markers.HOOK_EXTENSION_DIR}")
    if dest.name != markers.HOOK_EXTENSION_DIR:
        return "kept", "the manifest names an unexpected hook folder"
    if not os.path.lexists(dest):
        return "gone", ""
    if dest.is_symlink():
        return "kept", f"{dest.name} is a link now (to {fsutil.link_text(dest)}), not lowvram's folder"
    if not fsutil.is_inside(dest, webui):
        return "kept", f"{dest.name} is outside the WebUI folder now ({os.path.realpath(dest)}): lowvram never " \
                       "changes anything there"
    if not dest.is_dir():
        return "kept", f"{dest.name} is not a folder now"
    recorded = manifest.hook.get("files")
    current = file_hashes(dest)
    if isinstance(recorded, dict) and current != recorded:
        changed = sorted(set(current) ^ set(recorded) | {k for k in current if recorded.get(k) != current[k]})
        return "kept", f"{dest.name} holds files lowvram did not put there or changed: {', '.join(changed[:3])}"
    real = Path(os.path.realpath(dest))
    tmp = fsutil.temp_name(real)
    real.rename(tmp)
    fsutil.remove_tree(tmp)
    return "removed", ""


def write_config(plan: Plan, webui: Path, *, driver: str | None = None, vram_total_mb: int | None = None) -> Path:
    """The hook's config (paths.hook_config_path) from the plan; returns its path."""
    from lowvram.world.hookconfig import build_hook_config, write_hook_config

    path = paths.hook_config_path(webui)
    write_hook_config(path, build_hook_config(plan, webui, driver=driver, vram_total_mb=vram_total_mb))
    return path
