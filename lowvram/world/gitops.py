"""The one git edge: validating sources, cloning at a pinned commit, reading a checkout's state.

Used by `install-extensions`/`apply` (extensions) and `setup` (the UIs themselves). A clone goes
into a temp dir beside its destination (named with fsutil.TEMP_MARK, so the next run removes what
a killed run left), is checked out at the pinned commit, verified, and only then renamed into
place: an interrupted or failed clone leaves nothing half-made.

A checkout is left on a local branch at the pin, never on a detached HEAD: A1111 reads
`repo.active_branch` for every extension (and for its own tree) and shows nothing for one it
cannot read. The branch is named as a user's clone's would be (the remote's default branch that
holds the pin); an existing branch is moved only where no commit of it would be lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram.core.errors import ExtensionError
from lowvram.world import fsutil

# GitPython logs a traceback when it cannot flush a .git/config it was writing (a full disk); lowvram
# reports that failure itself in one line, so GitPython's log must not reach the terminal.
logging.getLogger("git").addHandler(logging.NullHandler())

# progress(stage, current, total): stage is git's own label ("Receiving objects", ...).
Progress = Callable[[str, float, float | None], None]

_NETWORK_SCHEMES = ("https", "http", "git", "ssh", "git+ssh", "ssh+git")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_TRANSPORT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")  # git's `<transport>::<address>` (ext::, fd::)
_SCP_RE = re.compile(r"^(?:(?P<user>[^@/\s]+)@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>(?!//).*)$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")
_SHA_RE = re.compile(r"^[0-9a-fA-F]{7,40}$")
_FULL_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


class CloneError(ExtensionError):
    """A clone that could not be made (unreachable source, missing commit, bad URL)."""


class GitSetupError(ExtensionError):
    """git itself cannot be used (not installed, or refusing a folder another user owns): the same
    for every extension, so the command stops with this one line before it changes anything."""


class GitMissingError(GitSetupError):
    """No git on PATH (or GIT_PYTHON_GIT_EXECUTABLE names one that does not run)."""


class GitOwnershipError(GitSetupError):
    """git's "detected dubious ownership" refusal: the repository belongs to another user."""


# ---------------------------------------------------------------------------------------------
# git itself: found before GitPython is imported (whose import fails without git), and its
# refusals turned into one line with the right hint


def git_executable() -> str | None:
    """The git GitPython would run (GIT_PYTHON_GIT_EXECUTABLE, else `git` on PATH), or None."""
    return shutil.which(os.environ.get("GIT_PYTHON_GIT_EXECUTABLE") or "git")


def install_git_hint() -> str:
    if sys.platform == "win32":
        return "install Git for Windows (https://git-scm.com/download/win) and open a new terminal"
    if sys.platform == "darwin":
        return "install git: `xcode-select --install` (or `brew install git`)"
    return "install git (Debian/Ubuntu: `sudo apt install git`; Fedora: `sudo dnf install git`) and run again"


_RUNS: dict[str, str | None] = {}  # git executable -> why it does not run (None: it runs)


def _does_not_run(exe: str) -> str | None:
    """Why `exe --version` fails (a broken shim, a wrong GIT_PYTHON_GIT_EXECUTABLE), or None; asked once."""
    if exe not in _RUNS:
        try:
            done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10, check=False)
            ok = done.returncode == 0 and done.stdout.startswith("git version")
            _RUNS[exe] = None if ok else (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1][:200]
        except (OSError, subprocess.SubprocessError) as exc:
            _RUNS[exe] = str(exc)[:200]
    return _RUNS[exe]


