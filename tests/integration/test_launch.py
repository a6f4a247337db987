"""build_launch / run_launch against a fake A1111 that starts the way the real one does.

These tests build the Plan by hand, so they exercise the launcher alone: the exact command, the
environment webui.sh and launch.py receive, exit codes through webui.sh (which always exits 0),
signals forwarded to the UI's process group, and the WebUI lock held for the UI's whole life.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lowvram.core.errors import FlagError, LaunchError, LockError, UsageError
from lowvram.core.facts import Facts, SystemFacts, WebuiFacts
from lowvram.core.plan import EstimateSummary, HookPlan, Plan, ReservePlan, TcmallocPlan
from lowvram.world import launch, paths
from lowvram.world.fsutil import FileLock
from tests.fixtures.launchers import events, fake_env, make_fake_a1111, read_record
from tests.fixtures.webui_trees import make_webui

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake A1111 is a bash stand-in")

TIMEOUT = 60


def make_plan(ui: str = "a1111", args: tuple[str, ...] = ("--xformers", "--medvram-sdxl"), **kw: object) -> Plan:
    base = Plan(
        profile="gtx1070-sdxl", ui=ui, webui=None, args=args,
        env={"COMMANDLINE_ARGS": " ".join(args)},
        tcmalloc=TcmallocPlan(False, None, "test"), extensions=(), road="swap",
        reserve=ReservePlan(mode="auto", mb=0, applied=False, reason="learning"), headroom_mb=300,
        hook=HookPlan(True, "test"), estimate=EstimateSummary(7000, True), decisions=(),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def make_facts(tree: Path | None, os_name: str = "linux", flavor: str = "a1111", version: str | None = "1.8.0",
               user_args: tuple[str, ...] | None = None) -> Facts:
    webui = None
    if tree is not None:
        webui = WebuiFacts(path=str(tree), flavor=flavor, version=version, user_args=user_args)
    return Facts(system=SystemFacts(os=os_name), webui=webui)


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    return make_fake_a1111(tmp_path / "sd webui")  # a space in the path, as users have


def with_block(tree: Path, commandline_args: str, extra_lines: str = "") -> None:
    """What apply's managed block does, written by hand so these tests need no apply."""
    with open(tree / "webui-user.sh", "a", encoding="utf-8") as fh:
        fh.write(f'export COMMANDLINE_ARGS="${{COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }}{commandline_args}"\n')
        fh.write(extra_lines)


def run_spec(spec: launch.LaunchSpec, env: dict[str, str], lock: FileLock | None = None) -> int:
    """run_launch in a child process-free way: the spec's environment plus the fake's knobs."""
    spec = replace(spec, env_changes={**spec.env_changes, **env})
    return launch.run_launch(spec, lock, stdout=subprocess.DEVNULL)


# --- the command ------------------------------------------------------------------------------


def test_a1111_command_as_root_puts_f_first_and_points_webui_sh_at_the_tree(fake: Path) -> None:
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, extra_args=("--port", "7861"), euid=0)
    assert spec.argv == ("bash", "webui.sh", "-f", "--port", "7861")
    assert spec.cwd == fake.resolve()
    assert spec.env_changes["install_dir"] == str(fake.resolve().parent)
    assert spec.env_changes["clone_dir"] == "sd webui"
    assert spec.env_changes["LAUNCH_SCRIPT"] == str(launch.wrapper_path(fake))
    assert Path(spec.env_changes["LAUNCH_SCRIPT"]).is_relative_to(paths.webui_state_dir(fake))
    assert "COMMANDLINE_ARGS" not in spec.env_changes  # planned flags live only in the block
    assert any("-f goes first" in n for n in spec.notes)


def test_not_root_gets_no_f(fake: Path) -> None:
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=1000)
    assert spec.argv == ("bash", "webui.sh")
    assert not any("-f" in n for n in spec.notes)


def test_build_launch_writes_nothing(fake: Path, lowvram_home: Path) -> None:
    before = sorted(p.relative_to(fake) for p in fake.rglob("*"))
    launch.build_launch(make_plan(), make_facts(fake), fake, euid=0)
    assert sorted(p.relative_to(fake) for p in fake.rglob("*")) == before
    assert list(lowvram_home.iterdir()) == []


