"""tune's pieces that need no UI: settings, failure reasons, the loopback client, the JSON, the chart."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lowvram.errors import UsageError
from lowvram.facts import Facts, SystemFacts
from lowvram.tune import (
    ApiClient,
    Probe,
    TuneError,
    TuneResult,
    TuneSettings,
    _local_facts,
    _quietly,
    _sigterm_as_interrupt,
    failure_reason,
    txt2img_payload,
)


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
    from lowvram.tune import free_port

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