def require_git(why: str = "to read and change the extensions' git checkouts") -> Any:
    """GitPython, imported only once a git that runs is there (its import raises without one).

    GitMissingError (one line: "git is not installed; lowvram needs it <why>", and how to install
    it) when there is none, or it does not run.
    """
    hint = install_git_hint()
    exe = git_executable()
    if exe is None:
        where = os.environ.get("GIT_PYTHON_GIT_EXECUTABLE")
        what = f"git is not installed ({where} is not a program)" if where else "git is not installed (or not on PATH)"
        raise GitMissingError(f"{what}; lowvram needs it {why}", hint)
    broken = _does_not_run(exe)
    if broken is not None:
        raise GitMissingError(f"git ({exe}) does not run ({broken}); lowvram needs it {why}", hint)
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # GitPython's own check raises ImportError
    try:
        import git
    except ImportError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GitMissingError(f"git ({exe}) does not work ({first}); lowvram needs it {why}", hint) from exc
    return git


def _git() -> Any:
    return require_git()


_DUBIOUS_RE = re.compile(r"detected dubious ownership in repository at '([^'\n]+)'")


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def ownership_error(exc: BaseException) -> GitOwnershipError | None:
    """git's dubious-ownership refusal in `exc` (a GitCommandError) as one line, else None."""
    text = f"{getattr(exc, 'stderr', '') or ''}\n{exc}"
    m = _DUBIOUS_RE.search(text)
    if m is None:
        return None
    repo = m.group(1)
    try:
        owner = _user(os.stat(repo).st_uid)
    except OSError:
        owner = "another user"
    me = _user(os.geteuid()) if hasattr(os, "geteuid") else "you"
    as_owner = f"run lowvram as {owner}" + (" (not with sudo)" if os.environ.get("SUDO_UID") else "")
    return GitOwnershipError(
        f"git refuses to work in {repo}: it belongs to {owner} and lowvram runs as {me} "
        "(git's \"dubious ownership\" check)",
        f"{as_owner}; or, if you trust that folder: git config --global --add safe.directory {repo}",
    )


def _reraise_ownership(exc: BaseException) -> None:
    own = ownership_error(exc)
    if own is not None:
        raise own from exc


@contextlib.contextmanager
def _git_errors() -> Any:
    """GitPython's GitCommandError for a dubious-ownership refusal becomes GitOwnershipError."""
    git = _git()
    try:
        yield git
    except git.GitCommandError as exc:
        _reraise_ownership(exc)
        raise


@dataclass(frozen=True)
class RepoState:
    remote_url: str | None
    head: str | None
    dirty: bool  # tracked files changed (staged or not)
    untracked: bool  # files git does not track, ignored ones included (VRAM Estimator's stats.json)
    ignored: bool = False  # of those, files matched by .gitignore
    untracked_paths: tuple[str, ...] = ()  # ignored ones included, as git lists them
    branch: str | None = None  # the branch HEAD is on; None when detached (or no commit yet)

    @property
    def changed(self) -> bool:
        return self.dirty or self.untracked

    @property
    def user_files(self) -> tuple[str, ...]:
        """Untracked/ignored paths that are the user's, not Python's bytecode cache."""
        return tuple(p for p in self.untracked_paths
                     if "__pycache__" not in p.rstrip("/").split("/") and not p.endswith((".pyc", ".pyo")))


def _bad_url(url: str, why: str) -> CloneError:
    return CloneError(
        f"refusing git source {url!r}: {why}",
        "use an https://, ssh://, git://, file:// URL, user@host:path, or a local folder",
    )


