"""tune's hold on the UI process: start through webui.sh, wait for the API, stop the whole group.

These run the fake API UI (tests/fixtures/api_ui.py) for real, through its webui.sh, without a plan.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lowvram.world.launch import LaunchSpec
from lowvram.world.tune.loopback import beyond_loopback, free_port, listen_addresses
from lowvram.world.tune.results import TuneError, TuneEvent
from lowvram.world.tune.ui_api import ApiClient, txt2img_payload
from lowvram.world.tune.ui_process import UiProcess, wait_ready
from tests.fixtures.api_ui import ApiUi, make_api_webui


@pytest.fixture
def started() -> Iterator[list[ApiUi]]:
    made: list[ApiUi] = []
    yield made
    for ui in made:
        ui.kill_all()


def _spec(ui: ApiUi, port: int, config: Path, *extra: str) -> LaunchSpec:
    tree = ui.root
    argv = (["bash", "webui.sh"] + (["-f"] if os.geteuid() == 0 else []) + ["--api", "--nowebui", "--port", str(port)]
            + list(extra))
    return LaunchSpec(argv=tuple(argv), cwd=tree,
                      env_changes={"install_dir": str(tree.parent), "clone_dir": tree.name,
                                   "LOWVRAM_CONFIG": str(config)})


def _ui(tmp_path: Path, started: list[ApiUi], *extra: str, **spec: object) -> tuple[ApiUi, UiProcess, ApiClient]:
    ui = make_api_webui(tmp_path / "sd", **spec)  # type: ignore[arg-type]
    started.append(ui)
    config = tmp_path / "hook.json"
    config.write_text(json.dumps({"layout": True, "reserve_mb": 1216, "observations": str(tmp_path / "obs.jsonl")}))
    port = free_port()
    proc = UiProcess(_spec(ui, port, config, *extra), tmp_path / "ui.log", None)
    return ui, proc, ApiClient(port)


def test_start_wait_measure_stop_leaves_nothing(tmp_path: Path, started: list[ApiUi]) -> None:
    ui, proc, client = _ui(tmp_path, started)
    events: list[TuneEvent] = []
    proc.start()
    try:
        wait_ready(proc, client, timeout=30, report=events.append)
        status, _ = client.post("/sdapi/v1/txt2img", txt2img_payload(512, 512, 4), timeout=10)
        assert status == 200
    finally:
        proc.stop(5)
    assert ui.requests()[0]["steps"] == 4 and ui.requests()[0]["reserve_mb"] == 1216
    assert all(e.kind == "waiting" for e in events)
    start = ui.starts()[0]
    assert start["pgid"] == proc.pid  # webui.sh leads the group the UI and its child run in
    assert ui.alive() == []
    assert proc.exit_code() is not None


def test_a_ui_that_ignores_sigterm_is_killed(tmp_path: Path, started: list[ApiUi]) -> None:
    ui, proc, client = _ui(tmp_path, started, ignore_sigterm=True)
    proc.start()
    try:
        wait_ready(proc, client, timeout=30, report=lambda _e: None)
        assert ui.alive()
    finally:
        t0 = time.monotonic()
        proc.stop(0.5)
    assert time.monotonic() - t0 < 10
    assert ui.alive() == []


def test_never_answering_is_one_clear_error_and_bounded(tmp_path: Path, started: list[ApiUi]) -> None:
    ui, proc, client = _ui(tmp_path, started, never_answer=True)
    proc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TuneError) as info:
            wait_ready(proc, client, timeout=1.5, report=lambda _e: None)
    finally:
        proc.stop(5)
    assert time.monotonic() - t0 < 15
    assert "did not answer" in info.value.message and "/sdapi/v1/progress" in info.value.message
    assert str(tmp_path / "ui.log") in info.value.hint
    assert ui.alive() == []


def test_a_ui_that_exits_at_start_says_so(tmp_path: Path, started: list[ApiUi]) -> None:
    ui, proc, client = _ui(tmp_path, started)
    (ui.root / "launch.py").write_text("import sys\nprint('Error: torch is not able to use GPU')\nsys.exit(1)\n")
    proc.start()
    try:
        with pytest.raises(TuneError) as info:
            wait_ready(proc, client, timeout=30, report=lambda _e: None)
    finally:
        proc.stop(5)
    assert "exited" in info.value.message
    assert "torch is not able to use GPU" in info.value.message


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")
@pytest.mark.parametrize(("extra", "expected"), [
    ((), {"0.0.0.0", "::"}),  # A1111 1.8 API-only, no --server-name: uvicorn host None = every interface
    (("--listen",), {"0.0.0.0"}),
    (("--listen", "--server-name", "127.0.0.1"), {"127.0.0.1"}),  # a server name beats --listen
    (("--server-name", "0.0.0.0", "--server-name", "127.0.0.1"), {"127.0.0.1"}),  # the last one wins
])
def test_the_stand_in_binds_what_a1111_binds_and_tune_sees_it(tmp_path: Path, started: list[ApiUi],
                                                              extra: tuple[str, ...], expected: set[str]) -> None:
    ui, proc, client = _ui(tmp_path, started, *extra)
    proc.start()
    try:
        wait_ready(proc, client, timeout=30, report=lambda _e: None)
        bound = set(ui.binds()[0]["bound"])
        seen = set(listen_addresses(int(client.base.rsplit(":", 1)[1])) or [])
    finally:
        proc.stop(5)
    if "::" in expected and "::" not in bound:
        expected = expected - {"::"}  # no IPv6 here: asyncio skips that family (EADDRNOTAVAIL)
    assert bound == expected
    assert seen == bound  # tune's reading of /proc/net/tcp* names what the UI bound
    assert bool(beyond_loopback(sorted(seen))) == (expected != {"127.0.0.1"})
