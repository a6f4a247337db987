"""The UI as a child process group: started as `launch` starts it, waited for, restarted when wedged, stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lowvram.world.tune.loopback import _block_port, _port_free, check_listening, free_port, loopback_plan
from lowvram.world.tune.results import UI_RESTARTS, Reporter, TuneError, TuneEvent, TuneSettings
from lowvram.world.tune.ui_api import ApiClient

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.plan import Plan
    from lowvram.world.fsutil import FileLock
    from lowvram.world.launch import LaunchSpec, RunningUI


class UiProcess:
    """The UI started as `launch` starts it (lowvram.world.launch.start_ui), its output going to a log file.

    `launch` waits for its UI; tune needs it in the background and must be sure that nothing of it
    is left afterwards, so the stop here signals the whole process group and checks every member.
    """

    def __init__(self, spec: LaunchSpec, log_path: Path, lock: FileLock | None) -> None:
        self.spec = spec
        self.log_path = log_path
        self.lock = lock
        self.running_ui: RunningUI | None = None

    def start(self) -> None:
        from lowvram.world.launch import start_ui

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.running_ui = start_ui(self.spec, self.lock, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int | None:
        return None if self.running_ui is None else self.running_ui.pid

    def exit_code(self) -> int | None:
        """None while the UI runs; its exit code once it has ended."""
        from lowvram.world.launch import exit_code_from, read_status

        if self.running_ui is None:
            return None
        rc = self.running_ui.proc.poll()
        if rc is None:
            return None
        return exit_code_from(rc, read_status(self.spec.status_path))

    def running(self) -> bool:
        return self.running_ui is not None and self.running_ui.proc.poll() is None

    def last_line(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(max(0, os.fstat(fh.fileno()).st_size - 4096))
                lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        except OSError:
            return ""
        return lines[-1][:200] if lines else ""

    def stop(self, timeout: float) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever is left after `timeout`; reap the child."""
        if self.running_ui is None:
            return
        proc = self.running_ui.proc
        if os.name == "nt":  # pragma: no cover - Windows only
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], capture_output=True,
                           timeout=timeout + 5, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            return
        pgid = proc.pid  # start_new_session: the launcher leads its own group
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pgid, proc):
            time.sleep(0.05)
        if _group_alive(pgid, proc):
            _signal_group(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and _group_alive(pgid, proc):
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(1.0)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int, proc: subprocess.Popen[bytes]) -> bool:
    """Any member of the group still running? Zombies (already dead, not yet reaped) do not count."""
    proc.poll()  # reap our own child as soon as it exits
    proc_dir = Path("/proc")
    if proc_dir.is_dir():
        for entry in proc_dir.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            rest = text[text.rindex(")") + 2:].split()
            if len(rest) > 2 and rest[2] == str(pgid) and rest[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_ready(ui: UiProcess, client: ApiClient, timeout: float, report: Reporter,
               interval: float = 0.25, *, path: str = "/sdapi/v1/progress", name: str = "the UI",
               slow_start: str = "; a first start can take minutes (installs, model load): run `lowvram launch` "
                                 "once, then tune") -> float:
    """Poll GET `path` until it answers 200; return the seconds it took. `name` is how the errors call the UI
    (A1111/Forge: /sdapi/v1/progress; ComfyUI: /system_stats)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        code = ui.exit_code()
        if code is not None:
            last = ui.last_line()
            raise TuneError(f"{name} exited with code {code} before its API answered" + (f": {last}" if last else ""),
                            f"its output is in {ui.log_path}; `lowvram launch` shows the same start-up")
        now = time.monotonic()
        if now >= deadline:
            raise TuneError(f"{name} did not answer on {client.base}{path} within {timeout:.0f} s",
                            f"its output is in {ui.log_path}{slow_start}")
        report(TuneEvent("waiting", fraction=min(1.0, (now - start) / timeout)))
        try:
            status, _body = client.get(path, timeout=min(2.0, max(0.1, deadline - now)))
            if status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


class _TuneUi:
    """The UI's lifecycle: the road applied, the UI started on its port, restarted when wedged, stopped."""

    def __init__(self, *, webui: Path, facts: Facts, settings: TuneSettings, report: Reporter, lock: FileLock,
                 log_path: Path, time_left: Callable[[], float]) -> None:
        self.webui = webui
        self.facts = facts
        self.settings = settings
        self.report = report
        self.lock = lock
        self.log_path = log_path
        self.time_left = time_left
        self.ui: UiProcess | None = None
        self.client: ApiClient | None = None
        self.restarts = 0
        self._pending_restart = ""

    def apply(self, plan: Plan) -> None:
        """The road's block (loopback only) and the hook, through the normal apply path; restore()
        puts back what was there before."""
        from lowvram.world.apply import apply_plan

        apply_plan(loopback_plan(plan), self.webui, self.facts, lock_held=True)

    def start(self, plan: Plan) -> None:
        from lowvram.world.launch import build_launch

        port = _block_port(plan, self.facts)
        if port is None:
            port = free_port()
        else:
            if not _port_free(port):
                raise TuneError(f"port {port} (--port {port} in your COMMANDLINE_ARGS) is in use: is the UI "
                                "already running?",
                                "stop it (tune starts its own, API only), or take --port out of webui-user's "
                                "COMMANDLINE_ARGS while tuning")
            self.report(TuneEvent("note", f"your COMMANDLINE_ARGS sets --port {port}, which the UI reads after its "
                                          "command line: tune talks to it there"))
        spec = build_launch(plan, self.facts, self.webui, extra_args=("--api", "--nowebui", "--port", str(port)),
                            python=None, no_hook=False)
        self.ui = UiProcess(spec, self.log_path, self.lock)
        self.client = ApiClient(port)
        self.report(TuneEvent("starting", f"starting the UI (API only, {self.client.base})"))
        self.ui.start()
        took = min(self.settings.ready_timeout_s, max(1.0, self.time_left()))
        seconds = wait_ready(self.ui, self.client, took, self.report)
        check_listening(port)
        self.report(TuneEvent("ready", f"the UI answered after {seconds:.1f} s"))

    def exited_within(self, seconds: float) -> int | None:
        """A refused or reset connection usually means the UI is on its way out: give it a moment to say so."""
        deadline = time.monotonic() + seconds
        while self.ui is not None:
            code = self.ui.exit_code()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.05)
        return None

    def restart_needed(self, plan: Plan, why: str) -> None:
        """A wedged UI (a job that never ends holds A1111's queue) or a dead one is restarted before the next probe."""
        self._pending_restart = why

    def ensure(self, plan: Plan) -> None:
        why = self._pending_restart
        if self.ui is not None and self.ui.running() and not why:
            return
        self._pending_restart = ""
        if self.restarts >= UI_RESTARTS:
            raise TuneError(f"the UI had to be restarted {self.restarts} times ({why or 'it exited'})",
                            f"its output is in {self.log_path}")
        restarts = self.restarts + 1
        self.report(TuneEvent("note", f"restarting the UI ({why or 'it exited'})"))
        self.stop()
        self.start(plan)
        self.restarts = restarts

    def stop(self) -> None:
        if self.ui is not None:
            self.report(TuneEvent("stopping", "stopping the UI"))
            self.ui.stop(self.settings.stop_timeout_s)
            self.ui = None
