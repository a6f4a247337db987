"""Crash-safe file primitives: atomic writes, stale-temp cleanup, kill points and the WebUI lock.

Every file lowvram writes goes through `atomic_write_bytes`: a temp file in the same directory,
fsync, rename, fsync of the directory. A kill at any moment leaves the old bytes or the new bytes.
Temp names carry `TEMP_MARK` so the next run can remove what a killed run left (DESIGN.md §6).

Kill points: tests set `LOWVRAM_KILL_AT=<n>` to make the process SIGKILL itself at the n-th kill
point it reaches (counting from 1), or `LOWVRAM_KILL_AT=<name>` to stop at a named one;
`LOWVRAM_KILL_TRACE=<file>` appends each point's name as it is reached, so a test can count them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lowvram.errors import ApplyError, LockError, LowvramError

TEMP_MARK = ".lowvram-tmp-"

_kill_counter = 0


def kill_point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) when a test asked for this point."""
    global _kill_counter
    trace = os.environ.get("LOWVRAM_KILL_TRACE")
    target = os.environ.get("LOWVRAM_KILL_AT")
    if not trace and not target:
        return
    _kill_counter += 1
    if trace:
        with open(trace, "a", encoding="utf-8") as fh:
            fh.write(name + "\n")
    if target and (target == name or (target.isdigit() and int(target) == _kill_counter)):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def temp_name(target: Path) -> Path:
    return target.with_name(f".{target.name}{TEMP_MARK}{secrets.token_hex(4)}")


def fsync_dir(directory: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_os_error(path: Path, exc: OSError) -> ApplyError:
    if exc.errno == errno.ENOSPC:
        return ApplyError(f"no space left on the disk while writing {path}", "free some disk space and run again")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ApplyError(
            f"cannot write {path}: {exc.strerror}",
            "make the WebUI folder writable for this user (or run lowvram as the user that owns it)",
        )
    if exc.errno == errno.EFBIG:
        return ApplyError(f"file too large while writing {path}", "check the process' file size limit (ulimit -f)")
    return ApplyError(f"cannot write {path}: {exc.strerror or exc}", "check the path and its permissions")


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace `path` with `data` atomically, keeping the old file's mode unless `mode` is given."""
    path = Path(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = None
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644 if mode is None else mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                _write_all(fh, data, path)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if mode is not None:
            os.chmod(tmp, mode)
        kill_point(f"write:{path.name}:before-rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        kill_point(f"write:{path.name}:after-rename")
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _describe_os_error(path, exc) from exc


def _write_all(fh: BinaryIO, data: bytes, path: Path) -> None:
    half = len(data) // 2
    fh.write(data[:half])
    if half:
        fh.flush()
        kill_point(f"write:{path.name}:half-written")
    fh.write(data[half:])


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: Path, obj: Any, mode: int | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"), mode)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


class UnsafeFileError(LowvramError):
    """A path that must not be opened as a regular file: a FIFO, socket, device, folder or a file
    over the size limit. Raised before anything blocks or fills memory (DESIGN.md §8)."""


KIND_NAMES = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def special_kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, name in KIND_NAMES:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def read_regular_bytes(path: Path, limit: int, what: str = "file") -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes; None when it does not exist.

    Checks the type before opening (a FIFO would block the open forever) and opens with
    O_NONBLOCK as well, in case the path is swapped between the check and the open; a link is
    followed for reading only. Anything else is one UnsafeFileError naming the path.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnsafeFileError(f"cannot read the {what} {path}: {exc.strerror or exc}", "check its permissions") from exc
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise UnsafeFileError(f"the {what} {path} is {kind}, not a file", "move it away (or replace it with a file) "
                              "and run again")
    if st.st_size > limit:
        raise UnsafeFileError(f"the {what} {path} is {st.st_size // (1024 * 1024)} MiB, over the "
                              f"{max(1, limit // (1024 * 1024))} MiB lowvram reads", "check that it is the right file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise UnsafeFileError(f"cannot read the {what} {path}: {exc.strerror or exc}", "check its permissions") from exc
    with os.fdopen(fd, "rb") as fh:
        if special_kind(os.fstat(fh.fileno()).st_mode) is not None:
            raise UnsafeFileError(f"the {what} {path} changed into a special file while being read",
                                  "run again when nothing else is changing it")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"the {what} {path} grew over the {limit // (1024 * 1024)} MiB lowvram reads",
                              "check that it is the right file")
    return data


def clean_stale_temps(directory: Path) -> list[Path]:
    """Remove temp files and directories a killed lowvram run left in `directory`."""
    removed: list[Path] = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        if TEMP_MARK not in entry.name:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, onerror=_make_writable_and_retry)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _make_writable_and_retry(func: Any, path: str, _exc: Any) -> None:
    """git writes read-only pack files; Windows refuses to delete them until they are writable."""
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IWRITE | stat.S_IREAD)
        func(path)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, onerror=_make_writable_and_retry)


class FileLock:
    """An OS file lock (fcntl on POSIX, msvcrt on Windows), never a pid file.

    The lock dies with the process, so a killed lowvram never leaves a WebUI locked.
    """

    def __init__(self, path: Path, what: str = "this WebUI") -> None:
        self.path = Path(path)
        self.what = what
        self._fh: Any = None

    def acquire(self, timeout: float = 0.0) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+b")  # noqa: SIM115 - held for the lock's lifetime
        except OSError as exc:
            raise LockError(
                f"cannot create lowvram's lock file {self.path}: {exc.strerror or exc}",
                "check that lowvram's state folder is writable and has free space (LOWVRAM_HOME moves it)",
            ) from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                _lock_fd(fh)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK, errno.EDEADLK):
                    fh.close()
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fh)
                    fh.close()
                    raise LockError(
                        f"another lowvram process is using {self.what}{holder}",
                        "wait for it to finish (a running `lowvram launch` holds the lock until the UI exits)",
                    ) from exc
                time.sleep(0.1)
        # The holder's pid is only for the message another process shows: a full disk must not
        # turn a held lock into a failure (unbuffered, so nothing is left to flush at close).
        with contextlib.suppress(OSError):
            os.ftruncate(fh.fileno(), 0)
            os.write(fh.fileno(), f"pid {os.getpid()}\n".encode())
        self._fh = fh

    def release(self) -> None:
        if self._fh is None:
            return
        with contextlib.suppress(OSError):
            _unlock_fd(self._fh)
        self._fh.close()
        self._fh = None

    def fileno(self) -> int | None:
        """The held lock's descriptor (launch hands it to the UI so the lock outlives a killed lowvram)."""
        return None if self._fh is None else int(self._fh.fileno())

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fh: Any) -> str:
    try:
        fh.seek(0)
        text = fh.read(64).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text.startswith("pid ") else ""


if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _lock_fd(fh: Any) -> None:
        fh.seek(0)
        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError as exc:
            raise OSError(errno.EACCES, str(exc)) from exc

    def _unlock_fd(fh: Any) -> None:
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)  # type: ignore[attr-defined]

else:
    import fcntl

    def _lock_fd(fh: Any) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock_fd(fh: Any) -> None:
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def webui_lock(path: Path, what: str = "this WebUI", timeout: float = 0.0) -> Iterator[FileLock]:
    lock = FileLock(path, what)
    lock.acquire(timeout=timeout)
    try:
        yield lock
    finally:
        lock.release()