def validate_source_url(url: str) -> str:
    """Accept the git sources lowvram clones from; refuse `ext::` and other transports.

    Returns the URL unchanged except for surrounding whitespace (a local path is made absolute).
    """
    if not isinstance(url, str) or not url.strip():
        raise _bad_url(str(url), "it is empty")
    url = url.strip()
    if any(ord(c) < 32 for c in url):
        raise _bad_url(url, "it contains control characters")
    if url.startswith("-"):
        raise _bad_url(url, "it starts with '-' and would be read as a git option")
    if _TRANSPORT_RE.match(url):
        raise _bad_url(url, "git remote helpers (`ext::`, `fd::` ...) can run commands")
    m = _SCHEME_RE.match(url)
    if m:
        scheme = m.group(1).lower()
        if scheme == "file":
            if len(url) <= len("file://"):
                raise _bad_url(url, "it names no folder")
            return url
        if scheme not in _NETWORK_SCHEMES:
            raise _bad_url(url, f"the {scheme}:// transport is not one lowvram clones from")
        rest = url[m.end():]
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        if not host:
            raise _bad_url(url, "it names no host")
        return url
    if _DRIVE_RE.match(url):  # C:\models or C:/models: a Windows path, not scp-like host:path
        return url
    if "://" in url:
        raise _bad_url(url, "its scheme is not recognised")
    scp = _SCP_RE.match(url)
    if scp and "/" not in url.split(":", 1)[0]:
        if not scp.group("path"):
            raise _bad_url(url, "it names no repository path")
        return url
    # A local path (absolute or relative to the current directory).
    try:
        return str(Path(url).expanduser().absolute())
    except RuntimeError as exc:  # `~name` where no user is called name
        raise _bad_url(url, "its `~user` names no user on this machine") from exc


def _split_url(url: str) -> tuple[str, str, str]:
    """(kind, host, path) where kind is "net" or "local"."""
    url = url.strip()
    m = _SCHEME_RE.match(url)
    if m:
        scheme = m.group(1).lower()
        rest = url[m.end():]
        if scheme == "file":
            path = rest[rest.index("/"):] if "/" in rest else rest
            return "local", "", path
        hostport, _, path = rest.partition("/")
        host = hostport.rsplit("@", 1)[-1].lower()
        default_ports = {"https": ":443", "http": ":80", "ssh": ":22", "git": ":9418"}
        for scheme_name, port in default_ports.items():
            if scheme.endswith(scheme_name) and host.endswith(port):
                host = host[: -len(port)]
        return "net", host, path
    if not _DRIVE_RE.match(url):
        scp = _SCP_RE.match(url)
        if scp and "/" not in url.split(":", 1)[0]:
            return "net", scp.group("host").lower(), scp.group("path").lstrip("/")
    return "local", "", url


def normalise_url(url: str) -> str:
    """A form in which two spellings of one repository compare equal.

    Drops the scheme, `user@`, default ports, a trailing `/` and `.git`; lowercases the host;
    `git@github.com:a/b.git` and `https://github.com/a/b` both become `github.com/a/b`.
    A local path becomes its absolute, resolved form.
    """
    kind, host, path = _split_url(url)
    path = path.replace("\\", "/") if kind == "local" and os.name == "nt" else path
    path = path.rstrip("/")
    if path.endswith(".git"):
        path = path[: -len(".git")]
    path = path.rstrip("/")
    if kind == "local":
        with contextlib.suppress(OSError, RuntimeError):
            path = str(Path(path).expanduser().resolve())
        return "file://" + path
    return f"{host}/{path.lstrip('/')}"


def source_for(key: str, registry_url: str, sources: Mapping[str, str] | None = None) -> str:
    """Where to clone `key` from: `--source NAME=URL` > `$LOWVRAM_MIRROR/<key>` > the registry URL."""
    if sources and key in sources:
        return validate_source_url(sources[key])
    mirror = os.environ.get("LOWVRAM_MIRROR")
    if mirror:
        return str(Path(mirror).expanduser().absolute() / key)
    return validate_source_url(registry_url)


def _git_env() -> dict[str, str]:
    """Never let git stop to ask for a password: an offline or private URL fails at once."""
    env = {"GIT_TERMINAL_PROMPT": "0"}
    if "GIT_SSH_COMMAND" not in os.environ:
        env["GIT_SSH_COMMAND"] = "ssh -o BatchMode=yes"
    return env


