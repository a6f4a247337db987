"""`lowvram tune` end to end against the fake API UI, started for real through its webui.sh.

The fake (tests/fixtures/api_ui.py) sleeps per step by a curve of the reserve it reads from the hook
config: a V with its minimum at `optimum_mb` on the resident road, a flat and slower swap road. Like
the hook, it records one observation per job with the exact s/it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lowvram import paths
from lowvram.fsutil import FileLock
from lowvram.observations import load_observations
from tests.fixtures.api_ui import ApiUi, make_api_webui, write_gtx1070_windows_facts

REPO = Path(__file__).resolve().parents[2]
OPTIMUM = 1216


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiUi]:
    # Extensions come from an empty local mirror: they fail at once, offline, and tune goes on.
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    ui = make_api_webui(tmp_path / "stable-diffusion-webui", optimum_mb=OPTIMUM)
    yield ui
    ui.kill_all()


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    return write_gtx1070_windows_facts(tmp_path / "gtx1070-windows.json")


def _add_manual(cli: Any, ui: ApiUi, facts: Path) -> None:
    res = cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000", "--webui", str(ui.root),
              "--facts", str(facts))
    assert res.code == 0, res.err


def _tune(cli: Any, ui: ApiUi, facts: Path, *extra: str) -> Any:
    return cli("tune", "--webui", str(ui.root), "--facts", str(facts), "--json", *extra)


def _tuning_obs(ui: ApiUi) -> list[Any]:
    return [o for o in load_observations(paths.observations_path(ui.root)).items if o.source == "tuning"]


def test_finds_the_optimum_and_the_faster_road_then_reserve_reports_it(cli: Any, tree: ApiUi, facts: Path) -> None:
    """The issue's check: GTX 1070 on Windows with sysmem fallback, a manual 600/1000 reading."""
    _add_manual(cli, tree, facts)
    user_sh = (tree.root / "webui-user.sh").read_bytes()

    res = _tune(cli, tree, facts)
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert list(data)[:7] == ["schema", "best", "start", "gain_pct", "probes", "closed", "reason"]
    best = data["best"]
    assert best["road"] == "resident"
    assert abs(best["reserve_mb"] - OPTIMUM) <= 64
    assert data["closed"] is True
    # Bounded: the swap road once, at most 12 reserves on the resident road.
    roads = [p["road"] for p in data["probes"]]
    assert roads.count("swap") == 1 and 3 <= roads.count("resident") <= 12
    # The profile's start (the swap road, DESIGN §5: the profile's road first) is slower.
    assert data["start"]["road"] == "swap" and data["gain_pct"] > 0
    assert all(p["ok"] for p in data["probes"])

    # Every probe: one warm-up and two measured requests, same prompt, seed, size and steps.
    reqs = tree.requests()
    assert len(reqs) == 3 * len(data["probes"])
    assert {(r["prompt"], r["seed"], r["width"], r["height"], r["steps"], r["batch_size"]) for r in reqs} == {
        (reqs[0]["prompt"], reqs[0]["seed"], 1024, 1024, 4, 1)}
    # The UI ran API-only on loopback, started through webui.sh, once per road.
    starts = tree.starts()
    assert [s["road"] for s in starts] == ["swap", "resident"]
    for s in starts:
        assert "--nowebui" in s["argv"] and "--api" in s["argv"]
        assert "--port" in s["argv"]

    # Nothing left running; the plan's block is back (swap road flags), the user's lines untouched.
    assert tree.alive() == []
    text = (tree.root / "webui-user.sh").read_text()
    assert text.startswith(user_sh.decode())
    assert "--medvram-sdxl" in text
    hook = json.loads(paths.hook_config_path(tree.root).read_text())
    assert hook["road"] == "swap" and hook["layout"] is False and hook["tag"] is None

    # Every probe kept as an observation (source tuning), and `reserve` now reports the winner.
    assert len(_tuning_obs(tree)) == len(data["probes"])
    res = cli("reserve", "--webui", str(tree.root), "--facts", str(facts), "--json")
    assert res.code == 0, res.err
    reserve = json.loads(res.out)
    assert reserve["source"] == "tuning"
    assert abs(reserve["reserve_mb"] - OPTIMUM) <= 128
    assert reserve["reserve_mb"] == best["reserve_mb"]


