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

from lowvram.world import paths
from lowvram.world.fsutil import FileLock
from lowvram.world.observation_log import load_observations
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


def _files(root: Path) -> dict[str, bytes] | None:
    """Every file under `root` with its bytes (Python's caches left out), None when there is no `root`."""
    if not root.is_dir():
        return None
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _read(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def lowvram_state(ui: ApiUi) -> dict[str, Any]:
    """What tune must leave as it found it: the webui-user files, the hook config, the manifest and
    its backups, the extensions (the hook's copy included) and the UI's settings."""
    root = ui.root
    return {
        **{name: _read(root / name) for name in ("webui-user.sh", "webui-user.bat", "webui.settings.bat",
                                                 "config.json")},
        "hook.json": _read(paths.hook_config_path(root)),
        "manifest.json": _read(paths.manifest_path(root)),
        "backups": _files(paths.backups_dir(root)),
        "extensions": _files(root / "extensions"),
    }


def _wsl_facts(tmp_path: Path, *, gpu: bool = True) -> Path:
    """A GTX 1070 under WSL2 (it spills too), so `apply` writes this machine's webui-user.sh;
    without `gpu` the same machine with no usable GPU (a CPU plan)."""
    wsl = json.loads(write_gtx1070_windows_facts(tmp_path / "w.json").read_text())
    wsl["system"].update({"os": "linux", "wsl": True, "sysmem_fallback": "on", "glibc": "2.35"})
    if not gpu:
        wsl["gpus"] = []
    facts = tmp_path / ("wsl.json" if gpu else "wsl-cpu.json")
    facts.write_text(json.dumps(wsl))
    return facts


def _assert_loopback_only(ui: ApiUi) -> None:
    binds = ui.binds()
    assert binds, "the stand-in UI listened"
    assert [b["bound"] for b in binds] == [["127.0.0.1"]] * len(binds), binds
    assert all(b["ngrok"] is None for b in binds)


def test_finds_the_optimum_and_the_faster_road_then_reserve_reports_it(cli: Any, tree: ApiUi, facts: Path) -> None:
    """The issue's check: GTX 1070 on Windows with sysmem fallback, a manual 600/1000 reading."""
    _add_manual(cli, tree, facts)
    before = lowvram_state(tree)

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
    # The profile's start (the swap road, docs/architecture.md#the-policy: the profile's road first) is slower.
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
    _assert_loopback_only(tree)

    # Nothing left running; the tree and lowvram's state are as they were before tune.
    assert tree.alive() == []
    assert lowvram_state(tree) == before

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
    before = lowvram_state(tree)
    t0 = time.monotonic()
    res = _tune(cli, tree, facts, "--ready-timeout", "2", "--stop-timeout", "1")
    assert time.monotonic() - t0 < 30
    assert res.code == 1
    err = json.loads(res.out)["error"]
    assert "did not answer" in err["message"] and "tune-ui.log" in err["hint"]
    assert "Traceback" not in res.err
    assert tree.starts(), "the fake UI was started"
    assert tree.alive() == []
    assert lowvram_state(tree) == before  # the road's block and the hook taken out again


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
    from lowvram.world.tune.loopback import free_port
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
    facts = _wsl_facts(tmp_path)
    _add_manual(cli, tree, facts)
    # The user's own applied plan first (a rung tune does not measure), so there is a block, a hook
    # config and a manifest to put back byte for byte.
    # (exit 1: the extensions cannot be fetched offline; the block and the hook config are written)
    assert cli("apply", "--webui", str(tree.root), "--facts", str(facts), "--offload", "lowvram").code in (0, 1)
    assert "--lowvram" in (tree.root / "webui-user.sh").read_text()
    before = lowvram_state(tree)
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
    assert lowvram_state(tree) == before
    kept = _tuning_obs(tree)
    assert kept and all(o.tag == "tune" for o in kept)
    # The lock is free again.
    lock = FileLock(paths.lock_path(tree.root))
    lock.acquire()
    lock.release()


def test_without_the_hook_s_it_comes_from_wall_time_and_the_resident_road_is_not_credited(
        cli: Any, tree: ApiUi, facts: Path) -> None:
    _add_manual(cli, tree, facts)
    tree.set_spec(observe=False)  # no hook records: the median wall time over the steps decides
    res = _tune(cli, tree, facts, "--steps", "10")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    swap, resident = data["probes"]
    # The swap road needs no hook: wall time ÷ steps.
    assert swap["ok"] and swap["sit_source"] == "wall" and len(swap["walls"]) == 2
    assert swap["sit"] == pytest.approx(0.014, rel=0.5)
    # The resident road without a hook record: the layout cannot have run, so reserve 0 is a
    # failed probe and the road was not measured (no resident "best" from a UI without the layout).
    assert not resident["ok"] and resident["sit"] is None and resident["reserve_mb"] == 0
    assert "the layout did not run" in resident["reason"] and "lowvram-layout" in resident["reason"]
    assert data["best"]["road"] == "swap"
    assert data["closed"] is False and "resident road not measured" in data["reason"]


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
    sdnext = make_webui(tmp_path / "automatic", flavor="sdnext")  # ComfyUI is tuned since issue 19
    res = cli("tune", "--webui", str(sdnext), "--facts", str(facts), "--json")
    assert res.code == 1
    assert "A1111" in json.loads(res.out)["error"]["message"]
    assert "Traceback" not in res.err


# ---------------------------------------------------------------------------------------------
# Issue 13 §3: loopback only, the tree put back as it was, a probe counts for what the hook did


def test_tunes_ui_listens_on_loopback_only_whatever_the_users_flags(tmp_path: Path, cli: Any, facts: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 1.8 with --nowebui and no --server-name binds 0.0.0.0 and [::]; --listen and a
    --server-name in the user's COMMANDLINE_ARGS (read after tune's command line) must not widen it."""
    from tests.fixtures.webui_trees import STOCK_WEBUI_USER_SH

    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    ui = make_api_webui(tmp_path / "webui", optimum_mb=OPTIMUM, webui_user_sh=STOCK_WEBUI_USER_SH
                        + 'export COMMANDLINE_ARGS="--listen --server-name 0.0.0.0 --share"\n')
    before = lowvram_state(ui)
    try:
        res = _tune(cli, ui, facts, "--roads", "swap")
        assert res.code == 0, res.err
        _assert_loopback_only(ui)
        assert [b["host"] for b in ui.binds()] == ["127.0.0.1"]
        # Said what it overrode, and left the user's line alone.
        assert "--listen" in res.err and "--server-name 0.0.0.0" in res.err and "127.0.0.1 only" in res.err
        assert lowvram_state(ui) == before
        assert ui.alive() == []
    finally:
        ui.kill_all()


def test_ngrok_in_the_users_flags_is_refused_before_anything_starts(tmp_path: Path, cli: Any, facts: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111 1.8 connects --ngrok's tunnel when modules.ui is imported, API-only too: no later flag undoes it."""
    from tests.fixtures.webui_trees import STOCK_WEBUI_USER_SH

    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    ui = make_api_webui(tmp_path / "webui", optimum_mb=OPTIMUM,
                        webui_user_sh=STOCK_WEBUI_USER_SH + 'export COMMANDLINE_ARGS="--ngrok 2abc"\n')
    before = lowvram_state(ui)
    try:
        res = _tune(cli, ui, facts, "--roads", "swap")
        assert res.code == 1
        error = json.loads(res.out)["error"]
        assert "--ngrok" in error["message"] and "--ngrok" in error["hint"]
        assert ui.starts() == []
        assert lowvram_state(ui) == before
    finally:
        ui.kill_all()


def test_a_user_line_after_the_block_that_widens_the_ui_is_caught_and_stopped(cli: Any, tree: ApiUi,
                                                                             tmp_path: Path) -> None:
    """A flag tune cannot see coming (a user line below lowvram's block): what the UI really listens
    on is checked once it answers, and a UI beyond loopback is stopped at once."""
    facts = _wsl_facts(tmp_path)
    assert cli("apply", "--webui", str(tree.root), "--facts", str(facts)).code in (0, 1)
    user_sh = tree.root / "webui-user.sh"
    user_sh.write_bytes(user_sh.read_bytes() + b'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --server-name 0.0.0.0"\n')
    before = lowvram_state(tree)
    res = _tune(cli, tree, facts, "--roads", "swap")
    assert res.code == 1
    error = json.loads(res.out)["error"]
    assert "beyond loopback" in error["message"] and "0.0.0.0" in error["message"]
    assert [b["bound"] for b in tree.binds()] == [["0.0.0.0"]]  # the stand-in did bind it...
    assert tree.requests() == []  # ...and tune sent it nothing
    assert tree.alive() == []
    assert lowvram_state(tree) == before


@pytest.mark.parametrize("setup", ["offload", "cpu", "none"])
def test_tune_puts_back_exactly_what_was_there(cli: Any, tree: ApiUi, tmp_path: Path, facts: Path,
                                               setup: str) -> None:
    """webui-user.sh, the hook config, the manifest and its backups, the extensions: byte for byte
    (seen: a user's --offload block lost; a CPU block replaced by GPU flags, so the next start failed)."""
    if setup == "offload":
        assert cli("apply", "--webui", str(tree.root), "--facts", str(_wsl_facts(tmp_path)),
                   "--offload", "lowvram").code in (0, 1)
        assert "--lowvram" in (tree.root / "webui-user.sh").read_text()
    elif setup == "cpu":
        assert cli("apply", "--webui", str(tree.root), "--facts", str(_wsl_facts(tmp_path, gpu=False))).code in (0, 1)
        assert "--use-cpu all" in (tree.root / "webui-user.sh").read_text()
    else:
        assert not paths.manifest_path(tree.root).exists()
    _add_manual(cli, tree, facts)
    before = lowvram_state(tree)

    res = _tune(cli, tree, facts)  # the GTX 1070 stands in: both GPU roads are measured
    assert res.code == 0, res.err
    assert {s["road"] for s in tree.starts()} == {"swap", "resident"}
    assert lowvram_state(tree) == before
    assert tree.alive() == []
    if setup == "none":
        assert not (tree.root / "extensions" / "lowvram-layout").exists()
        assert not paths.manifest_path(tree.root).exists()


@pytest.mark.parametrize("error_field", [True, False], ids=["layout_error", "layout-false-only"])
def test_a_refused_layout_is_a_failed_resident_probe_not_the_best(cli: Any, tree: ApiUi, facts: Path,
                                                                  error_field: bool) -> None:
    """The hook refused the layout (`layout: false`): the jobs ran fast, but not on the resident road."""
    _add_manual(cli, tree, facts)
    tree.set_spec(refuse_layout="no CUDA device: the layout needs one", layout_error_field=error_field,
                  no_layout_sit=0.004)  # faster than the swap road's 0.014: a lie if credited
    res = _tune(cli, tree, facts)
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["best"]["road"] == "swap"
    swap, resident = data["probes"]
    assert swap["ok"] and swap["road"] == "swap"
    assert resident["road"] == "resident" and not resident["ok"] and resident["sit"] is None
    assert resident["reason"].startswith("the layout did not run")
    if error_field:
        assert "no CUDA device" in resident["reason"] and "no CUDA device" in resident["layout_error"]
    assert len(data["probes"]) == 2  # reserve 0 refused: the other reserves would be refused too
    # Not "closed": the result says what failed.
    assert data["closed"] is False
    assert "resident road not measured: the layout did not run" in data["reason"]
    assert "swap road measured" in data["reason"]
    # Kept as a failed resident run: the next plan's search does not count it as a resident speed.
    saved = {o.road: o for o in _tuning_obs(tree)}
    assert saved["resident"].ok is False and saved["resident"].layout is False
    assert saved["resident"].layout_error
    state = json.loads(cli("reserve", "--webui", str(tree.root), "--facts", str(facts), "--json").out)
    best_resident = (state.get("tuning") or {}).get("best_resident")
    assert best_resident is None


def test_the_human_report_says_what_failed(cli: Any, tree: ApiUi, facts: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # the table's rows on one line each
    _add_manual(cli, tree, facts)
    tree.set_spec(refuse_layout="no CUDA device", no_layout_sit=0.004)
    res = cli("tune", "--webui", str(tree.root), "--facts", str(facts))
    assert res.code == 0, res.err
    out = res.out
    assert "failed: the layout did not run: no CUDA device" in out
    assert "best: swap (parts of the model swapped to RAM) at" in out
    assert "search: not closed (" in out and "resident road not measured" in out
    assert "tune changed nothing in the WebUI" in out
    assert "closed (" not in out.replace("not closed (", "")
