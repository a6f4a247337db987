"""`lowvram tune` on ComfyUI (issue 19 item 3), against a fake ComfyUI (tests/fixtures/comfy_api.py) that
tune starts per candidate, drives through /prompt and /history, and stops by its process group; and the
plan's --reserve-vram, which now comes only from evidence."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import paths
from lowvram.world.observation_log import load_observations
from tests.fixtures.api_ui import pid_alive
from tests.fixtures.comfy_api import make_fake_comfy
from tests.fixtures.faults import write_gtx1070_facts
from tests.fixtures.webui_trees import make_webui

# 0.2 GiB runs out of memory; 1.2 GiB is fastest; no flag (ComfyUI's own 0.4 GiB) is slowest.
SWEEP = {"default": 0.30, "204": 0.05, "819": 0.22, "1228": 0.10, "1638": 0.20}


def _tree_state(root: Path) -> dict[str, str]:
    """Every path in the tree but the venv, with a digest of each file: what the user would find."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "venv" or rel.startswith("venv/"):
            continue
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def _setup(tmp_path: Path, **config: Any) -> tuple[Path, Path, Path]:
    log = tmp_path / "starts.jsonl"
    root = make_fake_comfy(tmp_path / "ComfyUI", {"log": str(log), **config}, tmp_path / "fake.json")
    facts = write_gtx1070_facts(tmp_path / "gtx1070.json")
    return root, facts, log


def _lowvram(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowvram", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=timeout)


def _starts(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _plan(root: Path, facts: Path) -> dict[str, Any]:
    done = _lowvram("plan", "--webui", str(root), "--facts", str(facts), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _decision(plan: dict[str, Any], setting: str) -> dict[str, Any]:
    return next(d for d in plan["decisions"] if d["setting"] == setting)


def test_the_plan_writes_no_reserve_vram_without_evidence(tmp_path: Path) -> None:
    # ComfyUI budgets from the memory it measures free and keeps its own 0.4 GB: --reserve-vram with what
    # other programs hold would count them twice (the plan used to write --reserve-vram 0.3 here).
    root, facts, _log = _setup(tmp_path)
    plan = _plan(root, facts)
    assert "--reserve-vram" not in plan["args"], plan["args"]
    reserve = _decision(plan, "reserve_vram")
    assert reserve["value"] is None and reserve["source"] == "auto"
    assert "measures free" in reserve["reason"] and "400 MiB" in reserve["reason"]


def test_tune_sweeps_reserve_vram_and_the_next_plan_uses_the_fastest(tmp_path: Path) -> None:
    root, facts, log = _setup(tmp_path, seconds=SWEEP, oom_below_mb=300)
    before = _tree_state(root)
    done = _lowvram("tune", "--webui", str(root), "--facts", str(facts), "--width", "64", "--height", "64",
                    "--steps", "2", "--repeats", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    got = {p["reserve_vram_mb"]: p for p in result["probes"]}
    assert set(got) == {None, 204, 819, 1228, 1638}
    assert not got[204]["ok"] and "out of memory" in got[204]["reason"]  # the failed candidate, with why
    assert result["best"]["reserve_vram_mb"] == 1228 and result["best"]["load_mode"] == "default"
    # One ComfyUI per candidate, on loopback, its images and temp and user folders outside the tree.
    starts = _starts(log)
    assert len(starts) == 5
    for start in starts:
        argv = start["argv"]
        assert argv[argv.index("--listen") + 1] == "127.0.0.1"
        for flag in ("--output-directory", "--temp-directory", "--user-directory"):
            assert not Path(argv[argv.index(flag) + 1]).is_relative_to(root)
            assert not Path(argv[argv.index(flag) + 1]).exists()  # removed afterwards
        assert not pid_alive(start["pid"])
    assert [s["argv"][s["argv"].index("--reserve-vram") + 1] if "--reserve-vram" in s["argv"] else None
            for s in starts] == [None, "0.2", "0.8", "1.2", "1.6"]
    assert _tree_state(root) == before
    # Kept as observations, and the next plan takes the same winner.
    tuned = [o for o in load_observations(paths.observations_path(root)).items if o.source == "tuning"]
    assert sorted((o.reserve_vram_mb or 0, o.ok) for o in tuned) == [
        (0, True), (204, False), (819, True), (1228, True), (1638, True)]
    plan = _plan(root, facts)
    i = plan["args"].index("--reserve-vram")
    assert plan["args"][i + 1] == "1.2"
    assert _decision(plan, "reserve_vram")["source"] == "tuning"
    # One load mode measured (the model far from the card's size): the mode was not tuned, the plan's stays.
    offload = _decision(plan, "offload")
    assert offload["source"] != "tuning" and not {"--lowvram", "--normalvram"} & set(plan["args"]), offload


def test_tune_on_comfyui_says_what_it_measured(tmp_path: Path) -> None:
    root, facts, _log = _setup(tmp_path, seconds={"default": 0.05})
    done = _lowvram("tune", "--webui", str(root), "--facts", str(facts), "--width", "64", "--height", "64",
                    "--steps", "2", "--repeats", "1")
    assert done.returncode == 0, done.stderr
    assert "best: ComfyUI with default reserve" in done.stdout
    assert "per ComfyUI candidate" in done.stdout  # the chart
    assert "tune changed nothing in the ComfyUI tree" in done.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_comfyuis_group_and_puts_the_tree_back(tmp_path: Path, sig: int) -> None:
    # A workflow that takes long, and a ComfyUI that ignores SIGTERM: tune must SIGKILL its group.
    root, facts, log = _setup(tmp_path, seconds={"default": 30.0}, ignore_term=True)
    before = _tree_state(root)
    proc = subprocess.Popen([sys.executable, "-m", "lowvram", "tune", "--webui", str(root), "--facts", str(facts),
                             "--width", "64", "--height", "64", "--steps", "2", "--stop-timeout", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _starts(log) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _starts(log), "tune never started ComfyUI"
    time.sleep(1.0)  # its API up, the warm-up workflow running
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "user/, temp/, output/ and input/" in err
    assert "Traceback" not in err
    for start in _starts(log):
        assert not pid_alive(start["pid"])
    assert _tree_state(root) == before


def test_flags_after_dashdash_reach_comfyui_and_a1111_refuses_them(tmp_path: Path) -> None:
    root, facts, log = _setup(tmp_path, seconds={"default": 0.02})
    done = _lowvram("tune", "--webui", str(root), "--facts", str(facts), "--width", "64", "--height", "64",
                    "--steps", "1", "--repeats", "1", "--max-minutes", "0.05", "--", "--preview-method", "none")
    assert done.returncode == 0, done.stderr
    assert all("--preview-method" in s["argv"] for s in _starts(log))
    a1111 = make_webui(tmp_path / "stable-diffusion-webui")
    refused = _lowvram("tune", "--webui", str(a1111), "--facts", str(facts), "--", "--medvram")
    assert refused.returncode == 2 and "after `--`" in refused.stderr, refused.stderr
