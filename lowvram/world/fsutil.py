"""Crash-safe file primitives: atomic writes, stale-temp cleanup, kill points and the WebUI lock.

Every file lowvram writes goes through `atomic_write_bytes`: a temp file in the same directory,
fsync, rename, fsync of the directory. A kill at any moment leaves the old bytes or the new bytes.
Temp names carry `TEMP_MARK` so the next run can remove what a killed run left (docs/architecture.md#safety-on-the-users-tree).

Kill points: tests set `LOWVRAM_KILL_AT=<n>` to make the process SIGKILL itself at the n-th kill
point it reaches (counting from 1), or `LOWVRAM_KILL_AT=<name>` to stop at a named one;
`LOWVRAM_KILL_TRACE=<file>` appends each point's name as it is reached, so a test can count them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lowvram.core.errors import ApplyError, LockError, LowvramError

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
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        where = mount_of(path)
        return ApplyError(f"no space left on the disk while writing {path} ({where} is full)",
                          f"free some disk space on {where} and run again")
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return ApplyError(
            f"cannot write {path}: {exc.strerror}",
            "make the WebUI folder writable for this user (or run lowvram as the user that owns it)",
        )
    if exc.errno == errno.EFBIG:
        return ApplyError(f"file too large while writing {path}", "check the process' file size limit (ulimit -f)")
    return ApplyError(f"cannot write {path}: {exc.strerror or exc}", "check the path and its permissions")


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, *, within: Path | None = None) -> None:
    """Replace `path` with `data` atomically, keeping the old file's mode unless `mode` is given.

    `within` (the WebUI tree, for its files): a link is kept as a link and its target written in
    place where it lies inside the tree, else refused (`write_target`). Without it (lowvram's own
    state files) a link or special file at `path` is replaced, never followed.
    """
    path = Path(path) if within is None else write_target(Path(path), within)
    if mode is None:
        try:  # a FIFO, a folder or a link loop in the way has no mode worth keeping
            st = os.stat(path)
            mode = stat.S_IMODE(st.st_mode) if stat.S_ISREG(st.st_mode) else None
        except OSError:
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
            try:
                os.chmod(tmp, mode)
            except OSError as exc:  # FAT/exFAT keep no Unix modes (EPERM, ENOSYS): the file is still whole
                if exc.errno not in (errno.EPERM, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
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
    over the size limit. Raised before anything blocks or fills memory (docs/architecture.md#damaged-and-hostile-inputs)."""


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


