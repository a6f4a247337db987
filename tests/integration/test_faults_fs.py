"""Disk full, a read-only or foreign-owned WebUI folder, and a WebUI folder deleted while the UI runs.

These machines run as root, so chmod proves nothing (docs/architecture.md#tests): the failures are made by
patching the OS calls (tests/fixtures/faults.py: ENOSPC on write, EROFS/EACCES on every call that
would change a path) or, in a subprocess, by a real RLIMIT_FSIZE. Each time lowvram must stop with
one line and a hint (never a traceback), leave the user's files as they were and no temp file, and
work normally once the fault is gone.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import fsutil, paths
from tests.conftest import REPO
from tests.fixtures.faults import (
    DISK_FULL_DRIVER,
    disk_full,
    install_noext_profile,
    refuse_changes,
    snapshot,
    temps,
    write_gtx1070_facts,
)
from tests.fixtures.git_repos import Remotes, make_remotes
from tests.fixtures.launchers import events, fake_env, make_fake_a1111
from tests.fixtures.webui_trees import make_webui

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="patches Linux OS calls, /proc/self/fd")



@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    return write_gtx1070_facts(tmp_path / "gtx1070.json")


@pytest.fixture
def tree(tmp_path: Path, lowvram_home: Path) -> Path:
    install_noext_profile(lowvram_home)
    return make_webui(tmp_path / "stable-diffusion-webui",
                      config={"disabled_extensions": ["stable-diffusion-webui-giant-kitten"]})


def apply_args(tree: Path, facts_file: Path, profile: str = "noext") -> list[str]:
    return ["apply", "--webui", str(tree), "--facts", str(facts_file), "--profile", profile]


def assert_clean_failure(result: Any, *phrases: str) -> None:
    """Exit 1, one `error:` line and one `hint:` line, no traceback, nothing 'unexpected'."""
    assert result.code == 1, (result.out, result.err)
    lines = [ln for ln in result.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.err
    assert any(ln.startswith("hint:") for ln in lines), result.err
    assert "Traceback" not in result.err and "unexpected error" not in result.err, result.err
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


# --- disk full ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["webui", "state"])
def test_disk_full_stops_apply_cleanly_and_the_next_run_finishes(
        cli: Any, tree: Path, facts_file: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    before = snapshot(tree)
    with monkeypatch.context() as mp:
        disk_full(mp, tree if where == "webui" else lowvram_home)
        result = cli(*apply_args(tree, facts_file))
    assert_clean_failure(result, "no space left on the disk")
    assert "free some disk space" in result.err
    assert snapshot(tree) == before  # the user's files are the old ones
    assert temps(tree, lowvram_home) == []
    # with space again, apply finishes and revert takes it all out
    again = cli(*apply_args(tree, facts_file))
    assert again.code == 0, again.err
    assert b"lowvram managed block" in (tree / "webui-user.sh").read_bytes()
    assert cli("revert", "--webui", str(tree)).code == 0
    assert snapshot(tree) == before


def test_disk_full_while_enabling_an_extension_keeps_config_json(
        cli: Any, tree: Path, lowvram_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_remotes(tmp_path / "remotes", monkeypatch)
    before = snapshot(tree)
    with monkeypatch.context() as mp:
        disk_full(mp, tree, only="config.json")  # the clones fit; the edit of config.json does not
        result = cli("install-extensions", "--webui", str(tree))
    assert_clean_failure(result, "no space left on the disk", "config.json")
    assert (tree / "config.json").read_bytes() == before["config.json"]
    assert temps(tree, lowvram_home) == []
    again = cli("install-extensions", "--webui", str(tree))
    assert again.code == 0, again.err
    assert "stable-diffusion-webui-giant-kitten" not in json.loads((tree / "config.json").read_text())[
        "disabled_extensions"]
    assert cli("revert", "--webui", str(tree)).code == 0
    assert snapshot(tree) == before


def test_disk_full_during_clones_fails_each_extension_cleanly(tree: Path, lowvram_home: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real process (what the terminal shows): each clone fails with a reason, no traceback
    (GitPython itself writes .git/config, so its OSError must become lowvram's error)."""
    remotes: Remotes = make_remotes(tmp_path / "remotes", monkeypatch)
    before = snapshot(tree)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LOWVRAM_TEST_REGISTRY": str(remotes.registry)}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_DRIVER, str(tree), "install-extensions", "--webui",
                           str(tree), "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr, proc.stderr
    rows = json.loads(proc.stdout)["extensions"]
    assert {r["status"] for r in rows} == {"failed"}
    assert all("No space left on device" in r["reason"] and "free disk space" in r["reason"] for r in rows)
    assert snapshot(tree) == before
    assert temps(tree, lowvram_home) == []


