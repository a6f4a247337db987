"""manifest.json: everything lowvram changed in one WebUI tree, so `revert` can undo exactly that.

Lives in lowvram's state dir (paths.webui_state_dir), never in the tree, with backups/ beside it.
It is written and fsynced BEFORE the tree changes (docs/architecture.md#safety-on-the-users-tree, "Crash-safe order"): a kill at any
moment leaves a manifest that names at least everything the tree holds from lowvram.

Paths inside are relative to the WebUI root (POSIX form).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowvram.core import markers
from lowvram.world import fsutil, paths

SCHEMA = 1
MAX_BYTES = 64 * 1024 * 1024  # the manifest and each backup (a webui-user file, config.json)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rel(webui: Path, path: Path) -> str:
    return Path(path).relative_to(Path(webui)).as_posix()


@dataclass
class ManifestEntries:
    """What the manifest records: every change lowvram made in one tree, and its JSON form.

    No I/O: `Manifest` adds where it lives, how it is read and written, and the backups.
    """

    webui: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    config_keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    extensions: dict[str, dict[str, Any]] = field(default_factory=dict)
    hook: dict[str, Any] | None = None
    dirs_created: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.files or self.config_keys or self.extensions or self.hook or self.dirs_created)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "webui": str(self.webui),
            "files": self.files,
            "config_keys": self.config_keys,
            "extensions": self.extensions,
            "hook": self.hook,
            "dirs_created": self.dirs_created,
        }

    def read_dict(self, data: dict[str, Any]) -> None:
        """Take the entries from a parsed manifest.json, dropping any that have the wrong shape."""
        self.files = _dict(data.get("files"))
        self.config_keys = _dict(data.get("config_keys"))
        self.extensions = _dict(data.get("extensions"))
        hook = data.get("hook")
        self.hook = hook if isinstance(hook, dict) else None
        dirs = data.get("dirs_created")
        self.dirs_created = [d for d in dirs if isinstance(d, str)] if isinstance(dirs, list) else []

    def record_dir_created(self, path: Path) -> None:
        key = rel(self.webui, path)
        if key not in self.dirs_created:
            self.dirs_created.append(key)

    def record_extension(self, name: str, entry: dict[str, Any]) -> None:
        self.extensions[name] = entry

    def record_hook(self, directory: Path, files: dict[str, str]) -> None:
        self.hook = {"dir": rel(self.webui, directory), "files": files}


@dataclass
class Manifest(ManifestEntries):
    """The entries, kept in lowvram's state dir: loaded, saved before the tree changes, and the
    backups of the user's bytes beside them."""

    exists: bool = False  # read from disk (False: a fresh one)
    broken: bool = False  # one was there but unreadable (moved aside as manifest.broken.json)

    # -- persistence ---------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return paths.manifest_path(self.webui)

    @property
    def backups(self) -> Path:
        return paths.backups_dir(self.webui)

    @classmethod
    def load(cls, webui: Path, *, read_only: bool = False) -> Manifest:
        """The manifest on disk, or a fresh one. `read_only` (doctor) never moves a broken one aside."""
        webui = Path(webui).resolve()
        m = cls(webui=webui)
        try:
            # Type checked before opening (a FIFO there never blocks), and a size limit.
            raw = fsutil.read_regular_bytes(paths.manifest_path(webui), MAX_BYTES, "manifest")
            if raw is None:
                return m
            data = json.loads(raw.decode("utf-8"))
        except (fsutil.UnsafeFileError, ValueError, RecursionError):
            # A manifest that cannot be read: keep the broken one aside rather than lose it.
            broken = paths.manifest_path(webui)
            if not read_only:
                with contextlib.suppress(OSError):
                    os.replace(broken, broken.with_name("manifest.broken.json"))
            m.broken = True
            return m
        if not isinstance(data, dict):
            m.broken = True
            return m
        m.exists = True
        m.read_dict(data)
        return m

    def save(self) -> None:
        """Atomic + fsynced (fsutil): the tree may change only after this returns."""
        fsutil.atomic_write_json(self.path, self.to_dict())
        self.exists = True

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self.backups.is_dir():
            fsutil.remove_tree(self.backups)
        self.exists = False

    # -- backups -------------------------------------------------------------------------------

    def write_backup(self, relpath: str, data: bytes) -> str:
        name = relpath.replace("/", "__") + ".orig"
        fsutil.atomic_write_bytes(self.backups / name, data)
        return name

    def read_backup(self, name: str) -> bytes | None:
        try:
            return fsutil.read_regular_bytes(self.backups / name, MAX_BYTES, "backup")
        except fsutil.UnsafeFileError:
            return None

    def record_file(self, path: Path, old: bytes | None, new: bytes, *, block: bytes | None = None,
                    added_newline: bool = False, backup_data: bytes | None = None) -> None:
        """Note a change to `path` (from `old` to `new`) before it is made.

        The backup holds the user's bytes before lowvram's latest change from a user state: when the
        file still holds exactly what lowvram last wrote, the earlier backup stays; otherwise the
        current bytes (`backup_data`, e.g. with an old block taken out) are backed up again.
        """
        key = rel(self.webui, path)
        entry = self.files.get(key)
        if entry is None:
            entry = {"created": old is None, "backup": None}
        still_ours = old is not None and entry.get("written_sha256") == sha256(old)
        if old is not None and not still_ours:
            entry["backup"] = self.write_backup(key, old if backup_data is None else backup_data)
        if old is None and entry.get("backup") is None:
            entry["created"] = True
        entry["written_sha256"] = sha256(new)
        if block is not None:
            entry["block_sha256"] = sha256(block)
            entry["added_newline"] = bool(added_newline)
        self.files[key] = entry