def test_no_hook_sets_lowvram_hook_off(fake: Path) -> None:
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, no_hook=True, euid=1000)
    assert spec.env_changes["LOWVRAM_HOOK"] == "off"


def test_no_webui_says_how_to_point_at_one() -> None:
    with pytest.raises(LaunchError) as info:
        launch.build_launch(make_plan(), make_facts(None), None)
    assert "--webui" in info.value.hint and "LOWVRAM_WEBUI" in info.value.hint and "lowvram setup" in info.value.hint


def test_extra_args_are_validated_with_the_ui_flag_list(fake: Path) -> None:
    with pytest.raises(FlagError) as info:
        launch.build_launch(make_plan(), make_facts(fake), fake, extra_args=("--medvramsdxl",), euid=1000)
    assert "--medvram-sdxl" in info.value.hint


def test_valued_flag_in_both_warns_that_the_block_wins(fake: Path) -> None:
    plan = make_plan(args=("--xformers", "--port", "7860"))
    spec = launch.build_launch(plan, make_facts(fake), fake, extra_args=("--port", "7861"), euid=1000)
    assert any("--port 7861" in w and "--port 7860" in w and "wins" in w for w in spec.warnings)
    same = launch.build_launch(plan, make_facts(fake), fake, extra_args=("--port", "7860", "--api"), euid=1000)
    assert same.warnings == ()


def test_users_own_literal_flags_count_as_block_flags(fake: Path) -> None:
    facts = make_facts(fake, user_args=("--ckpt-dir", "/models"))
    spec = launch.build_launch(make_plan(), facts, fake, extra_args=("--ckpt-dir", "/other"), euid=1000)
    assert any("--ckpt-dir /other" in w for w in spec.warnings)


def test_lowvrams_own_venv_is_not_mistaken_for_the_webuis(fake: Path) -> None:
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=1000,
                               environ={"VIRTUAL_ENV": sys.prefix})
    assert spec.env_unset == ("VIRTUAL_ENV",)
    other = launch.build_launch(make_plan(), make_facts(fake), fake, euid=1000,
                                environ={"VIRTUAL_ENV": str(fake / "venv")})
    assert other.env_unset == ()


def test_sdnext_needs_no_wrapper(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "sdnext", flavor="sdnext")
    spec = launch.build_launch(make_plan(ui="sdnext"), make_facts(tree, flavor="sdnext"), tree, euid=0)
    assert spec.argv == ("bash", "webui.sh", "-f")
    assert "LAUNCH_SCRIPT" not in spec.env_changes and spec.status_path is None