def _limit_fsize(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_in_a_real_subprocess(tree: Path, facts_file: Path, lowvram_home: Path) -> None:
    """RLIMIT_FSIZE: the kernel refuses the write (no patching); the new webui-user.sh cannot fit."""
    before = snapshot(tree)
    old = before["webui-user.sh"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "lowvram", *apply_args(tree, facts_file)]
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: _limit_fsize(len(old) + 64))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr, proc.stderr
    # The hook is copied (staged beside its place) before the block is written: its first file is
    # the first write over the limit, and the tree stays as it was.
    assert "file too large while writing" in proc.stderr and "lowvram-layout" in proc.stderr
    assert "ulimit -f" in proc.stderr
    assert snapshot(tree) == before
    assert temps(tree, lowvram_home) == []
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len((tree / "webui-user.sh").read_bytes()) > len(old) + 64


# --- read-only / not ours -----------------------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_read_only_webui_apply_fails_cleanly_and_changes_nothing(
        cli: Any, tree: Path, facts_file: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch,
        err: int) -> None:
    before = snapshot(tree)
    with monkeypatch.context() as mp:
        refuse_changes(mp, tree, err)
        result = cli(*apply_args(tree, facts_file))
    assert_clean_failure(result, "cannot write", os.strerror(err))
    assert "writable" in result.err
    assert snapshot(tree) == before
    assert temps(tree, lowvram_home) == []
    assert cli(*apply_args(tree, facts_file)).code == 0
    assert cli("revert", "--webui", str(tree)).code == 0
    assert snapshot(tree) == before


def test_read_only_webui_revert_fails_cleanly_and_keeps_the_applied_tree(
        cli: Any, tree: Path, facts_file: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = snapshot(tree)
    assert cli(*apply_args(tree, facts_file)).code == 0
    applied = snapshot(tree)
    with monkeypatch.context() as mp:
        refuse_changes(mp, tree, errno.EROFS)
        result = cli("revert", "--webui", str(tree))
    assert_clean_failure(result, "Read-only file system")
    assert snapshot(tree) == applied
    assert paths.manifest_path(tree).is_file()  # revert can still be done later
    assert cli("revert", "--webui", str(tree)).code == 0
    assert snapshot(tree) == original


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_state_dir_not_writable_is_one_clear_line(
        cli: Any, tree: Path, facts_file: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch,
        err: int) -> None:
    """LOWVRAM_HOME (the lock, the manifest) cannot be written: nothing in the tree changes."""
    before = snapshot(tree)
    with monkeypatch.context() as mp:
        refuse_changes(mp, lowvram_home, err)
        result = cli(*apply_args(tree, facts_file))
    assert_clean_failure(result, os.strerror(err))
    assert snapshot(tree) == before


# --- the WebUI folder deleted while the UI runs -------------------------------------------------


def _launch(tree: Path, facts_file: Path, record: Path, **knobs: str) -> subprocess.Popen[str]:
    env = {**os.environ, **fake_env(record, light="1", **knobs), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lowvram", "launch", "--webui", str(tree), "--facts",
                             str(facts_file), "--profile", "noext"], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_ready(proc: subprocess.Popen[str], record: Path) -> None:
    deadline = time.monotonic() + 60
    while not events(record, "ready"):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("restart", [False, True])
def test_webui_deleted_mid_launch(tmp_path: Path, facts_file: Path, lowvram_home: Path, restart: bool) -> None:
    """The tree vanishes under a running UI. lowvram exits with the UI's code and a clear last line;
    when webui.sh then tries to restart the UI from the deleted folder, that failure is the UI's
    code, still without a traceback from lowvram."""
    install_noext_profile(lowvram_home)
    tree = make_fake_a1111(tmp_path / "stable-diffusion-webui")
    record = tmp_path / "record.jsonl"
    knobs = {"wait": "2"}
    if restart:
        knobs["restart"] = "1"
    proc = _launch(tree, facts_file, record, **knobs)
    try:
        _wait_ready(proc, record)
        shutil.rmtree(tree)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback (most recent call last)" not in err.split("lowvram: starting", 1)[0]
    assert "unexpected error" not in err
    tail = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert tail.startswith("lowvram: the UI exited with code"), err[-2000:]
    code = int(tail.rsplit(" ", 1)[1])
    assert proc.returncode == code
    if not restart:
        assert code == 0
    # the lock died with the launch: the (re-created) folder can be used again at once
    assert not tree.exists()
    with fsutil.webui_lock(paths.lock_path(tree)):
        pass