class _ProgressAdapter:
    def __init__(self, callback: Progress) -> None:
        self.callback = callback

    def __call__(self, op_code: int, cur_count: Any, max_count: Any = None, message: str = "") -> None:
        import git

        stage_bits = op_code & git.RemoteProgress.OP_MASK
        names = {
            git.RemoteProgress.COUNTING: "Counting objects",
            git.RemoteProgress.COMPRESSING: "Compressing objects",
            git.RemoteProgress.RECEIVING: "Receiving objects",
            git.RemoteProgress.RESOLVING: "Resolving deltas",
            git.RemoteProgress.CHECKING_OUT: "Checking out files",
        }
        total = float(max_count) if max_count not in (None, "") else None
        with contextlib.suppress(Exception):  # a broken progress display must not break a clone
            self.callback(names.get(stage_bits, "Cloning"), float(cur_count or 0), total)


_DUMP_STDERR_RE = re.compile(r"\bstderr: '(.*)'\s*$", re.DOTALL)


def _git_error_text(exc: Exception) -> str:
    """git's own reason in one line (its `fatal:`/`error:` line), never GitPython's command dump
    ("Cmd('git') failed due to: exit code(128) cmdline: git clone -v ...")."""
    stderr = str(getattr(exc, "stderr", "") or "")
    if not stderr.strip():
        m = _DUMP_STDERR_RE.search(str(exc))
        stderr = m.group(1) if m else ""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln.removeprefix("stderr:").strip().strip("'").strip() for ln in lines]
    lines = [ln for ln in lines if ln]
    if not lines:
        status = getattr(exc, "status", None)
        return f"git exited with code {status} and said nothing" if status is not None else type(exc).__name__
    return next((ln for ln in lines if ln.lower().startswith(("fatal:", "error:"))), lines[-1])[:300]


def resolve_commit(repo: Any, ref: str) -> str | None:
    """The full commit id `ref` names in `repo` (a commit id, tag or branch), or None."""
    if not ref or ref.startswith("-"):
        return None
    try:
        return str(repo.git.rev_parse("--verify", "--quiet", f"{ref}^{{commit}}")).strip() or None
    except Exception:
        return None


def _matches(head: str, ref: str) -> bool:
    return head.lower().startswith(ref.lower()) if _SHA_RE.match(ref) else True


def clone_pinned(
    url: str,
    ref: str,
    dest: Path,
    *,
    origin_url: str | None = None,
    progress: Progress | None = None,
    before_rename: Callable[[str], None] | None = None,
    offline_hint: str | None = None,
) -> str:
    """Clone `url` at `ref` (a commit id; a tag or branch name also works) into `dest`.

    Returns the commit checked out, on a local branch (see `put_on_branch`). `origin_url`, when given, becomes the clone's `origin` (a
    clone from a mirror or --source then looks like any other install). `before_rename(commit)`
    runs after the clone is verified and before it appears at `dest` (the manifest is written
    there). On failure nothing is left behind and CloneError says why, in git's words; `offline_hint`
    replaces the hint for a source that cannot be reached (how this command clones offline).
    """
    git = _git()
    url = validate_source_url(url)
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        raise CloneError(f"{dest} already exists", "move it away, or remove it, and run again")
    if not ref or not ref.strip() or ref.startswith("-"):
        raise CloneError(f"bad git ref {ref!r} for {url}", "the registry entry needs a commit id")
    ref = ref.strip()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsutil.temp_name(dest)
    # Our own progress instance: with one, git's stderr goes to it (its error_lines), not the exception.
    from git.util import CallableRemoteProgress

    prog = CallableRemoteProgress(_ProgressAdapter(progress)) if progress else None
    try:
        try:
            repo = git.Repo.clone_from(url, tmp, progress=prog, env=_git_env(), no_checkout=True)
        except git.GitCommandError as exc:
            if prog is not None and not str(getattr(exc, "stderr", "") or "").strip():
                exc.stderr = "\n".join([*prog.error_lines, *prog.other_lines])
            raise _clone_failure(exc, url, dest, offline_hint, tmp=tmp) from exc
        fsutil.kill_point("gitops:clone:after-fetch")
        commit = resolve_commit(repo, ref)
        if commit is None or not _matches(commit, ref):
            raise CloneError(
                f"{url} has no commit {ref}",
                "the source is older than lowvram's pin (update the mirror/--source clone), or the pin is wrong",
            )
        try:
            _put_on_branch(repo, commit)
        except git.GitCommandError as exc:
            if str(dest.parent) in str(getattr(exc, "stderr", "") or ""):
                raise _clone_failure(exc, url, dest) from exc
            raise CloneError(f"cannot check out {ref} from {url}: {_git_error_text(exc)}", "run again") from exc
        except ExtensionError as exc:
            raise CloneError(f"cannot check out {ref} from {url}: {exc.message}", "run again") from exc
        head = str(repo.head.commit.hexsha)
        if head != commit or repo.head.is_detached:
            raise CloneError(f"{url}: HEAD is {head} after checking out {commit}", "run again")
        if origin_url and origin_url != url:
            repo.remote("origin").set_url(origin_url)
        repo.close()
        fsutil.kill_point("gitops:clone:before-rename")
        if before_rename is not None:
            before_rename(head)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            raise CloneError(f"cannot move the clone into {dest}: {exc.strerror}",
                             "check that the folder is writable and run again") from exc
        fsutil.kill_point("gitops:clone:after-rename")
        return head
    except BaseException as exc:
        if tmp.exists():
            fsutil.remove_tree(tmp)
        if isinstance(exc, OSError):  # GitPython writes .git/config itself: a full disk, a read-only folder
            raise CloneError(f"cannot clone {url} into {dest.parent}: {exc.strerror or exc}",
                             local_write_hint(dest.parent)) from exc
        raise