def test_comfyui_flags_go_on_main_py_command_line(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "ComfyUI", flavor="comfyui")
    plan = make_plan(ui="comfyui", args=("--lowvram", "--reserve-vram", "0.6"),
                     env={"COMMANDLINE_ARGS": "ignored", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"})
    spec = launch.build_launch(plan, make_facts(tree, flavor="comfyui"), tree, extra_args=("--port", "8189"))
    assert spec.argv == (str(tree.resolve() / "venv" / "bin" / "python"), "main.py", "--lowvram", "--reserve-vram",
                         "0.6", "--port", "8189")
    assert spec.cwd == tree.resolve()
    assert spec.env_changes == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}


def test_comfyui_portable_python_and_python_option(tmp_path: Path) -> None:
    root = tmp_path / "ComfyUI_windows_portable"
    tree = make_webui(root / "ComfyUI", flavor="comfyui", venv=False)
    embedded = root / "python_embeded" / "python.exe"
    embedded.parent.mkdir()
    embedded.write_bytes(b"MZ")
    plan = make_plan(ui="comfyui", args=("--lowvram",), env={})
    spec = launch.build_launch(plan, make_facts(tree, os_name="windows", flavor="comfyui"), tree)
    assert spec.argv[:2] == (str(embedded.resolve()), "main.py")
    with pytest.raises(LaunchError) as info:
        launch.build_launch(plan, make_facts(tree, flavor="comfyui"), tree)
    assert "--python" in info.value.hint
    mine = launch.build_launch(plan, make_facts(tree, flavor="comfyui"), tree, python=Path(sys.executable))
    assert mine.argv[0] == sys.executable


def test_windows_runs_webui_user_bat_with_stdin_closed(tmp_path: Path) -> None:
    from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT

    tree = make_webui(tmp_path / "win", webui_user_bat=STOCK_WEBUI_USER_BAT)
    spec = launch.build_launch(make_plan(), make_facts(tree, os_name="windows"), tree, euid=0)
    assert spec.argv == ("cmd", "/d", "/c", "webui-user.bat")
    assert spec.stdin_closed and spec.target_os == "windows"
    with pytest.raises(UsageError):
        launch.build_launch(make_plan(), make_facts(tree, os_name="windows"), tree, extra_args=("--api",))
    (tree / "webui-user.bat").unlink()
    direct = launch.build_launch(make_plan(), make_facts(tree, os_name="windows"), tree, extra_args=("--api",))
    assert direct.argv == ("cmd", "/d", "/c", "webui.bat", "--api")
    with pytest.raises(LaunchError, match="targets windows"):
        launch.start_ui(direct)


@pytest.mark.parametrize("call_line", ['@call webui.bat', 'call "C:\\Stable Diffusion\\webui.bat"',
                                       'CALL "%~dp0webui.bat"'])
def test_windows_launches_the_bat_that_holds_the_block(tmp_path: Path, call_line: str) -> None:
    """apply puts the block before the `call …webui.bat` line; launch must run that file, not
    webui.bat directly (which would skip the block)."""
    from lowvram.world.apply import apply_plan

    user_bat = f"@echo off\r\nset COMMANDLINE_ARGS=\r\n{call_line}\r\n"
    tree = make_webui(tmp_path / "win", webui_user_sh=None, webui_user_bat=user_bat)
    facts = make_facts(tree, os_name="windows")
    # (no hook: its config's path here is a Linux one, which apply never writes into a .bat)
    apply_plan(make_plan(hook=HookPlan(False, "test")), tree, facts)
    assert b"rem >>> lowvram" in (tree / "webui-user.bat").read_bytes()
    assert not (tree / "webui.settings.bat").exists()
    spec = launch.build_launch(make_plan(), facts, tree)
    assert spec.argv == ("cmd", "/d", "/c", "webui-user.bat")


# --- running through the fake webui.sh --------------------------------------------------------


def test_launch_py_receives_exactly_the_planned_argv_and_env(fake: Path, tmp_path: Path) -> None:
    with_block(fake, "--xformers --medvram-sdxl",
               'export PYTORCH_CUDA_ALLOC_CONF="garbage_collection_threshold:0.9"\nexport NO_TCMALLOC=1\n')
    record = tmp_path / "record.jsonl"
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, extra_args=("--port", "7861"), euid=0)
    code = run_spec(spec, fake_env(record, light="1"))
    assert code == 0
    start = events(record, "start")[0]
    assert start["argv"] == ["launch.py", "-f", "--port", "7861"]
    assert start["cwd"] == str(fake.resolve())
    assert start["env"]["COMMANDLINE_ARGS"] == "--xformers --medvram-sdxl"
    assert start["env"]["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.9"
    assert start["env"]["SD_WEBUI_RESTART"] == "tmp/restart"
    assert "FAKE_TCMALLOC_PROBED" not in start["env"]  # NO_TCMALLOC from the block stopped the probe
    assert start["executable"] == sys.executable  # the tree's venv python (a wrapper around the test's)
    assert start["unbuffered"] is True  # webui.sh's -u reaches the UI through the wrapper
    for leaked in ("LAUNCH_SCRIPT", "LOWVRAM_LAUNCH_STATUS", "LOWVRAM_LAUNCH_SCRIPT"):
        assert leaked not in start["env"]
    parsed = events(record, "parsed")[0]
    assert parsed["argv"] == ["launch.py", "-f", "--port", "7861", "--xformers", "--medvram-sdxl"]
    assert not (fake.parent / "stable-diffusion-webui").exists()


def test_zip_install_without_install_dir_would_clone(fake: Path, tmp_path: Path) -> None:
    """Why launch exports install_dir/clone_dir: without them A1111 1.8 clones a fresh copy."""
    mark = tmp_path / "cloned"
    proc = subprocess.run(["bash", "webui.sh", "-f"], cwd=fake, env={**os.environ, "FAKE_CLONE_MARK": str(mark)},
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert mark.exists() and "stable-diffusion-webui" in mark.read_text()
    assert proc.returncode == 1


@pytest.mark.parametrize("how, expected", [("0", 0), ("3", 3), ("signal:9", 137), ("os_exit:5", 5)])
def test_exit_codes_pass_through_webui_sh(fake: Path, tmp_path: Path, how: str, expected: int) -> None:
    record = tmp_path / "record.jsonl"
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=0)
    assert run_spec(spec, fake_env(record, light="1", exit=how)) == expected
    assert events(record, "exit")[0]["how"] == how


def test_webui_sh_alone_always_exits_0(fake: Path, tmp_path: Path) -> None:
    """The fact the wrapper exists for: webui.sh hides the UI's exit code."""
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "install_dir": str(fake.parent), "clone_dir": fake.name,
           **fake_env(record, light="1", exit="3")}
    proc = subprocess.run(["bash", "webui.sh", "-f"], cwd=fake, env=env, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0 and events(record, "exit")


def test_root_refusal_without_f_is_webui_sh_exit_1(fake: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the refusal needs root")
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=1000)  # pretend lowvram is not root
    record = tmp_path / "record.jsonl"
    assert run_spec(spec, fake_env(record, light="1")) == 1
    assert read_record(record) == []


def test_restart_loop_runs_the_ui_again_and_keeps_the_last_code(fake: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=0)
    assert run_spec(spec, fake_env(record, light="1", restart="1", exit="4")) == 4
    assert len(events(record, "start")) == 2


def test_wrapper_records_the_status_and_is_written_once(fake: Path, tmp_path: Path) -> None:
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=0)
    run_spec(spec, fake_env(tmp_path / "r.jsonl", light="1", exit="2"))
    assert launch.read_status(spec.status_path) == {"state": "exited", "returncode": 2,
                                                    "pid": events(tmp_path / "r.jsonl", "start")[0]["pid"]}
    assert spec.wrapper_path is not None and spec.wrapper_path.read_text() == launch.WRAPPER_SOURCE


