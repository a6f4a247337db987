"""tune's pieces that need no UI: settings, failure reasons, the loopback client, the JSON, the chart."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lowvram.core.errors import UsageError
from lowvram.core.facts import Facts, SystemFacts
from lowvram.core.observations import Observation
from lowvram.world.tune.loopback import beyond_loopback, exposing_flags, listen_addresses
from lowvram.world.tune.probing import judge_probe, road_outcome
from lowvram.world.tune.results import Probe, TuneError, TuneResult, TuneSettings
from lowvram.world.tune.session import _local_facts, _quietly, _sigterm_as_interrupt
from lowvram.world.tune.snapshot import TreeSnapshot
from lowvram.world.tune.ui_api import ApiClient, failure_reason, txt2img_payload


def test_oom_answer_reads_as_out_of_memory() -> None:
    body = {"error": "OutOfMemoryError", "detail": "", "body": "", "errors": "CUDA out of memory. Tried to allocate"}
    assert failure_reason(500, body) == "out of memory (HTTP 500)"


def test_other_http_errors_keep_the_uis_words() -> None:
    assert failure_reason(500, {"error": "RuntimeError", "errors": "boom"}) == "HTTP 500: RuntimeError boom"
    assert failure_reason(422, "Unprocessable\nmore") == "HTTP 422: Unprocessable"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"roads": "both"}, "--roads"),
        ({"steps": 0}, "--steps"),
        ({"repeats": 0}, "--repeats"),
        ({"width": 1001, "height": 1024}, "--width"),
        ({"width": 1024}, "together"),
        ({"max_minutes": 0}, "--max-minutes"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(UsageError) as info:
        TuneSettings(**kwargs).check()  # type: ignore[arg-type]
    assert words in info.value.message
    assert info.value.hint


def test_payload_is_fixed_and_small() -> None:
    a, b = txt2img_payload(1024, 768, 4), txt2img_payload(1024, 768, 4)
    assert a == b
    assert (a["width"], a["height"], a["steps"], a["batch_size"], a["n_iter"]) == (1024, 768, 4, 1, 1)
    assert a["seed"] >= 0 and not a["send_images"] and not a["save_images"]


def test_client_talks_only_to_loopback() -> None:
    with pytest.raises(TuneError):
        ApiClient(7860, host="192.168.1.10")


class _Echo(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        data = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length))
        data = json.dumps({"error": "OutOfMemoryError", "errors": "CUDA out of memory", "got": body}).encode()
        self.send_response(500)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_client_ignores_proxies_and_reads_error_bodies(echo_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment must never see (or swallow) the loopback requests.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    client = ApiClient(echo_port)
    assert client.get("/sdapi/v1/progress", timeout=5) == (200, {"path": "/sdapi/v1/progress"})
    status, body = client.post("/sdapi/v1/txt2img", {"steps": 4}, timeout=5)
    assert status == 500 and body["got"] == {"steps": 4}
    assert failure_reason(status, body) == "out of memory (HTTP 500)"


def test_client_raises_oserror_when_nothing_listens() -> None:
    from lowvram.world.tune.loopback import free_port

    with pytest.raises(OSError):
        ApiClient(free_port()).get("/sdapi/v1/progress", timeout=2)


def _result(probes: list[Probe], start: Probe | None, best: Probe | None) -> TuneResult:
    return TuneResult(best=best, start=start, probes=tuple(probes), closed=True, reason="done", width=1024,
                      height=1024, steps=4, repeats=2, roads=("resident", "swap"), webui="/w", saved=len(probes))


def test_json_contract_and_gain() -> None:
    swap = Probe("swap", 0, 0.012, True, walls=(0.05, 0.05))
    zero = Probe("resident", 0, 0.03, True, sit_source="hook", free_mb=600, overflow_mb=1000)
    best = Probe("resident", 1216, 0.004, True, sit_source="hook")
    failed = Probe("resident", 1600, None, False, "out of memory (HTTP 500)")
    data = _result([swap, zero, best, failed], start=swap, best=best).to_dict()
    assert list(data)[:7] == ["schema", "best", "start", "gain_pct", "probes", "closed", "reason"]
    assert data["schema"] == 1
    assert data["best"] == {"road": "resident", "reserve_mb": 1216, "sit": 0.004}
    assert data["start"] == {"road": "swap", "reserve_mb": 0, "sit": 0.012}
    assert data["gain_pct"] == pytest.approx(66.7)
    assert data["closed"] is True
    for probe in data["probes"]:
        assert {"road", "reserve_mb", "sit", "ok", "reason"} <= set(probe)
    assert data["probes"][3] == {**data["probes"][3], "ok": False, "sit": None, "reason": "out of memory (HTTP 500)"}
    json.dumps(data)


def test_no_start_or_no_best_means_no_gain() -> None:
    p = Probe("swap", 0, 0.01, True)
    assert _result([p], start=None, best=p).gain_pct is None
    assert _result([], start=None, best=None).to_dict()["best"] is None


def test_chart_marks_the_best_and_scales_bars() -> None:
    from lowvram.cli.cmd_tune import chart

    slow = Probe("resident", 0, 0.03, True)
    best = Probe("resident", 1216, 0.004, True)
    swap = Probe("swap", 0, 0.012, True)
    text = chart(_result([slow, best, swap], start=swap, best=best), width=30)
    lines = text.splitlines()
    row = {ln.split()[0] + ln.split()[1]: ln for ln in lines[1:]}
    assert "◀ best" in row["resident1216"] and "◀ best" not in row["resident0"]
    assert row["resident0"].count("█") == 30
    assert row["resident1216"].count("█") == 4
    assert row["swap-"].count("█") == 12


def test_facts_from_a_windows_box_start_the_local_ui() -> None:
    windows = Facts(system=SystemFacts(os="windows", sysmem_fallback="on"))
    local = _local_facts(windows)
    assert local.system.os in ("linux", "darwin")
    assert local.system.sysmem_fallback == "on"  # the GPU's behaviour is the file's


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
def test_restore_runs_to_its_end_through_another_ctrl_c_or_sigterm() -> None:
    """A second Ctrl-C or SIGTERM while tune puts things back must not stop it half way
    (the UI would be left running, the hook config half restored)."""
    steps: list[str] = []

    def restore() -> list[str]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), sig)
            time.sleep(0.05)  # the handler (if any) runs here, between bytecodes
            steps.append(sig.name)
        return []

    try:
        with _sigterm_as_interrupt():
            assert _quietly(restore) == []
    except KeyboardInterrupt:
        pytest.fail(f"restore was interrupted after {steps}")
    assert steps == ["SIGTERM", "SIGINT"]


# ---------------------------------------------------------------------------------------------
# Issue 13 §3: a probe counts only for what the hook did; loopback only; the tree put back


def _hook(t: float, *, road: str = "resident", layout: bool = True, sit: float | None = 0.01, ok: bool = True,
          layout_error: str | None = None, ooms: int = 0, device: str | None = "cuda") -> Observation:
    return Observation(time=t, source="hook", road=road, layout=layout, reserve_mb=1216 if layout else None,
                       sit=sit, ok=ok, ooms=ooms, layout_error=layout_error, device=device, free_mb=600,
                       overflow_mb=1000, width=1024, height=1024, batch=1, tag="t")


def _judge(road: str, hook: list[Observation], failure: str = "") -> Probe:
    return judge_probe(road, 1216 if road == "resident" else 0, [0.2, 0.2], failure, hook=hook, measured=hook[1:],
                       steps=4)


def test_a_resident_probe_counts_when_the_layout_ran() -> None:
    p = _judge("resident", [_hook(1), _hook(2, sit=0.012), _hook(3, sit=0.010)])
    assert p.ok and p.sit == 0.011 and p.sit_source == "hook" and p.device == "cuda" and not p.layout_error


@pytest.mark.parametrize(("hook", "words"), [
    ([_hook(1, layout=False, sit=0.004), _hook(2, layout=False, sit=0.004)], "did not lay the model out"),
    ([_hook(1, layout=False, layout_error="no CUDA device"), _hook(2, layout=False, layout_error="no CUDA device")],
     "no CUDA device"),
    ([_hook(1), _hook(2, layout_error="failed and rolled back")], "failed and rolled back"),
    ([], "recorded none of these jobs"),
])
def test_a_resident_probe_whose_layout_did_not_run_is_failed_not_measured(hook: list[Observation],
                                                                          words: str) -> None:
    p = _judge("resident", hook)
    assert not p.ok and p.sit is None
    assert p.reason.startswith("the layout did not run: ") and words in p.reason
    assert words in p.layout_error


def test_the_swap_road_needs_no_hook_and_failed_jobs_fail() -> None:
    p = _judge("swap", [])
    assert p.ok and p.sit == pytest.approx(0.05) and p.sit_source == "wall"
    p = _judge("swap", [_hook(1, road="swap", layout=False), _hook(2, road="swap", layout=False, ok=False,
                                                                   sit=None)])
    assert not p.ok and p.reason == "the job failed (the hook's record)"
    p = _judge("swap", [_hook(1, road="swap", layout=False, ooms=1, sit=None, ok=False)] * 2)
    assert not p.ok and "out of memory" in p.reason
    assert _judge("swap", [], failure="HTTP 500: boom").reason == "HTTP 500: boom"


def test_a_road_none_of_whose_probes_worked_was_not_measured() -> None:
    bad = Probe("resident", 0, None, False, "the layout did not run: no CUDA device")
    good = Probe("resident", 1216, 0.01, True)
    assert road_outcome("resident", [bad], True, "resident road: closed after 1 candidates") == (
        False, "resident road not measured: the layout did not run: no CUDA device")
    assert road_outcome("resident", [good, bad], True, "resident road: closed") == (
        True, "resident road: closed (1 of 2 probes failed)")
    assert road_outcome("swap", [Probe("swap", 0, 0.01, True)], True, "swap road measured") == (
        True, "swap road measured")


def test_flags_that_would_widen_tunes_ui() -> None:
    assert exposing_flags(["--xformers", "--port", "7861"]) == ([], [])
    assert exposing_flags(["--listen", "--share", "--server-name", "0.0.0.0"]) == (
        [], ["--listen", "--share", "--server-name 0.0.0.0"])
    assert exposing_flags(["--server-name=192.168.1.5", "--server-name", "127.0.0.1"]) == (
        [], ["--server-name 192.168.1.5"])
    assert exposing_flags(["--ngrok", "2abc", "--ngrok-region", "eu"]) == (["--ngrok"], [])
    assert exposing_flags(["--ngrok=2abc"]) == (["--ngrok"], [])


def test_listen_addresses_read_linux_proc_net(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(header
                                  + "   0: 00000000:1EB5 00000000:0000 0A 0 0 0 0 0 1\n"  # 0.0.0.0:7861 LISTEN
                                  + "   1: 0100007F:1EB5 0100007F:D4E0 01 0 0 0 0 0 2\n"  # established: skipped
                                  + "   2: 0100007F:1EB6 00000000:0000 0A 0 0 0 0 0 3\n")  # another port
    (tmp_path / "tcp6").write_text(header
                                   + "   0: 00000000000000000000000001000000:1EB5 "
                                     "00000000000000000000000000000000:0000 0A 0 0 0 0 0 4\n")  # [::1]:7861
    if sys.byteorder != "little":
        pytest.skip("the rows above are written as a little-endian kernel writes them")
    assert listen_addresses(7861, tmp_path) == ["0.0.0.0", "::1"]
    assert listen_addresses(7862, tmp_path) == ["127.0.0.1"]
    assert listen_addresses(7861, tmp_path / "nowhere") is None
    assert beyond_loopback(["0.0.0.0", "::1", "127.0.0.1", "::ffff:127.0.0.1", "::", "192.168.1.5"]) == [
        "0.0.0.0", "::", "192.168.1.5"]


def test_the_snapshot_puts_back_every_byte_and_takes_away_what_tune_added(tmp_path: Path) -> None:
    from lowvram.world import paths

    webui = tmp_path / "webui"
    (webui / "extensions" / "lowvram-layout" / "scripts").mkdir(parents=True)
    (webui / "extensions" / "lowvram-layout" / "scripts" / "hook.py").write_bytes(b"old hook\r\n")
    sh = webui / "webui-user.sh"
    sh.write_bytes(b"#!/bin/bash\nexport COMMANDLINE_ARGS='--lowvram'")  # no final newline
    sh.chmod(0o750)
    paths.manifest_path(webui).parent.mkdir(parents=True, exist_ok=True)
    paths.manifest_path(webui).write_bytes(b'{"schema": 1}')
    snap = TreeSnapshot.take(webui)

    sh.write_bytes(b"changed")
    sh.chmod(0o644)
    (webui / "webui.settings.bat").write_bytes(b"added")
    (webui / "extensions" / "lowvram-layout" / "scripts" / "hook.py").write_bytes(b"new hook")
    (webui / "extensions" / "lowvram-layout" / "new.py").write_bytes(b"new")
    (webui / "extensions" / "lowvram-layout" / "__pycache__").mkdir()
    paths.hook_config_path(webui).write_bytes(b"{}")
    paths.backups_dir(webui).mkdir(parents=True)
    (paths.backups_dir(webui) / "webui-user.sh.orig").write_bytes(b"x")
    paths.manifest_path(webui).write_bytes(b'{"schema": 1, "files": {}}')

    assert snap.restore() == []
    assert sh.read_bytes() == b"#!/bin/bash\nexport COMMANDLINE_ARGS='--lowvram'" and sh.stat().st_mode & 0o777 == 0o750
    assert not (webui / "webui.settings.bat").exists()
    hook = webui / "extensions" / "lowvram-layout"
    assert sorted(p.relative_to(hook).as_posix() for p in hook.rglob("*")) == ["scripts", "scripts/hook.py"]
    assert (hook / "scripts" / "hook.py").read_bytes() == b"old hook\r\n"
    assert not paths.hook_config_path(webui).exists() and not paths.backups_dir(webui).exists()
    assert paths.manifest_path(webui).read_bytes() == b'{"schema": 1}'
    assert [p.name for p in webui.iterdir() if p.name.startswith(".")] == []  # no temp left behind


def test_the_snapshot_of_a_tree_without_lowvram_removes_the_hook_and_extensions_dir(tmp_path: Path) -> None:
    from lowvram.world import paths

    webui = tmp_path / "webui"
    webui.mkdir()
    snap = TreeSnapshot.take(webui)
    (webui / "extensions" / "lowvram-layout").mkdir(parents=True)
    (webui / "extensions" / "lowvram-layout" / "x.py").write_bytes(b"x")
    (webui / "webui-user.sh").write_bytes(b"block")
    paths.manifest_path(webui).parent.mkdir(parents=True, exist_ok=True)
    paths.manifest_path(webui).write_bytes(b"{}")
    assert snap.restore() == []
    assert sorted(p.name for p in webui.iterdir()) == []
    assert not paths.manifest_path(webui).exists()