def test_the_next_plan_takes_the_resident_road_with_the_tuned_reserve(cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    assert _tune(cli, tree, facts).code == 0
    res = cli("plan", "--webui", str(tree.root), "--facts", str(facts), "--json")
    assert res.code == 0, res.err
    plan = json.loads(res.out)
    assert plan["road"] == "resident"
    assert plan["reserve"]["source"] == "tuning"
    assert abs(plan["reserve"]["mb"] - OPTIMUM) <= 64


def test_a_failing_probe_is_recorded_and_the_search_goes_on(cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    tree.set_spec(fail_reserves=[1600])  # the formula's value (600 + 1000) answers out of memory
    res = _tune(cli, tree, facts, "--roads", "resident")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    failed = [p for p in data["probes"] if not p["ok"]]
    assert [(p["reserve_mb"], p["reason"], p["sit"]) for p in failed] == [(1600, "out of memory (HTTP 500)", None)]
    assert len(data["probes"]) > 2  # it went on after the failure
    assert abs(data["best"]["reserve_mb"] - OPTIMUM) <= 64
    saved = {o.reserve_mb: o for o in _tuning_obs(tree)}
    assert saved[1600].ok is False and saved[1600].reason == "out of memory (HTTP 500)"
    assert tree.alive() == []


def test_a_probe_that_hangs_times_out_and_the_ui_is_restarted(cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    tree.set_spec(fail_reserves=[1600], fail_kind="hang")
    res = _tune(cli, tree, facts, "--roads", "resident", "--request-timeout", "1", "--stop-timeout", "2")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    hung = [p for p in data["probes"] if p["reserve_mb"] == 1600]
    assert hung and not hung[0]["ok"] and "no answer within" in hung[0]["reason"]
    assert len(tree.starts()) == 2  # a wedged job holds A1111's queue: restarted once
    assert abs(data["best"]["reserve_mb"] - OPTIMUM) <= 64
    assert tree.alive() == []


def test_the_ui_dying_mid_run_fails_that_probe_and_restarts_it(cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    tree.set_spec(die_after=4)  # the second probe's first measured request kills the UI
    res = _tune(cli, tree, facts, "--roads", "resident")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert not data["probes"][1]["ok"]
    assert data["probes"][1]["reason"] == "the UI exited with code 3"
    assert len(tree.starts()) == 2
    assert abs(data["best"]["reserve_mb"] - OPTIMUM) <= 64
    assert tree.alive() == []


def test_a_ui_that_never_answers_is_one_clear_error_and_nothing_is_left(cli: Any, tree: ApiUi, facts: Path) -> None:
    tree.set_spec(never_answer=True, ignore_sigterm=True)
    user_sh = (tree.root / "webui-user.sh").read_bytes()
    t0 = time.monotonic()
    res = _tune(cli, tree, facts, "--ready-timeout", "2", "--stop-timeout", "1")
    assert time.monotonic() - t0 < 30
    assert res.code == 1
    err = json.loads(res.out)["error"]
    assert "did not answer" in err["message"] and "tune-ui.log" in err["hint"]
    assert "Traceback" not in res.err
    assert tree.starts(), "the fake UI was started"
    assert tree.alive() == []
    # The plan's block is what remains (the road's flags are gone again).
    text = (tree.root / "webui-user.sh").read_text()
    assert text.startswith(user_sh.decode()) and "--medvram-sdxl" in text


def test_only_the_swap_road_where_memory_cannot_spill(cli: Any, tree: ApiUi, tmp_path: Path) -> None:
    linux = json.loads(write_gtx1070_windows_facts(tmp_path / "f.json").read_text())
    linux["system"].update({"os": "linux", "sysmem_fallback": "unsupported", "glibc": "2.36"})
    facts = tmp_path / "linux.json"
    facts.write_text(json.dumps(linux))
    res = _tune(cli, tree, facts)
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert [p["road"] for p in data["probes"]] == ["swap"]
    assert data["best"]["road"] == "swap" and data["roads"] == ["swap"]
    res = _tune(cli, tree, facts, "--roads", "resident")
    assert res.code == 1
    assert "only the swap road" in json.loads(res.out)["error"]["message"]


def test_every_probe_failing_is_exit_1_with_one_json_document(cli: Any, tree: ApiUi, tmp_path: Path) -> None:
    linux = json.loads(write_gtx1070_windows_facts(tmp_path / "f.json").read_text())
    linux["system"].update({"os": "linux", "sysmem_fallback": "unsupported", "glibc": "2.36"})
    facts = tmp_path / "linux.json"
    facts.write_text(json.dumps(linux))
    tree.set_spec(fail_swap=True)  # the only road's only probe answers HTTP 500
    res = _tune(cli, tree, facts)
    assert res.code == 1
    data = json.loads(res.out)  # one document: the probes and the error together
    assert data["schema"] == 1 and data["best"] is None
    assert [(p["road"], p["ok"]) for p in data["probes"]] == [("swap", False)]
    assert "every probe failed" in data["error"]["message"] and data["error"]["hint"]
    assert "every probe failed" in res.err and "Traceback" not in res.err
    assert tree.alive() == []


def test_a_port_in_the_users_commandline_args_is_where_tune_talks(tmp_path: Path, cli: Any, facts: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 reads COMMANDLINE_ARGS after its command line: the user's --port beats tune's."""
    from lowvram.tune import free_port
    from tests.fixtures.webui_trees import STOCK_WEBUI_USER_SH

    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    port = free_port()
    ui = make_api_webui(tmp_path / "webui", optimum_mb=OPTIMUM,
                        webui_user_sh=STOCK_WEBUI_USER_SH + f'export COMMANDLINE_ARGS="--port {port}"\n')
    try:
        res = _tune(cli, ui, facts, "--roads", "swap", "--ready-timeout", "20")
        assert res.code == 0, res.err
        assert json.loads(res.out)["best"]["road"] == "swap"
        assert {s["port"] for s in ui.starts()} == {port}
        assert f"--port {port}" in res.err  # said why
        assert ui.alive() == []
        # That port taken (say, by the user's own UI): refused before anything starts.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            busy.bind(("127.0.0.1", port))
            busy.listen(1)
            res = _tune(cli, ui, facts, "--roads", "swap", "--ready-timeout", "20")
        assert res.code == 1
        assert f"port {port}" in json.loads(res.out)["error"]["message"]
        assert len(ui.starts()) == 1
    finally:
        ui.kill_all()


def test_a_held_lock_refuses_tune(cli: Any, tree: ApiUi, facts: Path) -> None:
    lock = FileLock(paths.lock_path(tree.root), what="the WebUI")
    lock.acquire()
    try:
        res = _tune(cli, tree, facts)
    finally:
        lock.release()
    assert res.code == 1
    assert "another lowvram process" in json.loads(res.out)["error"]["message"]
    assert tree.starts() == []


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    return env


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_mid_search_stops_the_ui_restores_and_keeps_probes(
        cli: Any, tree: ApiUi, tmp_path: Path, sig: signal.Signals) -> None:
    # A GTX 1070 under WSL2 (it spills too), so `apply` writes this machine's webui-user.sh.
    wsl = json.loads(write_gtx1070_windows_facts(tmp_path / "w.json").read_text())
    wsl["system"].update({"os": "linux", "wsl": True, "sysmem_fallback": "on", "glibc": "2.35"})
    facts = tmp_path / "wsl.json"
    facts.write_text(json.dumps(wsl))
    _add_manual(cli, tree, facts)
    # An applied plan first, so there is a hook config to restore byte for byte.
    # (exit 1: the extensions cannot be fetched offline; the block and the hook config are written)
    assert cli("apply", "--webui", str(tree.root), "--facts", str(facts)).code in (0, 1)
    hook_path = paths.hook_config_path(tree.root)
    hook_before = hook_path.read_bytes()
    user_sh_before = (tree.root / "webui-user.sh").read_bytes()
    tree.set_spec(best_sit=0.05, swap_sit=0.06)  # slow enough to be caught mid-search

    proc = subprocess.Popen([sys.executable, "-m", "lowvram", "tune", "--webui", str(tree.root), "--facts",
                             str(facts), "--roads", "resident", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path)
    try:
        _wait_for(lambda: len(tree.requests()) >= 4, 60, "the second probe")
        # While it runs, a second tune and a launch on the same WebUI are refused by the lock.
        second = cli("tune", "--webui", str(tree.root), "--facts", str(facts), "--json")
        assert second.code == 1 and "another lowvram process" in json.loads(second.out)["error"]["message"]
        launch = cli("launch", "--webui", str(tree.root), "--facts", str(facts))
        assert launch.code == 1 and "another lowvram process" in launch.err
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err.decode()
    error = json.loads(out)["error"]
    assert "interrupted" in error["message"] and "restored" in error["message"]
    assert "Traceback" not in err.decode()
    assert tree.alive() == []
    assert hook_path.read_bytes() == hook_before
    assert (tree.root / "webui-user.sh").read_bytes() == user_sh_before
    kept = _tuning_obs(tree)
    assert kept and all(o.tag == "tune" for o in kept)
    # The lock is free again.
    lock = FileLock(paths.lock_path(tree.root))
    lock.acquire()
    lock.release()


def test_without_the_hook_s_it_comes_from_wall_time(cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    tree.set_spec(observe=False)  # no hook records: the median wall time over the steps decides
    res = _tune(cli, tree, facts, "--roads", "resident", "--steps", "10")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert {p["sit_source"] for p in data["probes"]} == {"wall"}
    assert all(len(p["walls"]) == 2 for p in data["probes"])
    assert abs(data["best"]["reserve_mb"] - OPTIMUM) <= 128
    best = next(p for p in data["probes"] if p["reserve_mb"] == data["best"]["reserve_mb"])
    assert best["sit"] == pytest.approx(0.010, rel=0.5)


def test_max_minutes_ends_an_open_search(cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    tree.set_spec(best_sit=0.08)  # about a second per probe
    t0 = time.monotonic()
    res = _tune(cli, tree, facts, "--roads", "resident", "--max-minutes", "0.05")
    assert time.monotonic() - t0 < 30
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["closed"] is False and "out of time" in data["reason"]
    assert 1 <= len(data["probes"]) < 6
    assert tree.alive() == []


def test_no_webui_or_not_a1111_is_one_clear_error(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   facts: Path) -> None:
    from tests.fixtures.webui_trees import make_webui

    monkeypatch.chdir(tmp_path)
    res = cli("tune", "--json")
    assert res.code == 1
    assert "no WebUI found" in json.loads(res.out)["error"]["message"]
    comfy = make_webui(tmp_path / "ComfyUI", flavor="comfyui")
    res = cli("tune", "--webui", str(comfy), "--facts", str(facts), "--json")
    assert res.code == 1
    assert "A1111" in json.loads(res.out)["error"]["message"]
    assert "Traceback" not in res.err