def _dict(value: Any) -> dict[str, Any]:
    return {k: v for k, v in value.items() if isinstance(v, dict)} if isinstance(value, dict) else {}


def check_applied(webui: Path) -> list[str]:
    """What lowvram applied that is no longer there (for doctor; the fix is `lowvram apply`).

    A UI update or `git reset` that drops the block (A1111 #12915, Forge #1566), a hook folder or
    an extension that was removed.
    """
    from lowvram.world.apply import webui_user

    webui = Path(webui).resolve()
    m = Manifest.load(webui, read_only=True)
    if m.broken:
        return ["lowvram's manifest for this WebUI is unreadable, so `lowvram revert` cannot undo exactly what "
                "apply did (`lowvram apply` writes a fresh one)"]
    if not m.exists:
        return []
    problems: list[str] = []
    for key, entry in sorted(m.files.items()):
        if "block_sha256" not in entry:
            continue
        path = webui / key
        kind = webui_user.SH if key.endswith(".sh") else webui_user.BAT
        try:
            data = webui_user.read_bytes(path)
        except fsutil.UnsafeFileError as exc:
            problems.append(f"{key}: {exc.message}")
            continue
        if data is None:
            problems.append(f"{key} is gone, and with it lowvram's managed block")
            continue
        try:
            block = webui_user.block_bytes(data, kind, recorded=str(entry["block_sha256"]))
        except Exception as exc:  # damaged, or copied: the reason is in the message
            problems.append(getattr(exc, "message", None) or f"{key}: lowvram's managed block is broken")
            continue
        if block is None:
            problems.append(f"{key} no longer holds lowvram's managed block (a UI update or `git reset`?)")
        elif manifest_sha(block) != entry["block_sha256"]:
            problems.append(f"{key}: lowvram's managed block was edited since `lowvram apply`")
    if m.hook:
        hook_dir = webui / m.hook.get("dir", f"extensions/{markers.HOOK_EXTENSION_DIR}")
        if not hook_dir.is_dir():
            problems.append(f"the hook extension {hook_dir.relative_to(webui).as_posix()} is gone")
    for name, entry in sorted(m.extensions.items()):
        directory = entry.get("dir")
        if isinstance(directory, str) and not (webui / "extensions" / directory).is_dir():
            problems.append(f"the extension {name} (extensions/{directory}) is gone")
    return problems


def manifest_sha(data: bytes) -> str:
    return sha256(data)