# --- signals and the lock ---------------------------------------------------------------------


def _wait_for(predicate, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_reaches_the_ui_group_and_its_death_is_the_exit_code(fake: Path, tmp_path: Path, signum: int) -> None:
    record = tmp_path / "record.jsonl"
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=0)
    spec = replace(spec, env_changes={**spec.env_changes, **fake_env(record, light="1", wait="30")})
    running = launch.start_ui(spec, stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: events(record, "ready"))
        running.send(signum)
        code = running.wait(timeout=TIMEOUT)
    finally:
        if running.proc.poll() is None:
            running.send(signal.SIGKILL)
    assert [e["signal"] for e in events(record, "signal")] == [signum]
    assert code == 128 + signum


DRIVER = (
    "import sys\nfrom pathlib import Path\n"
    "from lowvram.world import launch, paths\nfrom lowvram.world.fsutil import FileLock\n"
    "from tests.integration.test_launch import make_facts, make_plan\n"
    "tree = Path(sys.argv[1])\n"
    "spec = launch.build_launch(make_plan(), make_facts(tree), tree, euid=0)\n"
    "lock = FileLock(paths.lock_path(tree)); lock.acquire()\n"
    "sys.exit(launch.run_launch(spec, lock))\n"
)


def start_driver(tree: Path, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A real process running run_launch in its main thread (where signal handlers live)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    repo = Path(__file__).parents[2]
    return subprocess.Popen([sys.executable, str(driver), str(tree)], env={**os.environ, **env, "PYTHONPATH": str(repo)},
                            cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_lowvram_launch_forwards_sigterm_and_holds_the_lock(fake: Path, tmp_path: Path, lowvram_home: Path) -> None:
    """SIGTERM to the launching process reaches the UI; the WebUI is locked meanwhile."""
    record = tmp_path / "record.jsonl"
    proc = start_driver(fake, tmp_path, fake_env(record, light="1", wait="30"))
    try:
        _wait_for(lambda: events(record, "ready"))
        with pytest.raises(LockError) as info:
            FileLock(paths.lock_path(fake), what="the WebUI").acquire()
        assert "lowvram launch" in info.value.hint
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [e["signal"] for e in events(record, "signal")] == [signal.SIGTERM]
    lock = FileLock(paths.lock_path(fake))
    lock.acquire()  # released once the UI is gone
    lock.release()


def test_lock_outlives_a_killed_lowvram_while_the_ui_runs(fake: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    spec = launch.build_launch(make_plan(), make_facts(fake), fake, euid=0)
    spec = replace(spec, env_changes={**spec.env_changes, **fake_env(record, light="1", wait="30")})
    lock = FileLock(paths.lock_path(fake))
    lock.acquire()
    running = launch.start_ui(spec, lock, stdout=subprocess.DEVNULL)
    try:
        _wait_for(lambda: events(record, "ready"))
        lock._fh.close()  # what the OS does to lowvram's descriptor when lowvram is killed
        lock._fh = None
        with pytest.raises(LockError):
            FileLock(paths.lock_path(fake)).acquire()
        assert running.stop(grace=TIMEOUT) == 128 + signal.SIGTERM
    finally:
        if running.proc.poll() is None:
            running.send(signal.SIGKILL)
    again = FileLock(paths.lock_path(fake))
    again.acquire()
    again.release()


def test_third_ctrl_c_kills_a_ui_stuck_in_shutdown(fake: Path, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    proc = start_driver(fake, tmp_path, fake_env(record, light="1", wait="30", stubborn="1"))
    try:
        _wait_for(lambda: events(record, "ready"))
        for n in (1, 2):
            proc.send_signal(signal.SIGINT)
            _wait_for(lambda n=n: len(events(record, "signal")) == n)  # type: ignore[misc]
        assert proc.poll() is None  # the UI ignores them and lowvram waits for it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=TIMEOUT) == 128 + signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("shell_rc, status, expected", [
    (0, {"state": "exited", "returncode": 3}, 3),
    (0, {"state": "exited", "returncode": -15}, 143),
    (-15, {"state": "exited", "returncode": 0}, 0),  # webui.sh died first; the UI itself ended cleanly
    (-9, {"state": "running", "pid": 1}, 137),
    (0, {"state": "running", "pid": 1}, 1),  # the wrapper was killed: the UI's end is unknown
    (1, None, 1),  # webui.sh refused before the UI started (root without -f)
    (-2, None, 130),
])
def test_exit_code_from(shell_rc: int, status: dict[str, object] | None, expected: int) -> None:
    assert launch.exit_code_from(shell_rc, status) == expected


def test_forge_goes_through_the_wrapper_and_python_sets_python_cmd(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "forge", flavor="forge")
    spec = launch.build_launch(make_plan(ui="forge", args=("--always-low-vram",)),
                               make_facts(tree, flavor="forge", version="f2.0.1v1.10.1"), tree,
                               python=Path("/opt/py/bin/python3.10"), euid=1000)
    assert spec.argv == ("bash", "webui.sh")
    assert spec.env_changes["LAUNCH_SCRIPT"] == str(launch.wrapper_path(tree))
    assert spec.env_changes["python_cmd"] == "/opt/py/bin/python3.10"


@pytest.mark.wine
@pytest.mark.skipif(not __import__("shutil").which("wine"), reason="wine is not installed")
def test_windows_command_returns_through_pause_under_wine(tmp_path: Path) -> None:
    """The Windows spec, run by wine's cmd: webui-user.bat runs the block, webui.bat's `pause` reads EOF."""
    tree = make_webui(tmp_path / "win", webui_user_bat=(
        "@echo off\r\nset COMMANDLINE_ARGS=\r\n"
        "rem the managed block\r\nset \"COMMANDLINE_ARGS=%COMMANDLINE_ARGS% --xformers\"\r\n"
        "call webui.bat\r\n"))
    (tree / "webui.bat").write_bytes(
        b"@echo off\r\nset SD_WEBUI_RESTART=tmp/restart\r\n"
        b"echo args=[%COMMANDLINE_ARGS%] > launched.txt\r\npause\r\nexit /b\r\n")
    spec = launch.build_launch(make_plan(), make_facts(tree, os_name="windows"), tree)
    assert spec.stdin_closed
    proc = subprocess.run(["wine", *spec.argv], cwd=spec.cwd, env={**os.environ, "WINEDEBUG": "-all"},
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0
    assert (tree / "launched.txt").read_text().strip() == "args=[ --xformers]"
