"""What tune changes in the tree and the state dir, saved before it starts and put back byte for byte afterwards."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lowvram.world import paths
from lowvram.world.fsutil import atomic_write_bytes, remove_tree, temp_name
from lowvram.world.tune.results import TuneError

_Saved = tuple[bytes, int]  # a file's bytes and mode
_CACHES = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")


def _save_file(path: Path) -> _Saved | None:
    try:
        return path.read_bytes(), path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TuneError(f"cannot read {path} to put it back after tuning: {exc.strerror or exc}",
                        "check its permissions") from exc


def _save_dir(root: Path) -> dict[str, _Saved] | None:
    """Every file under `root` (Python's caches left out, as the hook's install leaves them)."""
    if not root.is_dir():
        return None
    out: dict[str, _Saved] = {}
    for path in sorted(root.rglob("*")):
        relpath = path.relative_to(root)
        if any(part in _CACHES for part in relpath.parts) or relpath.suffix in (".pyc", ".pyo"):
            continue
        if path.is_file() and not path.is_symlink():
            saved = _save_file(path)
            if saved is not None:
                out[relpath.as_posix()] = saved
    return out


def _put_file(path: Path, saved: _Saved | None) -> None:
    if saved is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif _save_file(path) != saved:
        atomic_write_bytes(path, saved[0], saved[1])


def _put_dir(root: Path, saved: dict[str, _Saved] | None) -> None:
    """`root` holding exactly `saved` again (absent for None), swapped in through a temp dir."""
    if _save_dir(root) == saved:
        return
    old = temp_name(root) if root.exists() else None
    if old is not None:
        root.rename(old)
    if saved is not None:
        tmp = temp_name(root)
        tmp.mkdir(parents=True)
        for relpath, (data, mode) in saved.items():
            target = tmp / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            os.chmod(target, mode)
        tmp.rename(root)
    if old is not None:
        remove_tree(old)


@dataclass(frozen=True)
class TreeSnapshot:
    """What tune may change, as it was before tune: the webui-user files, the hook and its config,
    lowvram's manifest and backups. `restore` puts it all back byte for byte (docs/architecture.md#tune)."""

    webui: Path
    files: tuple[tuple[Path, _Saved | None], ...]
    hook_dir: dict[str, _Saved] | None
    extensions_dir: bool
    backups: dict[str, _Saved] | None
    manifest: _Saved | None

    @classmethod
    def take(cls, webui: Path) -> TreeSnapshot:
        from lowvram.world.apply.hook import hook_dir

        webui = Path(webui).resolve()
        names = ("webui-user.sh", "webui-user.bat", "webui.settings.bat", "webui.settings.sh")
        files = [webui / n for n in names] + [paths.hook_config_path(webui)]
        return cls(webui=webui, files=tuple((f, _save_file(f)) for f in files), hook_dir=_save_dir(hook_dir(webui)),
                   extensions_dir=(webui / "extensions").is_dir(), backups=_save_dir(paths.backups_dir(webui)),
                   manifest=_save_file(paths.manifest_path(webui)))

    def restore(self) -> list[str]:
        """The tree first, the manifest last (it must name at least what the tree holds from
        lowvram, docs/architecture.md#safety-on-the-users-tree, "Crash-safe order"). Returns what could not be put back."""
        from lowvram.world.apply.hook import hook_dir

        extensions = self.webui / "extensions"
        steps: list[tuple[str, Callable[[], None]]] = [
            (str(path), functools.partial(_put_file, path, saved)) for path, saved in self.files]
        steps.append((str(hook_dir(self.webui)), lambda: _put_dir(hook_dir(self.webui), self.hook_dir)))
        if not self.extensions_dir:
            steps.append((str(extensions), lambda: _rmdir_if_empty(extensions)))
        steps.append((str(paths.backups_dir(self.webui)), lambda: _put_dir(paths.backups_dir(self.webui),
                                                                           self.backups)))
        steps.append((str(paths.manifest_path(self.webui)), lambda: _put_file(paths.manifest_path(self.webui),
                                                                             self.manifest)))
        problems = []
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                problems.append(f"{what} could not be put back ({exc})")
        return problems


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # gone, or not empty: what someone else put there stays
        path.rmdir()


def stop_then_restore(stop: Callable[[], None], *restores: Callable[[], list[str]], name: str = "the UI") -> list[str]:
    """Stop the UI, then put back each part in turn (whatever stopping raised): what could not be done, in words.
    Every tune session ends through this, on success, error, Ctrl-C or SIGTERM alike."""
    problems: list[str] = []
    try:
        stop()
    except Exception as exc:
        problems.append(f"stopping {name}: {exc}")
    for restore in restores:
        problems += restore()
    return problems
