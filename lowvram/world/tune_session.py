"""`lowvram tune`: the reserve search giant-kitten's users do by hand, done by measuring (docs/architecture.md#tune).

The UI is started as `launch` starts it (the managed block, the hook, `webui.sh`), with its API only,
on a free loopback port. Each candidate reserve is written into the hook config (the hook re-reads
it at the next job), then one warm-up txt2img and K measured ones are sent; s/it is the median wall
time over the steps, or the hook's own per-step timing of those jobs when it recorded one. What to
try next comes from the pure search in `lowvram.core.search`. Whatever happens (done, Ctrl-C, SIGTERM, a
time limit, an error) the UI's process group is stopped, what tune changed in the tree and the
state dir (webui-user, the hook and its config, the manifest and its backups) is put back byte for
byte as it was before tune, and every probe is kept as an observation with source `tuning`, which
the next plan uses.

The UI listens on loopback only: `--server-name 127.0.0.1` ends the COMMANDLINE_ARGS tune's block
sets (later flags win in A1111's argparse, and a server name beats `--listen`), `--ngrok` is
refused, and once the UI answers, what it really listens on is checked (Linux: /proc/net/tcp*).
A probe counts only for what the hook really did: a resident probe whose layout did not run is a
failed probe, not a resident measurement.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.errors import LowvramError, UsageError
from lowvram.core.observations import Observation, measured_road, run_failed
from lowvram.core.words import plural
from lowvram.world import paths
from lowvram.world.fsutil import FileLock, atomic_write_bytes, remove_tree, temp_name
from lowvram.world.observation_log import append_observation, load_observations

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.plan import Overrides, Plan
    from lowvram.world.launch import LaunchSpec, RunningUI

PROMPT = "a lighthouse on a rocky coast at dusk, detailed, photograph"
NEGATIVE = "blurry"
SEED = 1234567
SAMPLER = "Euler a"
LOOPBACK = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")
MAX_PER_ROAD = 12  # docs/architecture.md#tune: tune may probe up to 12 reserves per road
FAMILY_SIZES = {"sd15": 512, "sd2": 768, "sdxl": 1024, "sdxl-refiner": 1024}
UI_RESTARTS = 2  # per road, after a probe that killed or wedged the UI
RESTORED = "webui-user, the hook and its config, and lowvram's manifest restored byte for byte as they were before tune"


class TuneError(LowvramError):
    """Tuning could not run or could not go on (the UI never answered, a lock, a bad option)."""


class TuneInterruptedError(LowvramError):
    """Ctrl-C or SIGTERM: everything was put back, the probes so far were kept."""

    exit_code = 130


@dataclass(frozen=True)
class TuneSettings:
    width: int | None = None  # None = the profile's target size
    height: int | None = None
    steps: int = 4
    repeats: int = 2
    roads: str = "auto"  # auto | swap | resident
    max_minutes: float = 15.0
    ready_timeout_s: float = 600.0  # A1111's first start installs and loads for minutes
    request_timeout_s: float = 600.0  # one txt2img; also capped by what is left of max_minutes
    stop_timeout_s: float = 10.0  # SIGTERM, then SIGKILL for the whole process group

    def check(self) -> None:
        if self.roads not in ("auto", "swap", "resident"):
            raise UsageError(f"--roads must be auto, swap or resident, not {self.roads!r}", "e.g. --roads auto")
        for name, value, low in (("--steps", self.steps, 1), ("--repeats", self.repeats, 1)):
            if value < low:
                raise UsageError(f"{name} must be at least {low}, not {value}", f"e.g. {name} 4")
        for name, size in (("--width", self.width), ("--height", self.height)):
            if size is not None and (size < 64 or size % 8):
                raise UsageError(f"{name} must be a multiple of 8 of at least 64, not {size}", f"e.g. {name} 1024")
        if (self.width is None) != (self.height is None):
            raise UsageError("give --width and --height together", "e.g. --width 1024 --height 1024")
        if not self.max_minutes > 0:
            raise UsageError(f"--max-minutes must be more than 0, not {self.max_minutes}", "e.g. --max-minutes 15")


@dataclass(frozen=True)
class Probe:
    """One measured candidate: a road and a reserve, its s/it, or why it failed."""

    road: str
    reserve_mb: int
    sit: float | None
    ok: bool
    reason: str = ""
    walls: tuple[float, ...] = ()  # seconds per measured request
    sit_source: str = "wall"  # wall | hook
    free_mb: int | None = None
    overflow_mb: int | None = None
    ooms: int = 0
    layout_error: str = ""  # a resident probe whose layout did not run: what the hook said (failed)
    device: str | None = None  # what the hook recorded (cuda | cpu), None without a hook record

    def to_dict(self) -> dict[str, Any]:
        return {"road": self.road, "reserve_mb": self.reserve_mb, "sit": self.sit, "ok": self.ok,
                "reason": self.reason, "walls": [round(w, 4) for w in self.walls], "sit_source": self.sit_source,
                "free_mb": self.free_mb, "overflow_mb": self.overflow_mb, "ooms": self.ooms,
                "layout_error": self.layout_error or None, "device": self.device}


@dataclass(frozen=True)
class TuneResult:
    best: Probe | None
    start: Probe | None  # the profile's starting point (its road and reserve), as measured
    probes: tuple[Probe, ...]
    closed: bool  # the search finished (rather than running out of time or candidates)
    reason: str
    width: int
    height: int
    steps: int
    repeats: int
    roads: tuple[str, ...]
    webui: str
    saved: int  # observations written
    start_plan: dict[str, Any] = field(default_factory=dict)

    @property
    def gain_pct(self) -> float | None:
        if self.best is None or self.start is None or not self.start.sit or self.best.sit is None:
            return None
        return round((self.start.sit - self.best.sit) / self.start.sit * 100.0, 1)

    def to_dict(self) -> dict[str, Any]:
        def point(p: Probe | None) -> dict[str, Any] | None:
            return None if p is None else {"road": p.road, "reserve_mb": p.reserve_mb, "sit": p.sit}

        return {
            "schema": 1,
            "best": point(self.best),
            "start": point(self.start),
            "gain_pct": self.gain_pct,
            "probes": [p.to_dict() for p in self.probes],
            "closed": self.closed,
            "reason": self.reason,
            "size": {"width": self.width, "height": self.height},
            "steps": self.steps,
            "repeats": self.repeats,
            "roads": list(self.roads),
            "webui": self.webui,
            "observations_saved": self.saved,
        }


@dataclass(frozen=True)
class TuneEvent:
    """What the CLI shows while tune runs: `waiting` (fraction of the start timeout), `probe`, notes."""

    kind: str  # plan | starting | waiting | ready | probing | probe | stopping | note
    message: str = ""
    fraction: float | None = None
    probe: Probe | None = None


Reporter = Callable[[TuneEvent], None]


# ---------------------------------------------------------------------------------------------
# The UI as a child process group, and its API over loopback HTTP (stdlib only)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    """Nothing listens on `port` (SO_REUSEADDR as the UI's server sets it: TIME_WAIT is no obstacle)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if os.name != "nt":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _block_port(plan: Plan, facts: Facts) -> int | None:
    """The `--port` COMMANDLINE_ARGS will carry (the user's literal flags kept by the block, and the
    plan's). A1111 appends COMMANDLINE_ARGS after its command line, so that value beats tune's."""
    from lowvram.world.detect.webui import flag_value

    if plan.merge == "assign":
        args = tuple(plan.user_args_kept) + tuple(plan.args)
    else:
        user = facts.webui.user_args if facts.webui is not None else None
        args = tuple(user or ()) + tuple(plan.args)
    value = flag_value(args, "--port")
    try:
        port = int(value) if value is not None else None
    except ValueError:
        return None
    return port if port is not None and 0 < port < 65536 else None


# ---------------------------------------------------------------------------------------------
# Loopback only: tune's UI is never reachable from another machine


def loopback_plan(plan: Plan) -> Plan:
    """The plan as tune writes it into the block while it measures.

    Its flags end with `--server-name 127.0.0.1`: A1111 1.8 reads COMMANDLINE_ARGS after its own
    command line, argparse keeps a flag's last value, and a server name beats `--listen`, so no
    user flag above the block widens it (without a server name A1111's API-only start binds
    0.0.0.0 and [::]). No extensions are fetched: tune measures, the UI's tabs are not needed.
    """
    return replace(plan, args=(*plan.args, "--server-name", LOOPBACK), extensions=())


def user_flags(facts: Facts) -> tuple[tuple[str, ...], bool]:
    """(the user's COMMANDLINE_ARGS as the UI will see them, whether they could all be read).

    Where webui-user assigns none, the value in lowvram's own environment passes through to it.
    """
    webui = facts.webui
    args = webui.user_args if webui is not None else None
    literal = webui.user_args_literal if webui is not None else True
    if args is None:
        try:
            args = tuple(shlex.split(os.environ.get("COMMANDLINE_ARGS", "")))
        except ValueError:
            args, literal = (), False
    return tuple(args), literal


def exposing_flags(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(refused, overridden): flags that would open A1111 1.8's API-only UI beyond loopback.

    `--ngrok TOKEN` opens a tunnel to the UI's port at start-up even with --nowebui (modules/ui.py
    connects on import, and the API imports it) and no later flag turns it off: refused.
    `--listen` and `--server-name HOST` pick the address the API binds, which tune's final
    `--server-name 127.0.0.1` overrides; `--share` reaches only Gradio's launch, which --nowebui
    never calls.
    """
    refused: list[str] = []
    overridden: list[str] = []
    items = list(args)
    for i, arg in enumerate(items):
        name, eq, inline = arg.partition("=")
        value = inline if eq else (items[i + 1] if i + 1 < len(items) else "")
        if name == "--ngrok":
            refused.append("--ngrok")
        elif name in ("--listen", "--share") and not eq:
            overridden.append(name)
        elif name == "--server-name" and value not in LOOPBACK_NAMES:
            overridden.append(f"--server-name {value}".strip())
    return refused, overridden


def check_user_flags(facts: Facts, report: Reporter) -> None:
    """Refuse what tune cannot keep on loopback; say what it overrides (before anything changes)."""
    args, literal = user_flags(facts)
    refused, overridden = exposing_flags(args)
    if refused:
        raise TuneError("your COMMANDLINE_ARGS has --ngrok: A1111 opens an ngrok tunnel to its port even when "
                        "only its API runs, which would put tune's UI on the internet",
                        "take --ngrok out of webui-user's COMMANDLINE_ARGS (or your environment's) while tuning")
    if overridden:
        report(TuneEvent("note", f"your COMMANDLINE_ARGS has {', '.join(overridden)}: tune's UI still listens on "
                                 f"{LOOPBACK} only (--server-name {LOOPBACK} comes last; --share does nothing "
                                 "without the web UI); your webui-user file is left as it is"))
    if not literal:
        report(TuneEvent("note", "your COMMANDLINE_ARGS is not literal, so tune cannot read it: tune's UI gets "
                                 f"--server-name {LOOPBACK} last, and what it listens on is checked once it answers"))


def listen_addresses(port: int, net: Path = Path("/proc/net")) -> list[str] | None:
    """The addresses something listens on at TCP `port` (Linux's /proc/net/tcp and tcp6), or
    None where that cannot be read (another OS)."""
    found: list[str] = []
    readable = False
    for name in ("tcp", "tcp6"):
        try:
            lines = (net / name).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":  # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].rpartition(":")
            with contextlib.suppress(ValueError):
                if int(hex_port, 16) == port:
                    found.append(_proc_net_address(address))
    return found if readable else None


def _proc_net_address(text: str) -> str:
    """/proc/net/tcp* prints an address as 32-bit words in the host's byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def beyond_loopback(addresses: Sequence[str]) -> list[str]:
    out = []
    for text in addresses:
        address = ipaddress.ip_address(text)
        mapped = getattr(address, "ipv4_mapped", None)
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            out.append(text)
    return out


def check_listening(port: int) -> None:
    """After the UI answered: it must listen on loopback only (a flag tune could not see, e.g. a
    user line after the block, must not expose it)."""
    addresses = listen_addresses(port)
    wide = beyond_loopback(addresses or [])
    if wide:
        shown = ", ".join(f"[{a}]" if ":" in a else a for a in wide)
        raise TuneError(f"the UI listened on {shown} port {port}, beyond loopback: tune stopped it",
                        "something in COMMANDLINE_ARGS after lowvram's block (a --server-name?) widens it; take it "
                        "out while tuning")


# ---------------------------------------------------------------------------------------------
# What tune changes, put back byte for byte afterwards

_Saved = tuple[bytes, int]  # a file's bytes and mode
_CACHES = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache")


def _save_file(path: Path) -> _Saved | None:
    try:
        return path.read_bytes(), path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TuneError(f"cannot read {path} to put it back after tuning: {exc.strerror or exc}",
                        "check its permissions") from exc


def _save_dir(root: Path) -> dict[str, _Saved] | None:
    """Every file under `root` (Python's caches left out, as the hook's install leaves them)."""
    if not root.is_dir():
        return None
    out: dict[str, _Saved] = {}
    for path in sorted(root.rglob("*")):
        relpath = path.relative_to(root)
        if any(part in _CACHES for part in relpath.parts) or relpath.suffix in (".pyc", ".pyo"):
            continue
        if path.is_file() and not path.is_symlink():
            saved = _save_file(path)
            if saved is not None:
                out[relpath.as_posix()] = saved
    return out


def _put_file(path: Path, saved: _Saved | None) -> None:
    if saved is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif _save_file(path) != saved:
        atomic_write_bytes(path, saved[0], saved[1])


def _put_dir(root: Path, saved: dict[str, _Saved] | None) -> None:
    """`root` holding exactly `saved` again (absent for None), swapped in through a temp dir."""
    if _save_dir(root) == saved:
        return
    old = temp_name(root) if root.exists() else None
    if old is not None:
        root.rename(old)
    if saved is not None:
        tmp = temp_name(root)
        tmp.mkdir(parents=True)
        for relpath, (data, mode) in saved.items():
            target = tmp / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            os.chmod(target, mode)
        tmp.rename(root)
    if old is not None:
        remove_tree(old)


@dataclass(frozen=True)
class TreeSnapshot:
    """What tune may change, as it was before tune: the webui-user files, the hook and its config,
    lowvram's manifest and backups. `restore` puts it all back byte for byte (docs/architecture.md#tune)."""

    webui: Path
    files: tuple[tuple[Path, _Saved | None], ...]
    hook_dir: dict[str, _Saved] | None
    extensions_dir: bool
    backups: dict[str, _Saved] | None
    manifest: _Saved | None

    @classmethod
    def take(cls, webui: Path) -> TreeSnapshot:
        from lowvram.world.apply.hook import hook_dir

        webui = Path(webui).resolve()
        names = ("webui-user.sh", "webui-user.bat", "webui.settings.bat")
        files = [webui / n for n in names] + [paths.hook_config_path(webui)]
        return cls(webui=webui, files=tuple((f, _save_file(f)) for f in files), hook_dir=_save_dir(hook_dir(webui)),
                   extensions_dir=(webui / "extensions").is_dir(), backups=_save_dir(paths.backups_dir(webui)),
                   manifest=_save_file(paths.manifest_path(webui)))

    def restore(self) -> list[str]:
        """The tree first, the manifest last (it must name at least what the tree holds from
        lowvram, docs/architecture.md#safety-on-the-users-tree, "Crash-safe order"). Returns what could not be put back."""
        from lowvram.world.apply.hook import hook_dir

        extensions = self.webui / "extensions"
        steps: list[tuple[str, Callable[[], None]]] = [
            (str(path), functools.partial(_put_file, path, saved)) for path, saved in self.files]
        steps.append((str(hook_dir(self.webui)), lambda: _put_dir(hook_dir(self.webui), self.hook_dir)))
        if not self.extensions_dir:
            steps.append((str(extensions), lambda: _rmdir_if_empty(extensions)))
        steps.append((str(paths.backups_dir(self.webui)), lambda: _put_dir(paths.backups_dir(self.webui),
                                                                           self.backups)))
        steps.append((str(paths.manifest_path(self.webui)), lambda: _put_file(paths.manifest_path(self.webui),
                                                                             self.manifest)))
        problems = []
        for what, step in steps:
            try:
                step()
            except Exception as exc:
                problems.append(f"{what} could not be put back ({exc})")
        return problems


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # gone, or not empty: what someone else put there stays
        path.rmdir()


class ApiClient:
    """A1111's API on a loopback port; no proxy (an http_proxy must never see these requests)."""

    def __init__(self, port: int, host: str = LOOPBACK) -> None:
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise TuneError(f"tune talks to the UI only over loopback, not {host}", "this is a bug in lowvram")
        self.base = f"http://{host}:{port}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str, timeout: float) -> tuple[int, Any]:
        return self._call(urllib.request.Request(self.base + path, method="GET"), timeout)

    def post(self, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
        data = json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        return self._call(req, timeout)

    def _call(self, req: urllib.request.Request, timeout: float) -> tuple[int, Any]:
        """(status, parsed JSON or text). Raises OSError (incl. timeouts) when nothing came back."""
        try:
            with self._opener.open(req, timeout=max(0.05, timeout)) as resp:
                return int(resp.status), _parse(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                body = _parse(exc.read())
            finally:
                exc.close()
            return int(exc.code), body
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, OSError):
                raise reason from exc
            raise ConnectionError(str(reason)) from exc


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", "replace")


def failure_reason(status: int, body: Any) -> str:
    """One short line for a failed txt2img: A1111 answers 500 with {error, detail, body, errors}."""
    text = json.dumps(body) if not isinstance(body, str) else body
    if "out of memory" in text.lower() or "outofmemory" in text.lower():
        return f"out of memory (HTTP {status})"
    detail = ""
    if isinstance(body, dict):
        parts = [str(body.get(k)) for k in ("error", "errors", "detail") if body.get(k)]
        detail = ": " + " ".join(parts) if parts else ""
    elif text:
        detail = ": " + text.strip().splitlines()[0]
    return f"HTTP {status}{detail}"[:160]


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
               interval: float = 0.25) -> float:
    """Poll GET /sdapi/v1/progress until it answers 200; return the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        code = ui.exit_code()
        if code is not None:
            last = ui.last_line()
            raise TuneError(f"the UI exited with code {code} before its API answered" + (f": {last}" if last else ""),
                            f"its output is in {ui.log_path}; `lowvram launch` shows the same start-up")
        now = time.monotonic()
        if now >= deadline:
            raise TuneError(f"the UI did not answer on {client.base}/sdapi/v1/progress within {timeout:.0f} s",
                            f"its output is in {ui.log_path}; a first start can take minutes "
                            "(installs, model load): run `lowvram launch` once, then tune")
        report(TuneEvent("waiting", fraction=min(1.0, (now - start) / timeout)))
        try:
            status, _body = client.get("/sdapi/v1/progress", timeout=min(2.0, max(0.1, deadline - now)))
            if status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def txt2img_payload(width: int, height: int, steps: int) -> dict[str, Any]:
    """Fixed prompt and seed, batch 1, nothing saved or sent back: only the time matters."""
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "subseed": -1, "width": width,
            "height": height, "steps": steps, "batch_size": 1, "n_iter": 1, "cfg_scale": 7.0,
            "sampler_name": SAMPLER, "enable_hr": False, "restore_faces": False, "tiling": False,
            "save_images": False, "send_images": False, "do_not_save_samples": True, "do_not_save_grid": True}


NO_HOOK_RECORD = ("the hook recorded none of these jobs, so the layout cannot have run (is "
                  "extensions/lowvram-layout loaded? the UI's output is in tune-ui.log)")


def judge_probe(road: str, reserve: int, walls: Sequence[float], failure: str, *, hook: Sequence[Observation],
                measured: Sequence[Observation], steps: int) -> Probe:
    """One probe from what the API answered (`walls`, `failure`) and what the hook recorded of its
    jobs (`hook`: all of them, `measured`: those after the warm-up).

    It counts only for what the hook really did: on the resident road a job whose layout did not
    run (refused, failed and rolled back, or no hook record at all) makes the probe a failed one,
    not a resident measurement. The swap road needs no hook: wall time ÷ steps stands in for it.
    """
    ooms = sum(o.ooms for o in hook)
    common: dict[str, Any] = {
        "walls": tuple(walls), "free_mb": _median_int([o.free_mb for o in hook]),
        "overflow_mb": max((o.overflow_mb for o in hook if o.overflow_mb is not None), default=None),
        "ooms": ooms, "device": next((o.device for o in reversed(hook) if o.device), None)}
    if failure:
        return Probe(road, reserve, None, False, failure, sit_source="wall", **common)
    if road == "resident":
        skipped = [o for o in hook if measured_road(o) != "resident"]
        why = next((o.layout_error for o in skipped if o.layout_error), "") if skipped else ""
        if skipped or not hook:
            why = why or ("the hook did not lay the model out" if skipped else NO_HOOK_RECORD)
            return Probe(road, reserve, None, False, f"the layout did not run: {why}", sit_source="hook",
                         layout_error=why, **common)
    good = [o for o in measured if not run_failed(o)]
    failed = [o for o in hook if run_failed(o)]
    if failed and not good:
        reason = (f"out of memory (the hook counted {ooms})" if ooms
                  else failed[-1].reason or "the job failed (the hook's record)")
        return Probe(road, reserve, None, False, reason, sit_source="hook", **common)
    sits = [o.sit for o in good if o.sit is not None]
    if sits:
        return Probe(road, reserve, round(statistics.median(sits), 6), True, sit_source="hook", **common)
    return Probe(road, reserve, round(statistics.median(walls) / steps, 6), True, sit_source="wall", **common)


def road_outcome(road: str, probes: Sequence[Probe], done: bool, why: str) -> tuple[bool, str]:
    """(closed, reason) for one road, saying what failed: a road none of whose probes succeeded was
    not measured, whatever the search said."""
    failed = [p for p in probes if not p.ok]
    if probes and len(failed) == len(probes):
        return False, f"{road} road not measured: {failed[-1].reason}"
    if failed:
        return done, f"{why} ({len(failed)} of {plural(len(probes), 'probe')} failed)"
    return done, why


# ---------------------------------------------------------------------------------------------
# The session: plans per road, the UI, the probes, and putting everything back
#
# _Session runs the roads and puts things back; _TuneUi starts, restarts and stops the UI;
# _Prober measures one road's reserves; _Ledger keeps the probes, saves them, and names the best.


@dataclass
class _Road:
    name: str
    plan: Plan


def _roads(base_plan: Plan, wanted: str, road_plan: Callable[[str], Plan],
           note: Callable[[str], None] = lambda _m: None) -> list[_Road]:
    """The roads to measure for `--roads wanted`, the profile's road first."""
    resident: Plan | None = None
    if wanted in ("auto", "resident"):
        candidate = base_plan if base_plan.road == "resident" else road_plan("on")
        if candidate.road == "resident" and candidate.reserve.applied and not candidate.hook.enabled:
            if wanted == "resident":  # the layout cannot run: every probe would fail after the UI started
                raise TuneError("the resident road needs the layout hook, and it is off (LOWVRAM_HOOK=off): every "
                                "probe would fail, so tune starts nothing",
                                "unset LOWVRAM_HOOK to tune the reserve, or run `lowvram tune --roads swap`")
            note("the layout hook is off (LOWVRAM_HOOK=off): only the swap road is measured")
        elif candidate.road == "resident" and candidate.reserve.applied:
            resident = candidate
        elif wanted == "resident":
            raise TuneError("only the swap road exists here: memory cannot spill into shared memory "
                            "(native Linux, or sysmem fallback off), so there is no reserve to tune",
                            "run `lowvram tune --roads swap`, or `--sysmem-fallback on` if the driver does spill")
    swap: Plan | None = None
    if wanted in ("auto", "swap"):
        swap = base_plan if base_plan.road == "swap" else road_plan("off")
        if swap.road != "swap":
            swap = None
    out: list[_Road] = []
    if resident is not None:
        out.append(_Road("resident", resident))
    if swap is not None:
        out.append(_Road("swap", swap))
    if not out:
        raise TuneError("no road to tune for this plan", "check `lowvram plan` for its road")
    out.sort(key=lambda r: r.name != base_plan.road)  # the profile's road first (docs/architecture.md#the-policy)
    return out


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


class _Ledger:
    """The probes: each judged, saved as an observation as it is measured, and the best and the result."""

    def __init__(self, *, webui: Path, base_plan: Plan, settings: TuneSettings, checkpoint: str | None,
                 driver: str | None, vram_total_mb: int | None, width: int, height: int, obs_path: Path) -> None:
        self.webui = webui
        self.base_plan = base_plan
        self.settings = settings
        self.checkpoint = checkpoint
        self.driver = driver
        self.vram_total_mb = vram_total_mb
        self.width, self.height = width, height
        self.obs_path = obs_path
        self.probes: list[Probe] = []
        self.saved = 0
        self.start_probe: Probe | None = None

    def judge(self, road: str, reserve: int, walls: list[float], failure: str, *, tag: str,
              measure_from: float) -> Probe:
        hook = [o for o in load_observations(self.obs_path).items
                if o.source == "hook" and o.tag == tag]
        measured = [o for o in hook if o.time >= measure_from] if measure_from else []
        probe = judge_probe(road, reserve, walls, failure, hook=hook, measured=measured, steps=self.settings.steps)
        # One UI, one device: a probe the hook recorded nothing of (it hung, the UI died) ran where the others did.
        known = next((p.device for p in self.probes if p.device), None)
        return replace(probe, device=known) if probe.device is None and known else probe

    def keep(self, road: _Road, reserve: int, probe: Probe) -> None:
        """A probe judged: kept, saved, and noted as the start when it is the profile's own candidate."""
        self.probes.append(probe)
        self.save(road.plan, probe)
        if (self.start_probe is None and road.name == self.base_plan.road
                and (road.name == "swap" or reserve == self.base_plan.reserve.mb)):
            self.start_probe = probe

    def observation(self, plan: Plan | None, probe: Probe) -> Observation:
        return Observation(
            time=time.time(), source="tuning", checkpoint=self.checkpoint,
            family=plan.model_family if plan is not None else None,
            flags=tuple(plan.args) if plan is not None else (), road=probe.road,
            offload=plan.offload if plan is not None else None,
            layout=probe.road == "resident" and not probe.layout_error, layout_error=probe.layout_error or None,
            device=probe.device, reserve_mb=probe.reserve_mb if probe.road == "resident" else None,
            free_mb=probe.free_mb, overflow_mb=probe.overflow_mb, vram_total_mb=self.vram_total_mb,
            sit=probe.sit, width=self.width, height=self.height, batch=1, steps=self.settings.steps,
            ooms=probe.ooms, ok=probe.ok, reason=probe.reason, driver=self.driver, tag="tune")

    def save(self, plan: Plan, probe: Probe) -> None:
        """Kept as it is measured, so a tune killed outright still leaves what it learnt."""
        append_observation(self.obs_path, self.observation(plan, probe))
        self.saved += 1

    def result(self, closed: bool, reason: str, roads: list[str]) -> TuneResult:
        return TuneResult(best=self.best(), start=self.start_probe, probes=tuple(self.probes), closed=closed,
                          reason=reason, width=self.width, height=self.height, steps=self.settings.steps,
                          repeats=self.settings.repeats, roads=tuple(roads), webui=str(self.webui),
                          saved=self.saved,
                          start_plan={"road": self.base_plan.road, "reserve_mb": self.base_plan.reserve.mb})

    def best(self) -> Probe | None:
        """The winner as the pure search judges it: the fastest value whose neighbours do not swing.

        The next plan reads the same probes through `lowvram.core.search`, so tune names the same winner.
        """
        from lowvram.core import search

        ok = [p for p in self.probes if p.ok and p.sit is not None]
        if not ok:
            return None
        runs = search.like_with_like([self.observation(None, p) for p in ok])
        ok = [p for p in ok if p.device == runs[0].device] if runs else ok
        judged = search.best_probe(search.make_probes(runs))
        if judged is None:
            return min(ok, key=lambda p: (p.sit or 0.0, p.reserve_mb))
        same = [p for p in ok if p.road == judged.road and (p.road == "swap" or p.reserve_mb == judged.reserve_mb)]
        return min(same, key=lambda p: p.sit or 0.0) if same else None


class _Prober:
    """One road's measurements: the resident reserves searched, each candidate probed through the API."""

    def __init__(self, *, ui: _TuneUi, ledger: _Ledger, base_plan: Plan, settings: TuneSettings,
                 report: Reporter, hook_path: Path, run_tag: str, time_left: Callable[[], float]) -> None:
        self.ui = ui
        self.ledger = ledger
        self.base_plan = base_plan
        self.settings = settings
        self.report = report
        self.hook_path = hook_path
        self.run_tag = run_tag
        self.time_left = time_left

    def search_resident(self, road: _Road) -> tuple[bool, str]:
        """Reserve 0 first, the profile's starting reserve next, then what the pure search proposes."""
        from lowvram.core import search
        from lowvram.core.estimate.memory import CUDA_CONTEXT_MB

        led = self.ledger
        start_reserve = self.base_plan.reserve.mb if self.base_plan.road == "resident" else None
        measured: list[int] = []
        while True:
            if len(measured) >= MAX_PER_ROAD:
                return True, f"resident road: closed after {plural(len(measured), 'candidate')}"
            if self.time_left() <= 0:
                return False, f"resident road: out of time after {plural(len(measured), 'candidate')}"
            if not measured:
                nxt = 0
            elif start_reserve is not None and start_reserve not in measured:
                nxt = start_reserve
            else:
                observations = load_observations(led.obs_path).items
                state = search.tuning_state(observations, led.checkpoint, led.driver, (led.width, led.height),
                                            max_candidates=MAX_PER_ROAD, vram_total_mb=led.vram_total_mb,
                                            cuda_context_mb=CUDA_CONTEXT_MB)
                if state.closed:
                    return True, f"resident road: {state.reason}"
                candidate = state.next_candidate
                if candidate is None:
                    return False, ("resident road: no free/overflow measurement to bound the search "
                                   "(is the layout hook installed? `lowvram reserve --add` records a reading)")
                nxt = candidate
                if nxt in measured:
                    return True, f"resident road: converged ({state.reason})"
            measured.append(nxt)
            probe = self.probe(road, nxt)
            if probe.layout_error and nxt == 0:  # not even the smallest reserve: the layout does not run here
                return False, f"resident road not measured: {probe.reason}"

    def probe(self, road: _Road, reserve: int) -> Probe:
        from lowvram.world.hookconfig import with_reserve, write_hook_config

        self.ui.ensure(road.plan)
        client = self.ui.client
        assert client is not None
        tag = f"{self.run_tag}-{len(self.ledger.probes) + 1}"
        layout = road.name == "resident"
        cfg = with_reserve(_read_json(self.hook_path) or {}, reserve, layout=layout, tag=tag)
        write_hook_config(self.hook_path, {**cfg, "flags": list(road.plan.args)})  # the road's, as the hook records
        self.report(TuneEvent("probing", f"{road.name} road, reserve {reserve} MiB"))
        walls, failure, measure_from = self._measure(road, client)
        probe = self.ledger.judge(road.name, reserve, walls, failure, tag=tag, measure_from=measure_from)
        self.ledger.keep(road, reserve, probe)
        self.report(TuneEvent("probe", probe=probe))
        return probe

    def _measure(self, road: _Road, client: ApiClient) -> tuple[list[float], str, float]:
        """One warm-up and the measured runs: their walls, why they stopped (if they did), when measuring began."""
        payload = txt2img_payload(self.ledger.width, self.ledger.height, self.settings.steps)
        walls: list[float] = []
        failure = ""
        measure_from = 0.0
        for n in range(1 + self.settings.repeats):
            if n == 1:
                measure_from = time.time()
            timeout = min(self.settings.request_timeout_s, max(30.0, self.time_left() + 30.0))
            t0 = time.monotonic()
            try:
                status, body = client.post("/sdapi/v1/txt2img", payload, timeout=timeout)
            except TimeoutError:
                failure = f"no answer within {timeout:.0f} s"
                self.ui.restart_needed(road.plan, failure)
                break
            except OSError as exc:
                code = self.ui.exited_within(2.0)
                failure = (f"the UI exited with code {code}" if code is not None
                           else f"connection failed: {exc.strerror or exc}")
                self.ui.restart_needed(road.plan, failure)
                break
            wall = time.monotonic() - t0
            if status != 200:
                failure = failure_reason(status, body)
                break
            if n > 0:
                walls.append(wall)
        return walls, failure, measure_from


class _Session:
    """A tune run: the roads in turn, each applied, its UI started, measured and stopped; then everything put back."""

    def __init__(self, *, ctx: Any, facts_file: Path | None, overrides: Overrides, settings: TuneSettings,
                 report: Reporter, lock: FileLock) -> None:
        self.settings = settings
        self.report = report
        self.overrides = overrides
        self.facts_file = facts_file
        self.webui = Path(ctx.webui)
        self.base_plan = ctx.plan
        if self.base_plan.ui != "a1111":
            raise TuneError(f"tune drives A1111's API and the layout hook; this WebUI is {self.base_plan.ui}",
                            "use `lowvram launch` there; the reserve search needs A1111")
        # --facts stands for the GPU only: the UI started (and the webui-user file written) is this machine's.
        self.facts = _local_facts(ctx.facts, self.webui) if ctx.from_facts_file else ctx.facts
        webui_facts = self.facts.webui
        gpu = _gpu(self.facts, self.base_plan)
        width, height = _target_size(self.base_plan, settings)
        self.ledger = _Ledger(webui=self.webui, base_plan=self.base_plan, settings=settings,
                              checkpoint=webui_facts.checkpoint_key if webui_facts is not None else None,
                              driver=gpu.driver if gpu is not None else None,
                              vram_total_mb=gpu.vram_total_mb if gpu is not None else None,
                              width=width, height=height, obs_path=paths.observations_path(self.webui))
        self.snapshot = TreeSnapshot.take(self.webui)  # before anything changes: restore() puts it back
        self.ui = _TuneUi(webui=self.webui, facts=self.facts, settings=settings, report=report, lock=lock,
                          log_path=paths.webui_state_dir(self.webui) / "tune-ui.log", time_left=self._time_left)
        self.prober = _Prober(ui=self.ui, ledger=self.ledger, base_plan=self.base_plan, settings=settings,
                              report=report, hook_path=paths.hook_config_path(self.webui),
                              run_tag=f"tune-{int(time.time())}-{os.getpid()}", time_left=self._time_left)
        self.deadline = time.monotonic() + settings.max_minutes * 60.0

    @property
    def probes(self) -> list[Probe]:
        return self.ledger.probes

    def roads(self) -> list[_Road]:
        from lowvram.world.plan_inputs import make_plan

        def road_plan(layout: str) -> Plan:
            return make_plan(webui=self.webui, facts_file=self.facts_file,
                             overrides=replace(self.overrides, layout=layout)).plan

        return _roads(self.base_plan, self.settings.roads, road_plan,
                      note=lambda message: self.report(TuneEvent("note", message)))

    def run(self) -> TuneResult:
        check_user_flags(self.facts, self.report)
        self.report(TuneEvent("plan", f"tuning {self.webui} at {self.ledger.width}×{self.ledger.height}, "
                                      f"{plural(self.settings.steps, 'step')}, "
                                      f"{plural(self.settings.repeats, 'measured run')} per candidate"))
        roads = self.roads()
        closed = True
        reasons: list[str] = []
        for road in roads:
            if self._time_left() <= 0:
                closed = False
                reasons.append(f"{road.name} road not measured: out of time")
                continue
            done, why = self._run_road(road)
            closed = closed and done
            reasons.append(why)
        return self.ledger.result(closed, "; ".join(reasons), [r.name for r in roads])

    def _run_road(self, road: _Road) -> tuple[bool, str]:
        self.ui.restarts = 0
        first = len(self.probes)
        self.ui.apply(road.plan)
        self.ui.start(road.plan)
        try:
            if road.name == "swap":
                self.prober.probe(road, 0)
                done, why = True, "swap road measured"
            else:
                done, why = self.prober.search_resident(road)
        finally:
            self.ui.stop()
        return road_outcome(road.name, self.probes[first:], done, why)

    def restore(self) -> list[str]:
        """Stop the UI, then put back everything as it was before tune. Returns what failed."""
        problems: list[str] = []
        try:
            self.ui.stop()
        except Exception as exc:
            problems.append(f"stopping the UI: {exc}")
        return problems + self.snapshot.restore()

    def _time_left(self) -> float:
        return self.deadline - time.monotonic()

    def partial(self) -> TuneResult:
        return self.ledger.result(False, "interrupted", [])


def run_tune(*, webui: Path | None, facts_file: Path | None, overrides: Overrides, settings: TuneSettings,
             report: Reporter | None = None) -> TuneResult:
    """Measure the candidates and return what was found; everything is put back before returning."""
    settings.check()
    emit: Reporter = report or (lambda _e: None)
    from lowvram.world.detect import detect_flavor, resolve_webui
    from lowvram.world.plan_inputs import make_plan

    # The WebUI first (tune needs a local one to start), then the plan for it.
    found = resolve_webui(webui)
    if found is None:
        raise TuneError("no WebUI found to tune: tune starts a local A1111 and measures it",
                        "point at one with --webui PATH (or LOWVRAM_WEBUI), or install one with `lowvram setup`")
    flavor = detect_flavor(found)
    if flavor != "a1111":
        raise TuneError(f"tune drives A1111's API and the layout hook; {found} is {flavor}",
                        "use `lowvram launch` there; the reserve search needs A1111")
    ctx = make_plan(webui=found, facts_file=facts_file, overrides=overrides)
    refuse_untunable(ctx.plan, ctx.facts)
    target = Path(ctx.webui or found)
    lock = FileLock(paths.lock_path(target), what=f"the WebUI at {target}")
    lock.acquire()
    try:
        with _sigterm_as_interrupt():
            session = _Session(ctx=ctx, facts_file=facts_file, overrides=overrides, settings=settings, report=emit,
                               lock=lock)
            try:
                result = session.run()
            except KeyboardInterrupt:
                problems = _quietly(session.restore)
                raise TuneInterruptedError(
                    f"interrupted: {plural(len(session.probes), 'probe')} kept as observations; the UI was stopped"
                    + (f" and {RESTORED}" if not problems else f", but {'; '.join(problems)}"),
                    "run `lowvram tune` again to finish the search (`lowvram reserve` shows where it stands)",
                ) from None
            except BaseException:
                for problem in _quietly(session.restore):
                    emit(TuneEvent("note", problem))
                raise
            problems = _quietly(session.restore)
            if problems:
                raise TuneError(f"tuning finished but {'; '.join(problems)}",
                                "put those back by hand (`lowvram revert` takes lowvram's block and hook out; "
                                "`lowvram apply` writes them afresh)")
            return result
    finally:
        lock.release()


def refuse_untunable(plan: Plan, facts: Facts) -> None:
    """TuneError, before anything starts, where there is nothing to tune: no NVIDIA GPU in the plan
    means no reserve to keep in VRAM and no offload level to choose (the UI runs on the CPU, or a GPU
    lowvram plans nothing for), so a UI started only to be measured would tell nothing."""
    if plan.gpu_index is not None:
        return
    if facts.other_gpus:
        why = "this machine's GPU is not NVIDIA (" + ", ".join(
            f"{o.vendor} {o.name or ''}".strip() for o in facts.other_gpus) + ")"
    else:
        why = f"no NVIDIA GPU here ({facts.nvml_error or 'NVML found none'})"
    raise TuneError(f"nothing to tune: {why}, so there is no VRAM reserve and no offload level to measure; "
                    "tune started nothing",
                    "`lowvram launch` starts the UI as planned; if this machine has an NVIDIA GPU, "
                    "`lowvram doctor` shows why it was not found")


def _quietly(restore: Callable[[], list[str]]) -> list[str]:
    """Run the restore with Ctrl-C and SIGTERM held off: a second one must not leave the UI running.

    (The restore is bounded: the UI's group gets SIGKILL after --stop-timeout.)
    """
    if os.name == "nt" or not _main_thread():
        return restore()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return restore()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a tune the way Ctrl-C does (the UI stopped, everything put back)."""
    if os.name == "nt" or not _main_thread():
        yield
        return

    def handler(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _local_facts(facts: Facts, webui: Path | None = None) -> Facts:
    """Facts from a file stand for the GPU; the OS that runs the UI and reads webui-user is this one.

    The tree was read for the file's OS (webui-user.bat for Windows facts): `webui` is read again
    for this one, so the user's flags are those of the webui-user file the UI really sources.
    """
    here = {"win32": "windows", "darwin": "darwin"}.get(sys.platform, "linux")
    if facts.system.os == here:
        return facts
    local = replace(facts, system=replace(facts.system, os=here))
    if webui is not None:
        from lowvram.world.detect.webui import probe_webui

        local = local.with_webui(probe_webui(webui, os_name=here))
    return local


def _gpu(facts: Facts, plan: Plan) -> Any:
    gpus = facts.usable_gpus
    if not gpus:
        return None
    if plan.gpu_index is not None:
        for gpu in gpus:
            if gpu.index == plan.gpu_index:
                return gpu
    return max(gpus, key=lambda g: g.vram_total_mb or 0)


def _target_size(plan: Plan, settings: TuneSettings) -> tuple[int, int]:
    if settings.width is not None and settings.height is not None:
        return settings.width, settings.height
    extra = plan.extra if isinstance(plan.extra, dict) else {}
    target = extra.get("target")
    if isinstance(target, dict):
        width, height = target.get("width"), target.get("height")
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            return width, height
    side = FAMILY_SIZES.get(plan.model_family or "", 512)
    return side, side


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    raw = _read_bytes(path)
    if raw is None:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _median_int(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return int(statistics.median(present)) if present else None