def local_write_hint(folder: Path) -> str:
    return (f"git could not write in {folder}: check the free disk space and that the folder is writable "
            "(not a read-only mount, not another user's folder) and on a drive that keeps Unix file modes "
            "(not FAT/exFAT), then run again")


_LOCAL_FAILURES = ("No space left", "Read-only file system", "File too large", "Disk quota exceeded")


def _clone_failure(exc: BaseException, url: str, dest: Path, offline_hint: str | None = None, *,
                   tmp: Path | None = None) -> ExtensionError:
    """A failed `git clone` as one line: git's refusal of a source another user owns, a destination
    git cannot write in (a read-only or full disk, a FAT drive), or else the source itself.

    The destination is blamed only where git's own error names the clone's folder (`tmp`, else the
    destination's) or a local failure (a full disk): git's "Cloning into '<tmp>'..." line comes before
    a network failure too, and a source path may lie in the same folder."""
    own = ownership_error(exc)
    if own is not None:
        return own
    text = _git_error_text(exc)  # type: ignore[arg-type]
    if str(tmp or dest.parent) in text or any(w in text for w in _LOCAL_FAILURES):
        return CloneError(f"cannot clone {url} into {dest.parent}: {text}", local_write_hint(dest.parent))
    return CloneError(f"cannot clone {url}: {text}", offline_hint or
                      "check the URL and your network; offline, use --source NAME=<local clone> or LOWVRAM_MIRROR=DIR")


def check_source(url: str) -> None:
    """GitOwnershipError now, before anything is written, for a local source git would refuse to
    clone (a mirror or --source clone another user owns). Anything else wrong with it (a missing
    folder) is left to the clone, which reports it for that extension."""
    if _split_url(url)[0] != "local":
        return  # a network source is only checked by cloning it
    with _git_errors() as git:
        try:
            git.Git().ls_remote("--heads", validate_source_url(url), env=_git_env())
        except git.GitCommandError as exc:
            _reraise_ownership(exc)


def is_git_repo(path: Path) -> bool:
    return (Path(path) / ".git").exists()


