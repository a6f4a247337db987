"""Issue 14, class 4: missing tools and permissions, tried as a hostile user would.

One table: members of each kind (git missing; a tree, a checkout or a source that belongs to another
user; a read-only tree; lowvram's own state folder read-only or full; a drive that keeps no Unix
modes) × the commands (doctor, plan, launch --dry-run, apply, install-extensions with --source local
clones, --update, revert, setup with LOWVRAM_MIRROR). Each refused run must say one `error:` line
with the right `hint:`, never a traceback or "unexpected error", and leave the tree byte for byte as
it was (the check runs before the first write); every other run must just work.

Real faults, not patched ones, wherever this machine allows (docs/architecture.md#tests: as root, chmod proves
nothing): a PATH without git; `chown` to another uid (git's "dubious ownership" refusal, which git
applies to root too); lowvram run as another uid (`setpriv`); read-only bind mounts; a full tmpfs.
A kind that needs what the machine lacks (mount, setpriv) is skipped with the reason. FAT/exFAT is
simulated by making chmod fail under the tree (no vfat in the kernel here; fusefat loses a renamed
folder's files, so it cannot stand in).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, CliResult
from tests.fixtures.faults import DRIVER, install_noext_profile, snapshot, temps, write_gtx1070_facts
from tests.fixtures.git_repos import Remotes, git, make_remotes
from tests.fixtures.ui_repos import build_ui_repo
from tests.fixtures.webui_trees import make_webui

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="real mounts, chown and setpriv: Linux")

OTHER_UID = 12345  # a user that owns nothing here (no passwd entry needed)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Expect:
    ok: bool
    error: tuple[str, ...] = ()  # phrases of the one error line
    hint: tuple[str, ...] = ()  # phrases of the hint line


OK = Expect(True)


def refused(error: str | tuple[str, ...], hint: str | tuple[str, ...]) -> Expect:
    return Expect(False, (error,) if isinstance(error, str) else error, (hint,) if isinstance(hint, str) else hint)


NO_GIT = refused("git is not installed", "sudo apt install git")
BROKEN_GIT = refused(("git (", "does not run", "lowvram needs it"), "sudo apt install git")
NO_GIT_EXT = refused(("git is not installed", "to install the extensions"), ("sudo apt install git", "extensions: []"))
DUBIOUS = refused(("git refuses to work in", "dubious ownership", f"uid {OTHER_UID}"),
                  "git config --global --add safe.directory")
SUDO = refused("lowvram runs as root (sudo)", "run lowvram without sudo")
DENIED = refused(("Permission denied", f"lowvram runs as uid {OTHER_UID}"), "run lowvram as root")
AS_OTHER_DUBIOUS = refused(("git refuses to work in", "dubious ownership", "belongs to root"),
                           ("run lowvram as root", "safe.directory"))
READ_ONLY = refused("Read-only file system", "the WebUI folder is read-only")
BIND_FILE = refused("mount point of its own", "mount its folder instead")
IMMUTABLE = refused(("Operation not permitted", "immutable"), "chattr -i")
STATE_RO = refused(("lock file", "Read-only file system"), "state folder")
STATE_FULL = refused("no space left", "free some disk space")

COMMANDS = ("doctor", "plan", "launch-dry", "apply", "apply-noext", "install-extensions", "update", "revert", "setup")
READS = {"doctor": OK, "plan": OK, "launch-dry": OK}

# member -> {command: expectation}; a command missing from a member's row is not tried for it.
TABLE: dict[str, dict[str, Expect]] = {
    # git missing: commands that read work; those that would need git refuse before any write
    "git:not-on-path": {**READS, "apply": NO_GIT_EXT, "apply-noext": OK, "install-extensions": NO_GIT_EXT,
                        "update": NO_GIT_EXT, "revert": NO_GIT, "setup": NO_GIT},
    "git:dangling-link": {**READS, "apply": NO_GIT_EXT, "apply-noext": OK, "install-extensions": NO_GIT_EXT,
                          "update": NO_GIT_EXT, "revert": NO_GIT, "setup": NO_GIT},
    "git:broken-shim": {**READS, "apply": BROKEN_GIT, "apply-noext": OK, "install-extensions": BROKEN_GIT,
                        "update": BROKEN_GIT, "revert": BROKEN_GIT, "setup": BROKEN_GIT},
    "git:GIT_PYTHON_GIT_EXECUTABLE-wrong": {**READS, "apply": NO_GIT_EXT, "apply-noext": OK,
                                           "install-extensions": NO_GIT_EXT, "revert": NO_GIT, "setup": NO_GIT},
    # another user's: git's dubious-ownership refusal (root included), sudo, lowvram run as another uid
    "owner:tree-of-another-user": {**READS, "apply": DUBIOUS, "apply-noext": OK, "install-extensions": DUBIOUS,
                                   "update": DUBIOUS, "revert": DUBIOUS, "setup": DUBIOUS},
    "owner:one-extension-of-another-user": {**READS, "apply": DUBIOUS, "install-extensions": DUBIOUS,
                                            "update": DUBIOUS, "revert": DUBIOUS, "setup": DUBIOUS},
    "owner:source-of-another-user": {**READS, "apply": DUBIOUS, "apply-noext": OK, "install-extensions": DUBIOUS,
                                     "update": DUBIOUS, "revert": OK, "setup": DUBIOUS},
    "owner:sudo-on-own-tree": {**READS, "apply": SUDO, "apply-noext": SUDO, "install-extensions": SUDO,
                               "update": OK, "revert": SUDO, "setup": SUDO},
    "owner:run-as-another-user": {**READS, "apply": DENIED, "apply-noext": DENIED, "install-extensions": DENIED,
                                  "update": AS_OTHER_DUBIOUS, "revert": AS_OTHER_DUBIOUS,
                                  "setup": refused(("not writable", "Permission denied"), "run lowvram as root")},
    # read-only mounts: nothing to write is fine (update of an applied tree); anything else refuses
    "ro:tree": {**READS, "apply": READ_ONLY, "apply-noext": READ_ONLY, "install-extensions": READ_ONLY,
                "update": OK, "revert": READ_ONLY,
                "setup": refused(("not writable", "Read-only file system"), ("remount", "--dir"))},
    "ro:extensions-folder": {**READS, "apply": READ_ONLY, "apply-noext": READ_ONLY, "install-extensions": READ_ONLY,
                             "update": OK, "revert": READ_ONLY,
                             "setup": refused("Read-only file system", "the WebUI folder is read-only")},
    "ro:setup-parent": {"setup": refused(("not writable", "Read-only file system"), ("remount", "--dir"))},
    # one file bind-mounted on its own, read-only or not (Docker's `-v ./config.json:/app/config.json:ro`;
    # a rename over a mount point fails with EBUSY), or marked immutable (chattr +i: even root may not)
    "ro:config.json-bind-ro": {**READS, "apply": BIND_FILE, "apply-noext": OK, "install-extensions": BIND_FILE,
                               "update": OK, "revert": BIND_FILE, "setup": BIND_FILE},
    "ro:webui-user-bind-rw": {**READS, "apply": BIND_FILE, "apply-noext": BIND_FILE, "install-extensions": OK,
                              "revert": BIND_FILE, "setup": BIND_FILE},
    "ro:webui-user-immutable": {**READS, "apply": IMMUTABLE, "apply-noext": IMMUTABLE, "install-extensions": OK,
                                "revert": IMMUTABLE, "setup": IMMUTABLE},
    "ro:config.json-immutable": {**READS, "apply": IMMUTABLE, "apply-noext": OK, "install-extensions": IMMUTABLE,
                                 "update": OK, "revert": IMMUTABLE},
    # lowvram's own state folder (LOWVRAM_HOME)
    "state:read-only": {**READS, "apply": STATE_RO, "apply-noext": STATE_RO, "install-extensions": STATE_RO,
                        "update": STATE_RO, "revert": STATE_RO,
                        "setup": refused(("setup.lock", "Read-only file system"), "state folder")},
    "state:full": {**READS, "apply": STATE_FULL, "apply-noext": STATE_FULL, "install-extensions": STATE_FULL,
                   "setup": STATE_FULL},
    # a drive that keeps no Unix modes (FAT/exFAT: chmod fails with EPERM, fusefat with ENOSYS)
    "nomodes:chmod-EPERM": {"apply": OK, "apply-noext": OK, "install-extensions": OK, "revert": OK, "setup": OK},
    "nomodes:chmod-ENOSYS": {"apply": OK, "install-extensions": OK, "revert": OK},
}

CASES = [pytest.param(member, command, expect, id=f"{member}/{command}")
         for member, row in TABLE.items() for command, expect in row.items()]
assert all(c in COMMANDS for row in TABLE.values() for c in row)

# Where each command starts: a fresh tree, or one lowvram already applied (with its extensions).
APPLIED_START = {"doctor", "plan", "launch-dry", "update", "revert"}
# Members whose whole tree is another user's: start applied for every command (then git refuses).
ALWAYS_APPLIED = {"owner:tree-of-another-user", "owner:one-extension-of-another-user"}


# ---------------------------------------------------------------------------------------------
# The lab: a tree, its remotes, a mirror for setup, LOWVRAM_HOME; all under a folder any uid can read


@dataclass
class Lab:
    root: Path
    home: Path
    tree: Path
    facts: Path
    remotes: Remotes
    mirror: Path
    env: dict[str, str] = field(default_factory=dict)  # for a subprocess run (as another user)
    as_uid: int | None = None
    setup_dir: Path | None = None
    immutable: list[Path] = field(default_factory=list)

    def argv(self, command: str) -> list[str]:
        tree, facts = str(self.tree), str(self.facts)
        sources = [f"--source=vram-estimator={self.remotes.vram.url}", f"--source=giant-kitten={self.remotes.kitten.url}"]
        return {
            "doctor": ["doctor", "--webui", tree, "--facts", facts],
            "plan": ["plan", "--webui", tree, "--facts", facts, "--profile", "gtx1070-sdxl"],
            "launch-dry": ["launch", "--dry-run", "--webui", tree, "--facts", facts, "--profile", "gtx1070-sdxl"],
            "apply": ["apply", "--webui", tree, "--facts", facts, "--profile", "gtx1070-sdxl"],
            "apply-noext": ["apply", "--webui", tree, "--facts", facts, "--profile", "noext"],
            "install-extensions": ["install-extensions", "--webui", tree, *sources],
            "update": ["install-extensions", "--webui", tree, "--update"],
            "revert": ["revert", "--webui", tree],
            "setup": ["setup", "--dir", str(self.setup_dir or self.tree)],
        }[command]


@pytest.fixture
def lab(lowvram_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    from lowvram.world.detect import nvml
    from tests.fixtures.fake_nvml import gtx1070

    monkeypatch.setattr(nvml, "pynvml", gtx1070())  # setup probes the machine: a GTX 1070 (its plan has extensions)
    root = Path(tempfile.mkdtemp(prefix="lowvram-perm-"))
    root.chmod(0o755)  # another uid (setpriv) must reach everything here
    home = root / "home"
    home.mkdir()
    monkeypatch.setenv("LOWVRAM_HOME", str(home))
    install_noext_profile(home)
    remotes = make_remotes(root / "remotes", monkeypatch)
    tree = make_webui(root / "stable-diffusion-webui",
                      config={"disabled_extensions": ["stable-diffusion-webui-giant-kitten"]})
    # The tree is a git checkout at a tag newer than its CHANGELOG: doctor's version comes from git.
    git("init", "-q", "-b", "master", cwd=tree)
    git("add", "webui.sh", "launch.py", "CHANGELOG.md", cwd=tree)
    git("commit", "-q", "-m", "release", cwd=tree)
    git("tag", "v1.9.3", cwd=tree)
    mirror = root / "mirror"
    mirror.mkdir()
    for key, repo in (("vram-estimator", remotes.vram), ("giant-kitten", remotes.kitten)):
        shutil.copytree(repo.bare, mirror / key)
    lab = Lab(root=root, home=home, tree=tree, facts=write_gtx1070_facts(root / "gtx1070.json"), remotes=remotes,
              mirror=mirror)
    try:
        yield lab
    finally:
        for path in lab.immutable:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            _unmount_all(root)
        shutil.rmtree(root, ignore_errors=True)


def _unmount_all(root: Path) -> None:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        points = [line.split()[1].replace("\\040", " ") for line in fh]
    for point in sorted((p for p in points if p.startswith(str(root))), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode}): a real read-only or full "
                    "file system needs root with CAP_SYS_ADMIN")


def _ro_bind(path: Path) -> None:
    _mount(["--bind", str(path), str(path)])
    _mount(["-o", "remount,bind,ro", str(path)])


def _immutable(lab: Lab, path: Path) -> None:
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i does not work here ({done.stderr.strip()})")
    lab.immutable.append(path)


def _chown(path: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(path):
        os.chown(dirpath, uid, uid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, uid)


# ---------------------------------------------------------------------------------------------
# Arranging one member's fault (after the command's start state is made)


def _path_without_git(lab: Lab, monkeypatch: pytest.MonkeyPatch, dangling: bool = False, broken: bool = False) -> None:
    bin_dir = lab.root / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "python3"):  # what the commands may look for; never git
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    if dangling:  # a git that was uninstalled, its link left behind
        (bin_dir / "git").symlink_to(lab.root / "uninstalled" / "git")
    if broken:  # a shim of a version manager whose git is gone
        (bin_dir / "git").write_text("#!/bin/sh\necho 'git: shim: no such version' >&2\nexit 127\n")
        (bin_dir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))


def _refuse_chmod(monkeypatch: pytest.MonkeyPatch, root: Path, err: int) -> None:
    """Every chmod under `root` fails as on a FAT/exFAT drive (the file itself is written)."""
    root = Path(os.path.abspath(root))

    def under(path: Any) -> bool:
        if isinstance(path, int):
            return True  # fchmod of a file lowvram opened: only ever inside the tree in these runs
        p = os.path.abspath(os.fsdecode(path))
        return p == str(root) or p.startswith(str(root) + os.sep)

    for name in ("chmod", "fchmod", "lchmod"):
        real = getattr(os, name, None)
        if real is None:
            continue

        def fake(path: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if under(path):
                raise OSError(err, os.strerror(err), os.fsdecode(path) if not isinstance(path, int) else None)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, fake)


def _as_other_user(lab: Lab) -> None:
    if not IS_ROOT or shutil.which("setpriv") is None:
        pytest.skip("running lowvram as another user needs root and setpriv")
    for theirs in (lab.home, lab.remotes.vram.bare.parent, lab.mirror):  # only the tree is root's
        _chown(theirs, OTHER_UID)
    other_home = lab.root / "other-home"
    other_home.mkdir()
    os.chown(other_home, OTHER_UID, OTHER_UID)
    lab.as_uid = OTHER_UID
    lab.env = {"HOME": str(other_home), "LOWVRAM_HOME": str(lab.home)}


def arrange(lab: Lab, member: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `member`'s fault real (the start state is already there)."""
    kind = member.split(":", 1)[0]
    if kind in ("owner", "ro", "state") and not IS_ROOT:
        pytest.skip("chown, mount and setpriv need root")
    if member == "git:not-on-path":
        _path_without_git(lab, monkeypatch, dangling=False)
    elif member == "git:dangling-link":
        _path_without_git(lab, monkeypatch, dangling=True)
    elif member == "git:broken-shim":
        _path_without_git(lab, monkeypatch, broken=True)
    elif member == "git:GIT_PYTHON_GIT_EXECUTABLE-wrong":
        monkeypatch.setenv("GIT_PYTHON_GIT_EXECUTABLE", str(lab.root / "no-such" / "git"))
    elif member == "owner:tree-of-another-user":
        _chown(lab.tree, OTHER_UID)
    elif member == "owner:one-extension-of-another-user":
        _chown(lab.tree / "extensions" / lab.remotes.vram.dir, OTHER_UID)
    elif member == "owner:source-of-another-user":
        _chown(lab.remotes.vram.bare.parent, OTHER_UID)
        _chown(lab.mirror, OTHER_UID)
    elif member == "owner:sudo-on-own-tree":
        _chown(lab.tree, OTHER_UID)
        monkeypatch.setenv("SUDO_UID", str(OTHER_UID))
        monkeypatch.setenv("SUDO_USER", "someone")
    elif member == "owner:run-as-another-user":
        _as_other_user(lab)
    elif member == "ro:tree":
        _ro_bind(lab.tree)
    elif member == "ro:extensions-folder":
        _ro_bind(lab.tree / "extensions")
    elif member == "ro:config.json-bind-ro":
        _ro_bind(lab.tree / "config.json")
    elif member == "ro:webui-user-bind-rw":
        _mount(["--bind", str(lab.tree / "webui-user.sh"), str(lab.tree / "webui-user.sh")])
    elif member in ("ro:webui-user-immutable", "ro:config.json-immutable"):
        _immutable(lab, lab.tree / ("webui-user.sh" if "webui-user" in member else "config.json"))
    elif member == "ro:setup-parent":
        parent = lab.root / "ro-parent"
        parent.mkdir()
        _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(parent)])
        lab.setup_dir = parent / "stable-diffusion-webui"
    elif member == "state:read-only":
        _ro_bind(lab.home)
    elif member == "state:full":
        saved = lab.root / "home-saved"
        shutil.copytree(lab.home, saved, symlinks=True)
        _mount(["-t", "tmpfs", "-o", "size=256k", "tmpfs", str(lab.home)])
        shutil.copytree(saved, lab.home, symlinks=True, dirs_exist_ok=True)
        with contextlib.suppress(OSError), open(lab.home / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    elif member.startswith("nomodes:"):
        _refuse_chmod(monkeypatch, lab.tree, errno.EPERM if member.endswith("EPERM") else errno.ENOSYS)
    else:
        raise AssertionError(member)


# ---------------------------------------------------------------------------------------------
# Running


def run(cli: Any, lab: Lab, command: str) -> CliResult:
    argv = lab.argv(command)
    if lab.as_uid is None:
        return cli(*argv)  # type: ignore[no-any-return]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOWVRAM_", "GIT_PYTHON"))}
    env.update(lab.env, PYTHONPATH=str(REPO), LOWVRAM_TEST_REGISTRY=str(lab.remotes.registry),
               LOWVRAM_MIRROR=os.environ.get("LOWVRAM_MIRROR", ""))
    if not env["LOWVRAM_MIRROR"]:
        del env["LOWVRAM_MIRROR"]
    proc = subprocess.run(["setpriv", f"--reuid={lab.as_uid}", f"--regid={lab.as_uid}", "--clear-groups",
                           sys.executable, "-c", DRIVER, *argv], env=env, cwd=lab.root, capture_output=True,
                          text=True, timeout=120)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def start_state(cli: Any, lab: Lab, member: str, command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    applied = command in APPLIED_START or member in ALWAYS_APPLIED
    if applied and member != "owner:source-of-another-user":
        done = cli(*lab.argv("apply"))
        assert done.code == 0, done.err
        assert (lab.tree / "extensions" / lab.remotes.vram.dir / ".git").is_dir()
    if command == "setup":
        monkeypatch.setenv("LOWVRAM_MIRROR", str(lab.mirror))
        build_ui_repo(lab.mirror, "a1111")
        if lab.setup_dir is None and (member.startswith("git:") or member == "owner:source-of-another-user"):
            lab.setup_dir = lab.root / "new-webui"


def assert_refused(result: CliResult, expect: Expect) -> None:
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    hints = [ln for ln in lines if ln.startswith("hint:")]
    assert result.code == 1, (result.code, result.out[-2000:], result.err[-2000:])
    assert len(errors) == 1 and len(hints) == 1, result.err
    for phrase in expect.error:
        assert phrase in errors[0], errors[0]
    for phrase in expect.hint:
        assert phrase in hints[0], hints[0]


@pytest.mark.parametrize(("member", "command", "expect"), CASES)
def test_tools_and_permissions(cli: Any, lab: Lab, monkeypatch: pytest.MonkeyPatch, member: str, command: str,
                               expect: Expect) -> None:
    if member == "ro:setup-parent":
        arrange(lab, member, command, monkeypatch)  # the target's parent must be read-only first
        start_state(cli, lab, member, command, monkeypatch)
    else:
        start_state(cli, lab, member, command, monkeypatch)
        arrange(lab, member, command, monkeypatch)
    target = lab.setup_dir if command == "setup" and lab.setup_dir is not None else lab.tree
    before = snapshot(lab.tree)
    existed = target.exists()
    result = run(cli, lab, command)
    assert "Traceback" not in result.err and "unexpected error" not in result.err, result.err
    if not expect.ok:
        assert_refused(result, expect)
        assert snapshot(lab.tree) == before, f"{member}: a refused {command} changed the tree"
        assert target.exists() == existed
        assert temps(lab.tree) == []
        return
    assert result.code == 0, (result.out[-2000:], result.err[-2000:])
    assert not [ln for ln in result.err.splitlines() if ln.startswith("error:")], result.err
    if command == "doctor":  # the version from `git describe`; without git, from CHANGELOG.md
        version = "1.8.0" if member in ("git:not-on-path", "git:dangling-link", "git:broken-shim") else "1.9.3"
        assert f"a1111, {version}," in result.out, result.out
    if command in ("apply", "apply-noext") or (command == "setup" and target == lab.tree):
        assert b"lowvram managed block" in (lab.tree / "webui-user.sh").read_bytes()
    if command == "install-extensions":
        assert (lab.tree / "extensions" / lab.remotes.vram.dir / ".git").is_dir()


# ---------------------------------------------------------------------------------------------
# Beyond the table


def test_a_refused_apply_leaves_no_manifest_and_works_once_git_is_back(cli: Any, lab: Lab,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Git missing: the state folder is as untouched as the tree (no manifest, no backups), and the
    same command succeeds once git is back."""
    before = snapshot(lab.tree)
    with monkeypatch.context() as mp:
        _path_without_git(lab, mp, dangling=False)
        assert cli(*lab.argv("apply")).code == 1
    assert not list(lab.home.glob("webuis/*/manifest.json"))
    assert not list(lab.home.glob("webuis/*/backups/*"))
    assert snapshot(lab.tree) == before
    assert cli(*lab.argv("apply")).code == 0
    assert cli(*lab.argv("revert")).code == 0
    assert snapshot(lab.tree) == before


def test_gitpython_is_never_imported_without_git(lab: Lab, tmp_path: Path) -> None:
    """GitPython raises ImportError at import when git is missing (unless GIT_PYTHON_REFRESH says
    otherwise): lowvram must look for git first and say so in one line, on a fresh interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_PYTHON", "LOWVRAM_"))}
    env.update(PATH=str(bin_dir), PYTHONPATH=str(REPO), LOWVRAM_HOME=str(lab.home),
               LOWVRAM_TEST_REGISTRY=str(lab.remotes.registry))
    argv = [sys.executable, "-c", DRIVER, *lab.argv("install-extensions")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "ImportError" not in proc.stderr and "Bad git executable" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: git is not installed"), proc.stderr


def test_json_refusal_is_one_document(cli: Any, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    _path_without_git(lab, monkeypatch, dangling=False)
    result = cli(*lab.argv("install-extensions"), "--json")
    assert result.code == 1
    data = json.loads(result.out) if result.out.strip() else json.loads(result.err)
    assert "git is not installed" in json.dumps(data)


@pytest.mark.skipif(not IS_ROOT, reason="chown needs root")
def test_clone_into_a_folder_git_cannot_write_says_where_not_the_network(lab: Lab, cli: Any,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone that fails on the destination side (here: a folder git cannot write in, made so after
    the preflight passed) gets the hint about that folder, not "check the URL and your network"."""
    from lowvram.world import gitops

    dest = lab.root / "dest" / "ext"
    dest.parent.mkdir()
    _mount(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(dest.parent)])
    with pytest.raises(gitops.CloneError) as caught:
        gitops.clone_pinned(lab.remotes.vram.url, lab.remotes.vram.pin, dest)
    assert str(dest.parent) in caught.value.message
    assert "network" not in caught.value.hint and "writable" in caught.value.hint
