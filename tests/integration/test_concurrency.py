"""Two lowvram processes on one WebUI at once: one wins, the other refuses with a clear message, and
the files end up consistent (the block parses, the manifest is valid JSON, revert still works).

To hold the first process at a known point without changing lowvram, its LOWVRAM_KILL_TRACE names a
FIFO: lowvram opens the trace at every kill point, and opening a FIFO for writing blocks until the
test opens the other end. So the first `apply` stops at its first kill point, inside the WebUI's
lock, until the test lets it go. (Observations appended by two processes at once:
tests/unit/test_observations.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lowvram.world import paths
from lowvram.world.apply import webui_user
from tests.conftest import REPO
from tests.fixtures.faults import install_noext_profile, snapshot, write_gtx1070_facts
from tests.fixtures.launchers import events, fake_env, make_fake_a1111

pytestmark = pytest.mark.skipif(os.name == "nt", reason="FIFOs, fcntl locks and the bash stand-in of webui.sh")

TIMEOUT = 120
LOCKED = "another lowvram process is using the WebUI at"


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    return write_gtx1070_facts(tmp_path / "gtx1070.json")


@pytest.fixture
def tree(tmp_path: Path, lowvram_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    install_noext_profile(lowvram_home)
    mirror = tmp_path / "empty-mirror"  # nothing may reach the network, even by mistake
    mirror.mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror))
    return make_fake_a1111(tmp_path / "stable-diffusion-webui",
                           config={"disabled_extensions": ["stable-diffusion-webui-giant-kitten"]})


def command(op: str, tree: Path, facts_file: Path) -> list[str]:
    plan = ["--webui", str(tree), "--facts", str(facts_file), "--profile", "noext"]
    return {
        "apply": ["apply", *plan],
        "launch": ["launch", *plan],
        "revert": ["revert", "--webui", str(tree)],
        "install-extensions": ["install-extensions", "--webui", str(tree)],
    }[op]


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def start(argv: list[str], **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lowvram", *argv], env=env_with(**extra), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(argv: list[str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowvram", *argv], env=env_with(**extra), cwd=REPO, text=True,
                          capture_output=True, timeout=TIMEOUT)


def holder_pid(tree: Path) -> int | None:
    try:
        text = paths.lock_path(tree).read_text()
    except OSError:
        return None
    return int(text.split()[1]) if text.startswith("pid ") else None


@contextlib.contextmanager
def held_at_first_kill_point(argv: list[str], fifo: Path, tree: Path) -> Iterator[subprocess.Popen[str]]:
    """Run lowvram with its kill-point trace on a FIFO: it blocks, lock held, until we read."""
    os.mkfifo(fifo)
    proc = start(argv, LOWVRAM_KILL_TRACE=str(fifo))
    try:
        deadline = time.monotonic() + TIMEOUT
        while holder_pid(tree) != proc.pid:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the first process never took the lock"
            time.sleep(0.02)
        yield proc
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # let it go: drain the trace until it exits
        stop = threading.Event()

        def drain() -> None:
            while not stop.is_set():
                try:
                    if not os.read(fd, 65536):
                        time.sleep(0.01)
                except BlockingIOError:
                    time.sleep(0.01)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        try:
            _out, err = proc.communicate(timeout=TIMEOUT)
            proc.stderr_text = err  # type: ignore[attr-defined]
        finally:
            stop.set()
            thread.join()
            os.close(fd)
            if proc.poll() is None:
                proc.kill()


def assert_consistent(tree: Path) -> None:
    """The block parses and sets what apply writes; the manifest is valid and names the file."""
    data = (tree / "webui-user.sh").read_bytes()
    block = webui_user.block_bytes(data, webui_user.SH)
    assert block is not None
    values = webui_user.parse_block_vars(block, webui_user.SH)
    assert "--medvram-sdxl" in values["COMMANDLINE_ARGS"]
    assert values["LOWVRAM_CONFIG"] == str(paths.hook_config_path(tree.resolve()))
    manifest = json.loads(paths.manifest_path(tree.resolve()).read_text())
    assert "webui-user.sh" in manifest["files"]
    assert data.count(b">>> lowvram managed block") == 1


@pytest.mark.parametrize("second", ["apply", "launch", "revert", "install-extensions"])
def test_a_second_command_is_refused_while_apply_holds_the_lock(
        tree: Path, facts_file: Path, tmp_path: Path, second: str) -> None:
    original = snapshot(tree)
    record = tmp_path / "record.jsonl"
    with held_at_first_kill_point(command("apply", tree, facts_file), tmp_path / "trace.fifo", tree) as first:
        during = snapshot(tree)
        other = run(command(second, tree, facts_file), **fake_env(record, light="1"))
        assert other.returncode == 1, other.stderr
        assert f"{LOCKED} {tree.resolve()} (pid {first.pid})" in other.stderr
        assert "hint:" in other.stderr and "Traceback" not in other.stderr
        assert snapshot(tree) == during  # the refused command changed nothing
        assert not events(record, "start")  # a refused launch never started the UI
    assert first.returncode == 0, first.stderr_text  # type: ignore[attr-defined]
    assert_consistent(tree)
    assert run(command("revert", tree, facts_file)).returncode == 0
    assert snapshot(tree) == original


def test_two_applies_started_together_one_wins_and_the_files_are_whole(tree: Path, facts_file: Path) -> None:
    original = snapshot(tree)
    assert run(command("apply", tree, facts_file)).returncode == 0
    expected = snapshot(tree)
    assert run(command("revert", tree, facts_file)).returncode == 0
    winners = 0
    for _ in range(4):
        procs = [start(command("apply", tree, facts_file)) for _ in range(2)]
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
        for p, (_out, err) in zip(procs, outs, strict=True):
            assert p.returncode in (0, 1), err
            assert "Traceback" not in err
            if p.returncode == 1:
                assert LOCKED in err, err
            else:
                winners += 1
        assert any(p.returncode == 0 for p in procs)
        assert snapshot(tree) == expected
        assert_consistent(tree)
        assert run(command("revert", tree, facts_file)).returncode == 0
        assert snapshot(tree) == original
    assert winners >= 4


@pytest.mark.parametrize("second", ["apply", "revert"])
def test_apply_and_revert_are_refused_while_launch_runs_the_ui(
        tree: Path, facts_file: Path, tmp_path: Path, second: str) -> None:
    record = tmp_path / "record.jsonl"
    ui = start(command("launch", tree, facts_file), **fake_env(record, light="1", wait="60"))
    try:
        deadline = time.monotonic() + TIMEOUT
        while not events(record, "ready"):
            assert ui.poll() is None, ui.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        during = snapshot(tree)
        other = run(command(second, tree, facts_file))
        assert other.returncode == 1, other.stderr
        assert LOCKED in other.stderr and "until the UI exits" in other.stderr
        assert snapshot(tree) == during
        assert_consistent(tree)  # launch's own apply is whole while the UI runs
    finally:
        ui.terminate()  # SIGTERM is forwarded to the UI's group
        ui.communicate(timeout=TIMEOUT)
    # once the UI is gone the lock is free again
    assert run(command(second, tree, facts_file)).returncode == 0