def origin_url(path: Path) -> str | None:
    """The checkout's `origin` URL, read from its config by GitPython (no git command runs, so a
    checkout another user owns can still be recognised), or None."""
    git = _git()
    try:
        repo = git.Repo(path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    try:
        return str(repo.remote("origin").url)
    except Exception:
        return None
    finally:
        repo.close()


def _open(git: Any, path: Path) -> Any:
    """git.Repo(path), once git agrees to work there: GitOwnershipError for a checkout another user
    owns. Asked first with one git command, because GitPython's own readers (a `cat-file` process
    kept running) die on that refusal with a broken pipe, which says nothing. Its commands never
    take optional locks: reading a checkout must not rewrite its .git/index."""
    repo = git.Repo(path)
    repo.git.update_environment(GIT_OPTIONAL_LOCKS="0")
    try:
        repo.git.rev_parse("--git-dir")
    except git.GitCommandError as exc:
        repo.close()
        _reraise_ownership(exc)
        raise ExtensionError(f"cannot read the git checkout {path}: {_git_error_text(exc)}",
                             "look at it with `git status`") from exc
    return repo


def has_untracked(path: Path) -> bool:
    """Untracked files that are not ignored (ignored ones, like __pycache__, do not block --update)."""
    with _git_errors() as git:
        repo = _open(git, path)
        try:
            return bool(repo.untracked_files)
        finally:
            repo.close()


def repo_state(path: Path) -> RepoState:
    """Origin URL, HEAD and whether anything in the checkout is not as git would check it out."""
    git = _git()
    try:
        repo = _open(git, path)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError) as exc:
        raise ExtensionError(f"{path} is not a git checkout", "move it away or remove it") from exc
    try:
        try:
            remote_url: str | None = repo.remote("origin").url
        except (ValueError, git.GitCommandError):
            remote_url = None
        try:
            head: str | None = repo.head.commit.hexsha
        except ValueError:
            head = None
        branch = None if head is None or repo.head.is_detached else str(repo.active_branch.name)
        try:
            status = repo.git.status("--porcelain=v1", "-z", "--ignored", "--untracked-files=all")
        except git.GitCommandError as exc:
            _reraise_ownership(exc)
            raise ExtensionError(f"cannot read the git checkout {path}: {_git_error_text(exc)}",
                                 "look at it with `git status`") from exc
        dirty = untracked = ignored = False
        listed: list[str] = []
        entries = iter(status.split("\0"))
        for entry in entries:
            if len(entry) < 4:
                continue
            code = entry[:2]
            if code == "??":
                untracked = True
                listed.append(entry[3:])
            elif code == "!!":
                untracked = ignored = True
                listed.append(entry[3:])
            else:
                dirty = True
                if "R" in code or "C" in code:
                    next(entries, None)  # a rename's source path follows as its own entry
        return RepoState(remote_url=remote_url, head=head, dirty=dirty, untracked=untracked, ignored=ignored,
                         untracked_paths=tuple(listed), branch=branch)
    finally:
        repo.close()


def fetch_commit(path: Path, url: str, ref: str) -> str:
    """Make `ref` available in the checkout at `path`, fetching it from `url` when missing."""
    git = _git()
    repo = _open(git, path)
    try:
        commit = resolve_commit(repo, ref)
        if commit is None:
            source = validate_source_url(url)
            try:
                repo.git.fetch("--quiet", source, ref, env=_git_env())
            except git.GitCommandError:
                # Servers that refuse a bare commit id: take every branch and tag (into FETCH_HEAD
                # only, so the user's refs stay as they are).
                try:
                    repo.git.fetch("--quiet", source, "refs/heads/*", "refs/tags/*", env=_git_env())
                except git.GitCommandError as exc:
                    _reraise_ownership(exc)
                    raise CloneError(f"cannot fetch from {url}: {_git_error_text(exc)}",
                                     "check the URL and your network, or use --source NAME=<local clone>") from exc
            commit = resolve_commit(repo, ref)
        if commit is None or not _matches(commit, ref):
            raise CloneError(f"{url} has no commit {ref}", "update the source, or check the pin")
        return commit
    finally:
        repo.close()


