"""`lowvram launch` end to end: plan → apply → the fake A1111 really starts through webui.sh.

The machine is given by a facts file (a GTX 1070 under WSL2, where memory spills, so the resident
road and the layout exist); the UI started is the local fake tree. The fake UI hands the hook a
simulated card (FAKE_UI_GPU), the one edge faked, so the hook lays out and measures for real.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import launch, paths, state
from tests.conftest import REPO
from tests.fixtures.launchers import events, fake_env, make_fake_a1111
from tests.fixtures.webui_trees import make_webui

pytestmark = pytest.mark.skipif(os.name == "nt", reason="the fake A1111 is a bash stand-in")

TIMEOUT = 120

GTX1070_WSL = {
    "system": {"os": "linux", "os_version": "5.15.153.1-microsoft-standard-WSL2", "ram_mb": 32768, "swap_mb": 8192,
               "glibc": "2.35", "wsl": True, "sysmem_fallback": "on", "cpu_count": 8},
    "gpus": [{"index": 0, "uuid": "GPU-5e0c0c2a", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
              "vram_free_mb": 7800, "driver": "546.01", "cuda_driver": "12.3", "compute_capability": "6.1",
              "pcie_gen": 3, "pcie_width": 16}],
    "tcmalloc": {"library": None, "usable": False, "reason": "not installed"},
    "webui": None,
}


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "gtx1070.json"
    path.write_text(json.dumps(GTX1070_WSL))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_fake_a1111(tmp_path / "stable-diffusion-webui")


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Extensions come from an empty mirror: they fail at once, and launch goes on without them."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror))
    return mirror


def lowvram(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env or {})
    full["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True, env=full,
                          cwd=cwd or REPO, timeout=TIMEOUT)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def plan_args(tree: Path, facts_file: Path, *more: str) -> list[str]:
    return ["--profile", "gtx1070-sdxl", "--webui", str(tree), "--facts", str(facts_file), *more]


# --- dry run ----------------------------------------------------------------------------------


def test_dry_run_json_is_the_plan_plus_the_exact_command_and_changes_nothing(
        cli: Any, tree: Path, facts_file: Path, lowvram_home: Path) -> None:
    before = snapshot(tree)
    result = cli("launch", "--dry-run", "--json", *plan_args(tree, facts_file), "--", "--port", "7861")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert next(iter(data)) == "schema" and data["schema"] == 1
    assert {"profile", "ui", "webui", "args", "env", "reserve", "hook", "decisions", "launch"} <= set(data)
    assert data["profile"] == "gtx1070-sdxl"
    assert set(data["launch"]) >= {"argv", "cwd", "env"}
    root = os.geteuid() == 0
    assert data["launch"]["argv"] == ["bash", "webui.sh", *(["-f"] if root else []), "--port", "7861"]
    assert data["launch"]["cwd"] == str(tree.resolve())
    env = data["launch"]["env"]
    assert env["install_dir"] == str(tree.resolve().parent) and env["clone_dir"] == tree.name
    assert env["LAUNCH_SCRIPT"] == str(launch.wrapper_path(tree))
    assert "COMMANDLINE_ARGS" not in env  # the planned flags are in the managed block, not here
    assert data["env"]["LOWVRAM_CONFIG"] == str(paths.hook_config_path(tree).resolve())
    assert {"mb", "applied", "source", "reason"} <= set(data["reserve"])
    assert snapshot(tree) == before
    assert not (lowvram_home / "last.json").exists()
    assert not paths.webui_state_dir(tree).exists()


def test_dry_run_human_shows_command_and_cwd(cli: Any, tree: Path, facts_file: Path) -> None:
    result = cli("launch", "--dry-run", *plan_args(tree, facts_file))
    assert result.code == 0, result.err
    assert "bash webui.sh" in result.out and f"cwd       {tree.resolve()}" in result.out
    assert "nothing was changed" in result.out


def test_comfyui_dry_run_runs_main_py_with_the_planned_flags(cli: Any, tmp_path: Path, facts_file: Path) -> None:
    comfy = make_webui(tmp_path / "ComfyUI", flavor="comfyui")
    result = cli("launch", "--dry-run", "--json", "--webui", str(comfy), "--facts", str(facts_file), "--model", "sdxl")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["ui"] == "comfyui"
    assert data["launch"]["argv"][:2] == [str(comfy.resolve() / "venv" / "bin" / "python"), "main.py"]
    assert data["launch"]["argv"][2:] == data["args"]
    assert "COMMANDLINE_ARGS" not in data["launch"]["env"]


def test_no_webui_is_one_clear_line(cli: Any, tmp_path: Path, facts_file: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("launch", "--dry-run", "--facts", str(facts_file), "--model", "sdxl")
    assert result.code == 1
    assert "no WebUI" in result.err and "--webui" in result.err and "lowvram setup" in result.err
    assert "Traceback" not in result.err


def test_bad_extra_flag_is_refused_before_anything_is_written(cli: Any, tree: Path, facts_file: Path) -> None:
    before = snapshot(tree)
    result = cli("launch", *plan_args(tree, facts_file), "--", "--medvramsdxl")
    assert result.code == 1
    assert "--medvramsdxl" in result.err and "--medvram-sdxl" in result.err
    assert snapshot(tree) == before


def test_facts_from_another_os_are_refused_before_anything_is_written(cli: Any, tree: Path, tmp_path: Path,
                                                                      lowvram_home: Path) -> None:
    """Windows facts on Linux: launch --dry-run shows the Windows command; a real launch refuses
    before apply writes webui.settings.bat, the hook and the extensions into the tree."""
    windows = {**GTX1070_WSL, "system": {**GTX1070_WSL["system"], "os": "windows", "wsl": False}}
    facts = tmp_path / "windows.json"
    facts.write_text(json.dumps(windows))
    dry = json.loads(cli("launch", "--dry-run", "--json", *plan_args(tree, facts)).out)
    assert dry["launch"]["argv"][:3] == ["cmd", "/d", "/c"]
    before = snapshot(tree)
    result = cli("launch", *plan_args(tree, facts))
    assert result.code == 1
    assert "targets windows" in result.err and "--dry-run" in result.err
    assert "Traceback" not in result.err
    assert snapshot(tree) == before
    assert not paths.manifest_path(tree).exists()


# --- launching --------------------------------------------------------------------------------


def test_launch_py_receives_exactly_what_the_dry_run_showed(
        cli: Any, tree: Path, facts_file: Path, tmp_path: Path, offline: Path) -> None:
    dry = json.loads(cli("launch", "--dry-run", "--json", *plan_args(tree, facts_file), "--", "--port", "7861").out)
    record = tmp_path / "record.jsonl"
    proc = lowvram("launch", *plan_args(tree, facts_file), "--", "--port", "7861", env=fake_env(record, light="1"))
    assert proc.returncode == 0, proc.stderr
    start = events(record, "start")[0]
    assert ["bash", "webui.sh", *start["argv"][1:]] == dry["launch"]["argv"]  # webui.sh passes "$@" on
    assert start["cwd"] == dry["launch"]["cwd"]
    for key in ("LOWVRAM_CONFIG", *(k for k in dry["env"] if k != "COMMANDLINE_ARGS")):
        assert start["env"][key] == dry["env"][key], key
    assert shlex.split(start["env"]["COMMANDLINE_ARGS"]) == dry["args"]
    parsed = events(record, "parsed")[0]
    assert parsed["argv"] == ["launch.py", *start["argv"][1:], *dry["args"]]  # A1111 appends COMMANDLINE_ARGS
    assert "extension" in proc.stderr and "not installed" in proc.stderr  # offline: said, and launch went on


def test_end_to_end_the_hook_observes_and_the_next_plan_uses_the_reserve(
        cli: Any, tree: Path, facts_file: Path, tmp_path: Path, offline: Path) -> None:
    record = tmp_path / "record.jsonl"
    first = json.loads(cli("plan", "--json", *plan_args(tree, facts_file, "--layout", "on")).out)
    assert first["road"] == "resident" and first["reserve"]["source"] == "none"
    proc = lowvram("launch", *plan_args(tree, facts_file, "--layout", "on"), env=fake_env(record, gpu="8192,300"))
    assert proc.returncode == 0, proc.stderr
    done = events(record, "done")[0]
    assert done["hook_errors"] == []
    assert any(s.endswith("lowvram-layout/scripts/lowvram_layout.py") for s in done["alwayson"])
    assert done["callbacks"]["callbacks_model_loaded"] == 1
    assert "alloc_reserve" in done["gpu_events"] or "to_device" in done["gpu_events"]  # the layout ran
    lines = paths.observations_path(tree).read_text().splitlines()
    observed = [json.loads(line) for line in lines]
    assert len(observed) == 2 and all(o["source"] == "hook" and o["layout"] for o in observed)
    free = observed[0]["free_mb"]
    assert free == 8192 - 300 - 1  # the simulated card, less what the tiny model holds (rounded down)
    again = json.loads(cli("plan", "--json", *plan_args(tree, facts_file, "--layout", "on")).out)
    assert again["reserve"]["source"] == "observations"
    assert again["reserve"]["free_dedicated_mb"] == free
    assert again["reserve"]["mb"] > 0 and again["reserve"]["mb"] % 64 == 0


def test_no_hook_reaches_the_ui_and_the_hook_stays_quiet(
        tree: Path, facts_file: Path, tmp_path: Path, offline: Path) -> None:
    record = tmp_path / "record.jsonl"
    proc = lowvram("launch", "--no-hook", *plan_args(tree, facts_file), env=fake_env(record, gpu="8192,300"))
    assert proc.returncode == 0, proc.stderr
    assert events(record, "start")[0]["env"]["LOWVRAM_HOOK"] == "off"
    assert events(record, "done")[0]["hook_errors"] == []
    assert not paths.observations_path(tree).exists()
    # --no-hook is this run's: the block keeps the hook's config for the user's own webui.sh.
    assert f'export LOWVRAM_CONFIG="{paths.hook_config_path(tree)}"' in (tree / "webui-user.sh").read_text()
    assert json.loads(paths.hook_config_path(tree).read_text())["enabled"] is True


def test_broken_hook_config_leaves_the_ui_running(tree: Path, facts_file: Path, tmp_path: Path,
                                                  offline: Path) -> None:
    """apply writes the config; a garbled one at start-up must cost the UI nothing."""
    from lowvram.core.plan import Overrides
    from lowvram.world import plan_inputs
    from lowvram.world.apply import apply_plan

    ctx = plan_inputs.make_plan(webui=tree, facts_file=facts_file, overrides=Overrides(profile="gtx1070-sdxl"))
    apply_plan(ctx.plan, tree, ctx.facts)
    paths.hook_config_path(tree).write_text('{"schema": 1, "layout": "yes", "reserve_mb": -')
    spec = launch.build_launch(ctx.plan, ctx.facts, tree)
    record = tmp_path / "record.jsonl"
    spec = type(spec)(**{**spec.__dict__, "env_changes": {**spec.env_changes, **fake_env(record, gpu="8192,300")}})
    assert launch.run_launch(spec, None, stdout=subprocess.DEVNULL) == 0
    assert [e["n"] for e in events(record, "generation")] == [0, 1]
    assert events(record, "done")[0]["hook_errors"] == []


def test_exit_code_and_json_report(tree: Path, facts_file: Path, tmp_path: Path, offline: Path) -> None:
    record = tmp_path / "record.jsonl"
    proc = lowvram("launch", "--json", *plan_args(tree, facts_file), env=fake_env(record, light="1", exit="3"))
    assert proc.returncode == 3
    data = json.loads(proc.stdout)  # the UI's own output went to stderr
    assert data["schema"] == 1 and data["exit_code"] == 3
    assert data["launch"]["argv"][:2] == ["bash", "webui.sh"]
    assert "Launching Web UI" in proc.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_the_uis_exit_code_2_is_told_apart_from_lowvrams_usage_error(tree: Path, facts_file: Path, tmp_path: Path,
                                                                      offline: Path, as_json: bool) -> None:
    """issue 19: lowvram passes the UI's code on, and 2 is also lowvram's own usage-error code."""
    record = tmp_path / "record.jsonl"
    proc = lowvram("launch", *(["--json"] if as_json else []), *plan_args(tree, facts_file),
                   env=fake_env(record, light="1", exit="2"))
    assert proc.returncode == 2
    assert proc.stderr.rstrip("\n").splitlines()[-1] == (
        "lowvram: the UI exited with code 2 (its own command-line error, see its output above); lowvram's own "
        "usage errors say \"error:\" or \"Error:\" and exit before starting it")


def test_a_comfyui_exit_code_2_is_told_apart_too(cli: Any, tmp_path: Path, facts_file: Path) -> None:
    comfy = make_webui(tmp_path / "ComfyUI", flavor="comfyui")
    python = comfy / "venv" / "bin" / "python"  # what argparse does on a flag it refuses
    python.write_text("#!/bin/sh\necho 'main.py: error: argument --cpu: not allowed with argument --lowvram' >&2\n"
                      "exit 2\n")
    proc = lowvram("launch", "--webui", str(comfy), "--facts", str(facts_file), "--model", "sdxl")
    assert proc.returncode == 2
    lines = proc.stderr.rstrip("\n").splitlines()
    assert "not allowed with argument" in proc.stderr
    assert lines[-1].startswith("lowvram: the UI exited with code 2 (its own command-line error")


def test_explicit_profile_is_remembered_but_not_with_facts(tree: Path, facts_file: Path, tmp_path: Path,
                                                           offline: Path) -> None:
    record = tmp_path / "record.jsonl"
    assert lowvram("launch", *plan_args(tree, facts_file), env=fake_env(record, light="1")).returncode == 0
    assert state.remembered_profile(tree) is None
    proc = lowvram("launch", "--profile", "gtx1070-sdxl", "--webui", str(tree), env=fake_env(record, light="1"))
    assert proc.returncode == 0, proc.stderr
    assert state.remembered_profile(tree) == "gtx1070-sdxl"


def test_second_launch_is_refused_while_one_runs(tree: Path, facts_file: Path, tmp_path: Path,
                                                 offline: Path) -> None:
    record = tmp_path / "record.jsonl"
    env = {**os.environ, **fake_env(record, light="1", wait="60"), "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "lowvram", "launch", *plan_args(tree, facts_file)], env=env,
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not events(record, "ready"):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        user_file = (tree / "webui-user.sh").read_bytes()
        second = lowvram("launch", *plan_args(tree, facts_file), env=fake_env(record, light="1"))
        assert second.returncode == 1
        assert "another lowvram process is using the WebUI" in second.stderr
        assert "until the UI exits" in second.stderr
        assert (tree / "webui-user.sh").read_bytes() == user_file
        assert len(events(record, "start")) == 1
        first.send_signal(signal.SIGINT)  # Ctrl-C reaches the UI through lowvram
        assert first.wait(timeout=TIMEOUT) == 128 + signal.SIGINT
    finally:
        if first.poll() is None:
            first.kill()
    assert [e["signal"] for e in events(record, "signal")] == [signal.SIGINT]
