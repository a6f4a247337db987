"""Issue class 2: links and special files where lowvram expects a file or a folder.

One table: each member (a link into the tree, out of it, dangling, looping; a FIFO, a socket, a
device, a folder where a file belongs or a file where a folder belongs; a 3 GiB sparse file) at
each place lowvram reads or writes (webui-user.sh/.bat, config.json, ui-config.json, the selected
checkpoint, models/Stable-diffusion, extensions/, extensions/lowvram-layout, and the hook config,
manifest, lock and observations in LOWVRAM_HOME; last.json has its own test: only commands
without --webui read it), then every command in a real subprocess with a
timeout: doctor, plan, estimate, launch --dry-run, apply, install-extensions (a local source),
revert. Each must exit 0 or 1 (never hang, never a traceback), a refusal is one line naming the
path with a hint, nothing outside the tree changes (a sentinel folder the links point into, mode
bits included), and after revert the tree is exactly as before: links still links, same text.

The policy (docs/architecture.md#safety-on-the-users-tree): lowvram reads through any link, but never changes anything a link
leads to outside the tree; a link whose target lies inside the tree stays a link (the target is
edited in place, atomically); nothing is opened before its type is known, and every read has a size
limit. Disk full while copying the hook is tested beside it, on a real full file system.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lowvram.core import markers
from lowvram.world import fsutil, paths
from tests.fixtures.faults import disk_full, install_noext_profile, snapshot, temps, write_gtx1070_facts
from tests.fixtures.links_special import COMMANDS, NAMES, PLACES, Bench, fingerprint, fingerprint_diff
from tests.fixtures.webui_trees import make_webui

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIFOs, sockets, devices, symlinks")

READ_ONLY = ["doctor", "plan", "estimate", "launch"]  # run side by side: none of them writes
PROBE = ("plan", "estimate", "launch", "apply")  # need the WebUI's facts (the model family among them)
READERS = ("doctor", *PROBE)  # read the webui-user file and config.json
LOCKED = ("apply", "install-extensions", "revert")  # take the WebUI's lock

FILE_KINDS = ("link-in", "link-out", "dangling-in", "dangling-out", "loop", "fifo", "socket", "chardev",
              "devnull-link", "dir", "huge")
BROKEN_FILE = ("loop", "fifo", "socket", "chardev", "devnull-link", "dir", "huge")
DIR_KINDS = ("link-in", "link-out", "dangling-in", "dangling-out", "loop", "fifo", "socket", "file")
BROKEN_DIR = ("dangling-in", "dangling-out", "loop", "fifo", "socket", "file")


def _table() -> list[Any]:
    """(place, kind, the commands that must refuse with one line); every other command exits 0."""
    rows: list[tuple[str, str, tuple[str, ...]]] = []
    for place in ("webui-user.sh", "webui-user.bat"):
        rows += [(place, "link-in", ()), (place, "dangling-in", ())]  # the target inside is edited
        rows += [(place, k, ("apply",)) for k in ("link-out", "dangling-out")]  # never written outside
        rows += [(place, k, READERS) for k in BROKEN_FILE]
    rows += [("config.json", k, ()) for k in ("link-in", "dangling-in", "dangling-out")]
    rows += [("config.json", "link-out", ("install-extensions",))]  # read through; enabling would write
    rows += [("config.json", k, (*READERS, "install-extensions")) for k in BROKEN_FILE]
    rows += [("ui-config.json", k, ()) for k in ("fifo", "link-out", "huge")]  # never opened
    rows += [("checkpoint", k, ()) for k in ("link-in", "link-out", "huge")]  # a checkpoint on another drive
    rows += [("checkpoint", k, PROBE) for k in ("dangling-in", "dangling-out", "loop", "fifo", "socket",
                                                "chardev", "devnull-link", "dir")]
    rows += [("models/Stable-diffusion", k, ()) for k in ("link-in", "link-out")]
    rows += [("models/Stable-diffusion", k, PROBE) for k in BROKEN_DIR]
    rows += [("extensions", "link-in", ())]  # the hook and the clone go into the folder it leads to
    rows += [("extensions", k, ("apply", "install-extensions")) for k in ("link-out", *BROKEN_DIR)]
    rows += [("extensions/lowvram-layout", k, ("apply",)) for k in DIR_KINDS]
    rows += [("hook.json", k, ()) for k in FILE_KINDS if k != "dir"]  # lowvram's own: replaced, never followed
    rows += [("hook.json", "dir", ("apply",))]
    rows += [("manifest.json", k, ()) for k in FILE_KINDS]  # unreadable: kept aside as manifest.broken.json
    rows += [("lock", k, LOCKED) for k in ("link-in", "link-out", "fifo", "dir")]
    rows += [("observations.jsonl", k, ()) for k in ("fifo", "chardev", "link-out")]  # a warning, no hang
    return [pytest.param(place, kind, refused, id=f"{place}-{kind}") for place, kind, refused in rows]


_BASELINE: dict[str, int | None] = {}


def _baseline_apply(tmp: Path, os_name: str) -> int | None:
    """apply's exit code on the same tree with no member in it. Writing the Windows .bat from a
    Linux box may be refused for reasons of its own (class 1: a Linux LOWVRAM_CONFIG path); then
    the .bat rows expect that refusal, one clean line, instead of their own."""
    if os_name not in _BASELINE:
        _BASELINE[os_name] = Bench(tmp / f"baseline-{os_name}", os_name).run("apply").code
    return _BASELINE[os_name]


def _name(place: str) -> str:
    return NAMES.get(place, Path(PLACES[place].split(":")[-1]).name)


@pytest.mark.parametrize(("place", "kind", "refused"), _table())
def test_member(tmp_path: Path, place: str, kind: str, refused: tuple[str, ...]) -> None:
    os_name = "windows" if place == "webui-user.bat" else "linux"
    bench = Bench(tmp_path / "bench", os_name)
    member = bench.make(place, kind)
    link = os.readlink(member) if member.is_symlink() else None
    tree_before, outside_before = fingerprint(bench.tree), fingerprint(bench.outside)
    expected = {cmd: 1 if cmd in refused else 0 for cmd in COMMANDS}
    apply_refused_anyway = os_name == "windows" and _baseline_apply(tmp_path, os_name) == 1
    if apply_refused_anyway:
        expected["apply"] = 1

    results = bench.run_many(READ_ONLY)
    for cmd in ("apply", "install-extensions", "revert"):
        results.append(bench.run(cmd))
        if cmd == "apply" and link is not None and not PLACES[place].startswith(("state:", "home:")):
            assert os.readlink(member) == link, f"apply replaced the link {member}"

    problems = [r.problem(None if r.cmd == "apply" and apply_refused_anyway else _name(place)) for r in results]
    assert [p for p in problems if p] == []
    assert {r.cmd: r.code for r in results} == expected, [(r.cmd, r.err.strip()[-300:]) for r in results]
    assert fingerprint(bench.outside) == outside_before, fingerprint_diff(outside_before, fingerprint(bench.outside))
    assert fingerprint(bench.tree) == tree_before, fingerprint_diff(tree_before, fingerprint(bench.tree))
    assert temps(bench.tree) == []


# ---------------------------------------------------------------------------------------------
# What the table cannot see: the state between apply and revert


def test_a_linked_webui_user_sh_inside_the_tree_is_edited_in_place_and_stays_a_link(tmp_path: Path) -> None:
    bench = Bench(tmp_path, "linux")
    member = bench.make("webui-user.sh", "link-in")
    target = bench.tree / "configs" / "webui-user.sh"
    original = target.read_bytes()
    assert bench.run("apply").code == 0
    assert member.is_symlink() and os.readlink(member) == "configs/webui-user.sh"
    data = target.read_bytes()
    assert data.startswith(original) and markers.BLOCK_BEGIN.encode() in data
    # bash sees the block through the link
    out = subprocess.run(["bash", "-c", 'source ./webui-user.sh && printf %s "$LOWVRAM_CONFIG"'], cwd=bench.tree,
                         capture_output=True, text=True, check=True).stdout
    assert out == str(bench.state / "hook.json")
    assert bench.run("revert").code == 0
    assert member.is_symlink() and target.read_bytes() == original


def test_a_dangling_link_inside_the_tree_gets_its_target_and_loses_it_again(tmp_path: Path) -> None:
    bench = Bench(tmp_path, "linux")
    member = bench.make("webui-user.sh", "dangling-in")
    assert bench.run("apply").code == 0
    assert member.is_symlink() and markers.BLOCK_BEGIN.encode() in member.read_bytes()
    assert bench.run("revert").code == 0
    assert member.is_symlink() and not member.exists()


@pytest.mark.parametrize("place", ["extensions", "extensions/lowvram-layout"])
def test_a_hook_folder_linked_out_of_the_tree_is_never_chmodded_or_deleted(tmp_path: Path, place: str) -> None:
    """The old apply renamed the user's link aside and rmtree'd it: rmtree's error handler chmodded
    the folder it pointed to (outside the tree), then the link was gone."""
    bench = Bench(tmp_path, "linux")
    member = bench.make(place, "link-out")
    outside = fingerprint(bench.outside)
    result = bench.run("apply")
    assert result.code == 1 and result.problem(_name(place)) is None, result.err
    assert "outside the WebUI folder" in result.err or "is a link" in result.err
    assert member.is_symlink()
    assert fingerprint(bench.outside) == outside


def test_a_hook_copied_by_hand_into_a_linked_extensions_folder_is_used_and_never_removed(tmp_path: Path) -> None:
    """The hint's way out: the user copies the hook into the folder extensions/ links to; apply
    reads it there (unchanged: nothing to write) and revert leaves it alone."""
    bench = Bench(tmp_path, "linux")
    bench.make("extensions", "link-out")
    shutil.copytree(paths.bundled_patches_dir(), bench.outside / "extensions" / markers.HOOK_EXTENSION_DIR,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    outside = fingerprint(bench.outside)
    assert bench.run("apply").code == 0
    assert bench.run("revert").code == 0
    assert fingerprint(bench.outside) == outside


@pytest.mark.parametrize("kind", ["fifo", "chardev", "dir", "huge", "link-out", "loop"])
def test_last_json_is_read_without_blocking_and_replaced_not_followed(tmp_path: Path, kind: str) -> None:
    """last.json (the last WebUI used) is read when no --webui is given: a FIFO there hung every
    such command; a link out of LOWVRAM_HOME is replaced by apply, never written through."""
    bench = Bench(tmp_path, "linux")
    member = bench.make("last.json", kind)
    outside = fingerprint(bench.outside)
    elsewhere = tmp_path / "not-a-webui"
    elsewhere.mkdir()
    for argv, cwd in ((["plan", "--facts", str(bench.facts), "--profile", "noext", "--model", "sdxl"], elsewhere),
                      (["apply", "--profile", "noext"], bench.tree),  # probes, then remembers the WebUI
                      (["revert"], elsewhere)):
        r = bench.run_argv(argv, cwd)
        # a folder in last.json's place: nothing can be remembered, so revert finds no WebUI (one line)
        assert r.problem(None) is None and r.code == (1 if kind == "dir" and argv[0] == "revert" else 0), r.err
    assert fingerprint(bench.outside) == outside
    assert kind == "dir" or (member.is_file() and not member.is_symlink())


def test_fifos_everywhere_at_once_never_block(tmp_path: Path) -> None:
    """The old code opened each of these for reading, which blocks until a writer comes."""
    bench = Bench(tmp_path, "linux")
    for place in ("webui-user.sh", "config.json", "checkpoint", "manifest.json", "last.json"):
        bench.make(place, "fifo")
    tree = fingerprint(bench.tree)
    for r in [*bench.run_many(["doctor", "plan", "estimate"]), bench.run("apply"), bench.run("revert")]:
        assert r.problem("webui-user.sh") is None, r.problem("webui-user.sh")
        assert r.code == 1 and "webui-user.sh is a FIFO" in r.err, r.err
    assert fingerprint(bench.tree) == tree


# ---------------------------------------------------------------------------------------------
# Disk full while copying the hook (issue class 4): one line, the right hint, the tree as it was


@pytest.fixture
def hook_tree(tmp_path: Path, lowvram_home: Path) -> tuple[Path, Path]:
    install_noext_profile(lowvram_home)
    return make_webui(tmp_path / "stable-diffusion-webui"), write_gtx1070_facts(tmp_path / "facts.json")


def _assert_no_space_line(result: Any, *phrases: str) -> str:
    assert result.code == 1, (result.out, result.err)
    assert "Traceback" not in result.err and "unexpected error" not in result.err, result.err
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.err
    assert "shutil.Error" not in result.err and "[(" not in result.err, result.err
    hint = [ln for ln in lines if ln.startswith("hint:")]
    assert hint and "free some disk space on" in hint[0], result.err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def test_disk_full_while_copying_the_hook_is_one_line_and_the_tree_stays_as_it_was(
        cli: Any, hook_tree: tuple[Path, Path], lowvram_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write under extensions/ fails with ENOSPC (the disk fills up during the copy, after
    the free-space check): the old code printed shutil.Error's list of tuples with a hint about
    permissions, and had already written the block into webui-user.sh."""
    tree, facts = hook_tree
    before = snapshot(tree)
    with monkeypatch.context() as mp:
        disk_full(mp, tree / "extensions")
        result = cli("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "noext")
    line = _assert_no_space_line(result, "no space left on the disk at", "lowvram's hook", "needed")
    assert "lowvram-layout" in line
    assert snapshot(tree) == before  # webui-user.sh untouched: the hook is copied before the block
    assert sorted(p.name for p in (tree / "extensions").iterdir()) == []
    assert temps(tree, lowvram_home) == []
    again = cli("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "noext")
    assert again.code == 0, again.err
    assert (tree / "extensions" / markers.HOOK_EXTENSION_DIR).is_dir()
    assert cli("revert", "--webui", str(tree)).code == 0
    assert snapshot(tree) == before


def test_too_little_free_space_is_found_before_the_first_write(
        cli: Any, hook_tree: tuple[Path, Path], lowvram_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree, facts = hook_tree
    before = snapshot(tree)
    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real(path)
        if fsutil.is_inside(path, tree):
            return usage._replace(free=8 * 1024)
        return usage

    argv = ("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "noext")
    with monkeypatch.context() as mp:
        mp.setattr(fsutil.shutil, "disk_usage", nearly_full)
        result = cli(*argv)
    _assert_no_space_line(result, "no space left on the disk at", "KiB needed", "8 KiB free", "webui-user.sh",
                          "copying lowvram's hook")
    assert snapshot(tree) == before
    assert temps(tree, lowvram_home) == []
    assert cli(*argv).code == 0
    with monkeypatch.context() as mp:  # applied already: nothing to write, so a full disk is no refusal
        mp.setattr(fsutil.shutil, "disk_usage", nearly_full)
        assert cli(*argv).code == 0


def _mount_tmpfs(where: Path, size_kib: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                          capture_output=True, check=False)
    return done.returncode == 0


def _fill(root: Path, leave: int) -> None:
    """Fill the file system holding `root` until `leave` bytes are free."""
    free = shutil.disk_usage(root).free - leave
    with open(root / "filler.bin", "wb") as fh:
        while free > 0:
            chunk = min(free, 1 << 16)
            try:
                fh.write(b"\0" * chunk)
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            free -= chunk


@pytest.mark.parametrize("check", ["before-the-first-write", "during-the-copy"])
def test_a_real_full_file_system_while_copying_the_hook(
        cli: Any, tmp_path: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch, check: str) -> None:
    """A real tmpfs, filled up: the kernel says ENOSPC. With the free-space check, apply refuses
    before the first write; without it (space taken between the check and the copy) the copy
    fails for real, and says the same one line. Either way the tree is as it was."""
    mnt = tmp_path / "small-disk"
    if not _mount_tmpfs(mnt, 1024):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        install_noext_profile(lowvram_home)
        facts = write_gtx1070_facts(tmp_path / "facts.json")
        tree = make_webui(mnt / "stable-diffusion-webui", venv=False)
        _fill(mnt, 24 * 1024)  # room for the block, not for the hook
        before = snapshot(tree)
        with monkeypatch.context() as mp:
            if check == "during-the-copy":
                mp.setattr(fsutil, "check_free_space", lambda *a, **k: None)
            result = cli("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "noext")
        _assert_no_space_line(result, f"no space left on the disk at {mnt} (tmpfs)", "needed", "copying lowvram's hook")
        assert snapshot(tree) == before
        assert temps(tree, lowvram_home) == []
        (mnt / "filler.bin").unlink()
        assert cli("apply", "--webui", str(tree), "--facts", str(facts), "--profile", "noext").code == 0
        assert cli("revert", "--webui", str(tree)).code == 0
        assert snapshot(tree) == before
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


# ---------------------------------------------------------------------------------------------
# kill -9 with the user's links in the tree (benchmarks/fault_injection.py --linked runs more)


@pytest.fixture(scope="module")
def linked_lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.fixtures.links_special import LinkedLab

    return LinkedLab(tmp_path_factory.mktemp("linked-faults") / "lab")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["apply", "install-extensions", "revert"])
def test_kills_leave_links_as_links_and_old_or_new_behind_them(linked_lab: Any, op: str) -> None:
    """webui-user.sh, config.json and extensions/ are links inside the tree: a kill at any point
    leaves each link as it was and each file behind it old or new; the next run finishes and revert
    gives back the original tree."""
    from tests.fixtures.faults import run_trials

    results = run_trials(linked_lab, op, 4, seed=20240607)
    assert [f"{r.how} (after {r.last_point}): {r.problem}" for r in results if not r.ok] == []
    assert any(r.killed for r in results)


# ---------------------------------------------------------------------------------------------
# The primitives the commands rely on


def test_remove_tree_on_a_link_removes_the_link_only(tmp_path: Path) -> None:
    """The old remove_tree ran rmtree on the link; its error handler chmodded what it points to."""
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "f").write_text("x")
    outside.chmod(0o751)
    before = fingerprint(outside)
    link = tmp_path / "tree" / "link"
    link.parent.mkdir()
    os.symlink(outside, link)
    fsutil.remove_tree(link)
    assert not os.path.lexists(link)
    assert fingerprint(outside) == before


@pytest.mark.parametrize(("kind", "outcome"), [
    ("file", "itself"), ("missing", "itself"), ("link-in", "target"), ("dangling-in", "target"),
    ("link-out", "refused"), ("dangling-out", "refused"), ("loop", "refused"), ("fifo", "refused"),
    ("dir", "refused"), ("parent-link-out", "refused"),
])
def test_write_target(tmp_path: Path, kind: str, outcome: str) -> None:
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "configs").mkdir(parents=True)
    outside.mkdir()
    (outside / "f").write_text("theirs")
    (tree / "configs" / "f").write_text("mine")
    path = tree / "f"
    target = {"link-in": tree / "configs" / "f", "dangling-in": tree / "configs" / "gone",
              "link-out": outside / "f", "dangling-out": outside / "gone", "loop": path}.get(kind)
    if kind == "file":
        path.write_text("x")
    elif target is not None:
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "parent-link-out":
        os.symlink(outside, tree / "sub")
        path = tree / "sub" / "new"
    if outcome == "refused":
        with pytest.raises(fsutil.ApplyError) as err:
            fsutil.write_target(path, tree)
        assert str(path) in err.value.message and err.value.hint
        return
    real = fsutil.write_target(path, tree)
    assert real == (path if outcome == "itself" else target)
    fsutil.atomic_write_bytes(path, b"new", within=tree)
    assert real.read_bytes() == b"new"
    assert (path.is_symlink()) == (kind in ("link-in", "dangling-in"))
    assert (outside / "f").read_text() == "theirs"


@pytest.mark.parametrize("kind", ["fifo", "chardev", "socket", "dir", "huge", "loop"])
def test_read_regular_bytes_refuses_before_opening(tmp_path: Path, kind: str) -> None:
    bench_path = tmp_path / "x.json"
    if kind == "fifo":
        os.mkfifo(bench_path)
    elif kind == "chardev":
        os.symlink("/dev/zero", bench_path)
    elif kind == "socket":
        from tests.fixtures.links_special import _make_socket

        _make_socket(bench_path)
    elif kind == "dir":
        bench_path.mkdir()
    elif kind == "huge":
        with open(bench_path, "wb") as fh:
            fh.truncate(3 * 1024 ** 3)
    else:
        os.symlink(bench_path.name, bench_path)
    with pytest.raises(fsutil.UnsafeFileError) as err:
        fsutil.read_regular_bytes(bench_path, 1024 * 1024, "thing")
    assert str(bench_path) in err.value.message and err.value.hint
    if kind == "huge":
        assert fsutil.read_regular_bytes(bench_path, 16, head=True) == b"\0" * 16


@pytest.mark.slow
@pytest.mark.parametrize(("op", "point"), [
    ("apply", "write:webui-user.sh:half-written"), ("apply", "write:webui-user.sh:before-rename"),
    ("install-extensions", "write:config.json:before-rename"), ("revert", "write:webui-user.sh:before-rename"),
    ("revert", "write:config.json:half-written")])
def test_a_kill_while_writing_through_a_link_leaves_no_temp_beside_its_target(linked_lab: Any, op: str,
                                                                               point: str) -> None:
    """The temp file of a write through a link lies beside the target (configs/): the next run of
    any command must remove it there, not only in the tree's top folder."""
    ref = linked_lab.reference(op)
    result = linked_lab.trial(op, kill_at=ref.points.index(point) + 1)
    assert result.killed and result.last_point == point
    assert result.ok, result.problem