# ---------------------------------------------------------------------------------------------
# Branches: a checkout at a pin is on a local branch, never detached


@dataclass(frozen=True)
class BranchMove:
    """The local branch a checkout is put on: `before` is the commit it pointed at (None: created)."""

    name: str
    before: str | None


def _symbolic(repo: Any, ref: str) -> str | None:
    try:
        return str(repo.git.symbolic_ref("--quiet", ref)).strip() or None
    except Exception:
        return None


def _contains(repo: Any, tip: str, commit: str) -> bool:
    """Whether `commit` is `tip` or one of its ancestors."""
    if tip == commit:
        return True
    try:
        repo.git.merge_base("--is-ancestor", commit, tip)
    except Exception:
        return False
    return True


def _fallback_name(repo: Any) -> str:
    try:
        configured = str(repo.git.config("--get", "init.defaultBranch")).strip()
    except Exception:
        configured = ""
    return configured or "master"


def branch_name_for(repo: Any, commit: str) -> str:
    """The branch a user's clone would have `commit` on.

    The first of: the branch HEAD is on, the remote's default (origin/HEAD), master, main, the other
    remote branches, whose remote-tracking (or local) ref holds `commit`; failing that, the remote's
    default branch's name.
    """
    current = (_symbolic(repo, "HEAD") or "").removeprefix("refs/heads/") or None
    remote_head = (_symbolic(repo, "refs/remotes/origin/HEAD") or "").removeprefix("refs/remotes/origin/") or None
    listed = str(repo.git.for_each_ref("--format=%(refname)", "refs/remotes/origin/"))
    remote = sorted(r.removeprefix("refs/remotes/origin/") for r in listed.splitlines() if r.strip())
    candidates: list[str] = []
    for name in (current, remote_head, "master", "main", *remote):
        if name and name != "HEAD" and name not in candidates:
            candidates.append(name)
    for name in candidates:
        for ref in (f"refs/remotes/origin/{name}", f"refs/heads/{name}"):
            tip = resolve_commit(repo, ref)
            if tip is not None and _contains(repo, tip, commit):
                return name
    return remote_head or current or _fallback_name(repo)


def _would_lose(repo: Any, name: str, commit: str) -> bool:
    """Whether moving branch `name` to `commit` leaves commits that no other branch, remote or tag holds."""
    out = repo.git.rev_list("--max-count=1", f"refs/heads/{name}", "--not", commit, f"--exclude={name}",
                            "--branches", "--remotes", "--tags")
    return bool(str(out).strip())


def choose_branch(repo: Any, commit: str) -> BranchMove:
    """The branch to put `commit` on: the name a user's clone would use, unless moving that branch
    would drop commits of the user's; then `lowvram-<commit>` (the user's branch stays as it is)."""
    name = branch_name_for(repo, commit)
    for candidate in (name, f"lowvram-{commit[:8]}", f"lowvram-{commit}"):
        tip = resolve_commit(repo, f"refs/heads/{candidate}")
        if tip is None:
            return BranchMove(candidate, None)
        if tip == commit or not _would_lose(repo, candidate, commit):
            return BranchMove(candidate, tip)
    raise ExtensionError(f"no branch name is free for {commit[:12]}",
                         f"delete the branches {name!r} or 'lowvram-{commit[:8]}' that you no longer need")


def _put_on_branch(repo: Any, commit: str, before_change: Callable[[BranchMove], None] | None = None) -> BranchMove:
    move = choose_branch(repo, commit)
    if before_change is not None:
        before_change(move)
    repo.git.checkout("--quiet", "-B", move.name, commit, "--")
    upstream = f"refs/remotes/origin/{move.name}"
    if move.before is None and resolve_commit(repo, upstream) is not None:
        repo.git.branch("--quiet", f"--set-upstream-to=origin/{move.name}", move.name)
    if repo.head.is_detached or repo.active_branch.name != move.name or repo.head.commit.hexsha != commit:
        raise ExtensionError(f"HEAD is not on {move.name} at {commit[:12]} after checking it out", "run again")
    return move