def lstat_or_none(path: Path, name: str) -> os.stat_result | None:
    """`os.lstat(path)`, None when nothing is there; any other failure is one ApplyError naming `name`."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ApplyError(f"cannot look at {name}: {exc.strerror or exc}", "check its permissions") from exc


def _stat_error(path: Path, what: str, exc: OSError) -> UnsafeFileError:
    if exc.errno == errno.ELOOP:
        return UnsafeFileError(f"the {what} {path} is a link that loops (it leads back to itself)",
                               "fix or remove the link and run again")
    return UnsafeFileError(f"cannot read the {what} {path}: {exc.strerror or exc}", "check its permissions")


def read_regular_bytes(path: Path, limit: int, what: str = "file", *, head: bool = False) -> bytes | None:
    """The bytes of a regular file of at most `limit` bytes; None when it does not exist.

    Checks the type before opening (a FIFO would block the open forever) and opens with
    O_NONBLOCK as well, in case the path is swapped between the check and the open; a link is
    followed for reading only. Anything else is one UnsafeFileError naming the path. `head`:
    the first `limit` bytes of a longer file instead of an error (a CHANGELOG's first lines).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _stat_error(path, what, exc) from exc
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise UnsafeFileError(f"the {what} {path} is {kind}, not a file", "move it away (or replace it with a file) "
                              "and run again")
    if st.st_size > limit and not head:
        raise UnsafeFileError(f"the {what} {path} is {_mib(st.st_size)} MiB, over the "
                              f"{_mib(limit)} MiB lowvram reads", "check that it is the right file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _stat_error(path, what, exc) from exc
    with os.fdopen(fd, "rb") as fh:
        if special_kind(os.fstat(fh.fileno()).st_mode) is not None:
            raise UnsafeFileError(f"the {what} {path} changed into a special file while being read",
                                  "run again when nothing else is changing it")
        data = fh.read(limit + 1)
    if len(data) > limit:
        if head:
            return data[:limit]
        raise UnsafeFileError(f"the {what} {path} grew over the {_mib(limit)} MiB lowvram reads",
                              "check that it is the right file")
    return data


def _mib(n: int) -> int:
    return max(1, -(-n // (1024 * 1024)))


# ---------------------------------------------------------------------------------------------
# Links: lowvram reads through them, but never changes anything a link leads to outside the tree


def is_inside(path: Path, root: Path) -> bool:
    """Whether `path`, every link followed, is `root` or under it (`root` resolved too)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def link_text(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _links_out(path: Path, target: str, root: Path, what: str) -> ApplyError:
    return ApplyError(f"the {what} {path} is a link to {target}, outside the WebUI folder {root}: lowvram never "
                      "changes files outside it",
                      f"replace the link with a copy of its target (cp --remove-destination \"{target}\" "
                      f"\"{path}\") and run again, or make the change by hand (`lowvram plan` shows it)")


def write_target(path: Path, within: Path, what: str = "file") -> Path:
    """Where an atomic write of `path` (a file inside the WebUI tree `within`) must go, or ApplyError.

    A regular or missing file: `path` itself, when its folder is inside the tree. A link whose
    target (existing or not) lies inside the tree: the target, so the link stays a link. A link
    out of the tree, a link loop, or a FIFO, socket, device or folder in place of the file: refused
    with one line naming it. Nothing is opened, so nothing blocks.
    """
    path = Path(path)
    root = Path(os.path.realpath(within))
    st = lstat_or_none(path, f"the {what} {path}")
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = link_text(path)
        try:
            real = Path(os.path.realpath(path, strict=False))
            os.stat(path)
        except FileNotFoundError:
            pass  # a dangling link: the file is made where it points
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ApplyError(f"the {what} {path} is a link that loops (to {target})",
                                 "fix or remove the link and run again") from exc
            raise ApplyError(f"cannot follow the link {path} (to {target}): {exc.strerror or exc}",
                             "fix or remove the link and run again") from exc
        if not real.is_relative_to(root):
            raise _links_out(path, str(real), root, what)
        return write_target(real, root, what) if real != path else real
    if st is not None and special_kind(st.st_mode) is not None:
        raise ApplyError(f"the {what} {path} is {special_kind(st.st_mode)}, not a file",
                         "move it away (lowvram writes a file there) and run again")
    if not Path(os.path.realpath(path.parent)).is_relative_to(root):
        raise ApplyError(f"the folder of the {what} {path} leads to {os.path.realpath(path.parent)}, outside the "
                         f"WebUI folder {root}: lowvram never changes files outside it", LINK_OUT_FOLDER_HINT)
    return path


def writable_folder(path: Path, within: Path, what: str = "folder") -> Path:
    """Where a folder lowvram writes into (extensions/) really is, or one ApplyError.

    Missing: `path` (lowvram makes it). A link to a folder inside the tree: the folder it leads to.
    A link out of the tree, a dangling or looping link, or a file, FIFO, socket or device in its
    place: refused, before anything is written. Nothing is opened.
    """
    path = Path(path)
    root = Path(os.path.realpath(within))
    st = lstat_or_none(path, f"the {what} {path}")
    if st is None:
        return path
    if stat.S_ISLNK(st.st_mode):
        target = link_text(path)
        try:
            real_st = os.stat(path)
        except OSError as exc:
            why = "that loops" if exc.errno == errno.ELOOP else "to a folder that does not exist"
            raise ApplyError(f"the {what} {path} is a link {why} ({target})",
                             "fix or remove the link (lowvram makes the folder) and run again") from exc
        real = Path(os.path.realpath(path))
        if not stat.S_ISDIR(real_st.st_mode):
            raise ApplyError(f"the {what} {path} is a link to {real}, which is {special_kind(real_st.st_mode) or 'a file'}"
                             ", not a folder", "fix or remove the link and run again")
        if not real.is_relative_to(root):
            raise ApplyError(f"the {what} {path} is a link to {real}, outside the WebUI folder: lowvram never "
                             "installs or changes anything outside it", LINK_OUT_FOLDER_HINT)
        return real
    if not stat.S_ISDIR(st.st_mode):
        raise ApplyError(f"the {what} {path} is {special_kind(st.st_mode) or 'a file'}, not a folder",
                         "move it away (lowvram makes the folder) and run again")
    return path


LINK_OUT_FOLDER_HINT = ("put what lowvram would install there yourself, or make it a real folder inside the WebUI "
                        "(move its contents back); `lowvram launch --no-hook` runs the UI without the hook")


def check_replaceable(path: Path, what: str = "file") -> None:
    """A file lowvram replaces in its own state folder: a link or special file there is simply
    replaced (nothing it leads to is changed); a folder cannot be, so it is refused up front."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise ApplyError(f"lowvram's {what} {path} is a folder, not a file", "move it away and run again")


# ---------------------------------------------------------------------------------------------
# Free space, checked before the first write


def mount_of(path: Path) -> str:
    """'/mnt/data (/dev/sdb1)': the mount point holding `path`, and its device where /proc says."""
    p = Path(os.path.realpath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    device = ""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/mounts", encoding="utf-8",
                                                          errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) > 1 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]) == str(p):
                device = fields[0]
    return f"{p} ({device})" if device and device != str(p) else str(p)


def size_text(n: int) -> str:
    """1.5 MiB, 96 KiB: a size as a person reads it."""
    if n < 1024 * 1024:
        return f"{max(1, -(-n // 1024))} KiB"
    mib = n / (1024 * 1024)
    return f"{mib:.1f} MiB" if mib < 10 else f"{round(mib)} MiB"


def no_space(path: Path, needed: int, free: int | None, doing: str) -> ApplyError:
    """One line: which disk, what lowvram was doing, how much it needs (and has, where that is less)."""
    have = f", {size_text(free)} free" if free is not None and free < needed else ""
    if free == 0:
        have = ", none free"
    where = mount_of(path)
    return ApplyError(f"no space left on the disk at {where} {doing}: {size_text(needed)} needed{have}",
                      f"free some disk space on {where} and run again")


def check_free_space(path: Path, needed: int, doing: str) -> None:
    """ApplyError when the file system holding `path` has less than `needed` bytes free (plus a
    margin for the folders and metadata a write adds). An unknown free space passes."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return
    if free < needed + FREE_SPACE_MARGIN:
        raise no_space(p, needed + FREE_SPACE_MARGIN, free, doing)


FREE_SPACE_MARGIN = 64 * 1024


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
    """git writes read-only pack files; Windows refuses to delete them until they are writable.

    Never through a link: chmod would change what it points to (perhaps outside the tree)."""
    if os.path.islink(path):
        return
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IWRITE | stat.S_IREAD)
        func(path)


def remove_tree(path: Path) -> None:
    """Remove a folder lowvram made; a link (or file) in its place is removed itself, never followed."""
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
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
            # Never through a link, never blocking on a FIFO: the lock file is lowvram's own.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0), 0o644)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
            fh = os.fdopen(fd, "a+b")
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EINVAL, errno.EISDIR):
                raise LockError(f"lowvram's lock file {self.path} is a link, a folder or a special file",
                                "remove it (lowvram makes a new one) and run again") from exc
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