def put_on_branch(path: Path, commit: str, before_change: Callable[[BranchMove], None] | None = None) -> BranchMove:
    """Check out `commit` on a local branch (see `choose_branch`); the upstream is set to
    origin/<name> when lowvram creates the branch and that ref exists. `before_change(move)` runs
    before anything in the checkout changes (the manifest is written there)."""
    git = _git()
    repo = _open(git, path)
    try:
        try:
            return _put_on_branch(repo, commit, before_change)
        except git.GitCommandError as exc:
            _reraise_ownership(exc)
            raise ExtensionError(f"cannot check out {commit[:12]} in {path}: {_git_error_text(exc)}",
                                 "look at the checkout with `git status`") from exc
    finally:
        repo.close()


def head_would_lose(path: Path, commit: str) -> bool:
    """Whether HEAD is detached on commits that no branch, remote, tag or `commit` holds."""
    git = _git()
    repo = _open(git, path)
    try:
        if not repo.head.is_detached:
            return False
        out = repo.git.rev_list("--max-count=1", "HEAD", "--not", commit, "--branches", "--remotes", "--tags")
        return bool(str(out).strip())
    except git.GitCommandError as exc:
        _reraise_ownership(exc)
        return False
    except ValueError:
        return False
    finally:
        repo.close()


def unpublished_branches(path: Path, commit: str) -> list[str]:
    """Local branches (and a detached HEAD) holding commits that no remote, tag or `commit` holds:
    the user's own work, which removing the checkout would lose."""
    git = _git()
    repo = _open(git, path)
    try:
        refs = str(repo.git.for_each_ref("--format=%(refname)", "refs/heads/")).splitlines()
        if repo.head.is_detached:
            refs.append("HEAD")
        found = []
        for ref in (r.strip() for r in refs if r.strip()):
            out = repo.git.rev_list("--max-count=1", ref, "--not", commit, "--remotes", "--tags")
            if str(out).strip():
                found.append(ref.removeprefix("refs/heads/"))
        return found
    except git.GitCommandError as exc:
        _reraise_ownership(exc)
        return []
    except ValueError:
        return []
    finally:
        repo.close()


def put_back(path: Path, commit: str, branch: str | None, branches: Mapping[str, Any]) -> str | None:
    """Undo `put_on_branch`: HEAD back at `commit` (on `branch` when it points there, else detached);
    each branch in `branches` ({name: {"set": commit, "before": commit | None}}) that still points
    where lowvram set it goes back to `before`, or is deleted where lowvram created it.
    Returns the branch HEAD is on afterwards (None: detached)."""
    git = _git()
    repo = _open(git, path)
    try:
        try:
            repo.git.checkout("--detach", "--quiet", commit)
            for name, info in branches.items():
                if not isinstance(name, str) or name.startswith("-") or not isinstance(info, Mapping):
                    continue
                set_to, before = info.get("set"), info.get("before")
                if not isinstance(set_to, str) or resolve_commit(repo, f"refs/heads/{name}") != set_to:
                    continue  # moved by the user since: theirs now
                if before is None:
                    repo.git.branch("--quiet", "-D", "--", name)
                elif isinstance(before, str) and _FULL_SHA_RE.match(before) and resolve_commit(repo, before) == before:
                    repo.git.update_ref(f"refs/heads/{name}", before, set_to)
            if branch and not branch.startswith("-") and resolve_commit(repo, f"refs/heads/{branch}") == commit:
                repo.git.checkout("--quiet", branch, "--")
                return branch
            return None
        except git.GitCommandError as exc:
            _reraise_ownership(exc)
            raise ExtensionError(f"cannot put {path} back at {commit[:12]}: {_git_error_text(exc)}",
                                 "look at the checkout with `git status`") from exc
    finally:
        repo.close()
