"""`lowvram tune` on ComfyUI: --reserve-vram (and the load mode where the model is near the card's size)
measured by starting ComfyUI once per candidate (it reads both at start) and timing a small workflow
through its own API (docs/architecture.md#tune). The workflow loads the plan's model as
world/tune/comfy_workflow.py builds it: a single-file checkpoint, or a diffusion-model-only file (FLUX.1,
SD3, a GGUF) with its text encoders and VAE; --normalvram is measured too where this ComfyUI would turn
lowvram on by itself (`switches_to_lowvram`).

Each candidate: ComfyUI started as `launch` starts it (its venv's python, main.py, the plan's flags
less the ones the candidate sets) plus `--listen 127.0.0.1` on a free port, its output, temp and
user folders in a temp dir outside the tree (and its database in memory, where this version has
those flags), PYTHONDONTWRITEBYTECODE so no __pycache__ appears; one warm-up workflow and K measured
ones through POST /prompt, each timed from /history (its execution_start/execution_success
timestamps); then the whole process group stopped (ComfyUI installs no SIGINT handler: SIGTERM, then
SIGKILL after --stop-timeout). Whatever happens, what ComfyUI may write in the tree (user/, temp/,
output/, input/) is put back as it was and the temp dir removed; every probe is kept as an
observation with source `tuning`, `load_mode` and `reserve_vram_mb`, and the next plan takes the
same winner (core/policy/comfy_reserve.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.observations import Observation
from lowvram.core.policy.comfy_reserve import best_tuned, reserve_words
from lowvram.core.words import plural
from lowvram.world import paths
from lowvram.world.observation_log import append_observation
from lowvram.world.tune.comfy_workflow import ModelSource, model_source, workflow
from lowvram.world.tune.loopback import check_listening, free_port
from lowvram.world.tune.results import (
    LOOPBACK,
    Probe,
    Reporter,
    TuneError,
    TuneEvent,
    TuneResult,
    TuneSettings,
)
from lowvram.world.tune.snapshot import TreeSnapshot, stop_then_restore
from lowvram.world.tune.ui_api import ApiClient
from lowvram.world.tune.ui_process import UiProcess, wait_ready

if TYPE_CHECKING:
    from lowvram.core.facts import Facts
    from lowvram.core.plan import Plan
    from lowvram.world.fsutil import FileLock

ROAD = "comfyui"
RESERVES_GB = (None, 0.2, 0.8, 1.2, 1.6)  # None: no flag (ComfyUI's own 0.4 GB, 0.6 on Windows) first
MODE_FLAGS = {"lowvram": "--lowvram", "normalvram": "--normalvram", "novram": "--novram"}
VRAM_GROUP = ("--lowvram", "--normalvram", "--novram", "--highvram", "--gpu-only", "--cpu")
NEAR = (0.75, 1.25)  # the estimate's peak within this share of the usable VRAM: the load mode matters
WATCHED = ("user", "temp", "output", "input")  # what ComfyUI writes in its tree
RESTORED_COMFY = "ComfyUI's user/, temp/, output/ and input/ folders are as they were before tune"


@dataclass(frozen=True)
class Candidate:
    reserve_mb: int | None  # None: no --reserve-vram
    mode: str  # default | lowvram | normalvram

    def flags(self) -> tuple[str, ...]:
        out: tuple[str, ...] = (MODE_FLAGS[self.mode],) if self.mode in MODE_FLAGS else ()
        if self.reserve_mb is not None:
            out += ("--reserve-vram", f"{self.reserve_mb / 1024:.1f}")
        return out

    def words(self) -> str:
        return reserve_words(self.reserve_mb) + ("" if self.mode == "default" else f", --{self.mode}")


def plan_mode(args: tuple[str, ...]) -> str:
    return next((mode for mode, flag in MODE_FLAGS.items() if flag in args), "default")


def plan_reserve_mb(args: tuple[str, ...]) -> int | None:
    if "--reserve-vram" in args:
        i = args.index("--reserve-vram")
        with contextlib.suppress(IndexError, ValueError):
            return int(float(args[i + 1]) * 1024)
    return None


def reserve_candidates(plan: Plan) -> list[Candidate]:
    """The plan's own candidate first (what it runs now), then the sweep at the plan's load mode."""
    mode = plan_mode(plan.args)
    start = Candidate(plan_reserve_mb(plan.args), mode)
    # MiB rounded down, so that ComfyUI's flag (GiB, rounded up to 0.1: ui/base.reserve_gb) gives the GiB swept.
    sweep = [Candidate(None if gb is None else int(gb * 1024), mode) for gb in RESERVES_GB]
    return [start, *(c for c in sweep if c != start)]


def near_card(plan: Plan, vram_total_mb: int | None) -> bool:
    """The estimate's peak close to the VRAM there is: where ComfyUI's load mode can change the speed."""
    peak = plan.estimate.peak_mb
    if peak is None or not vram_total_mb:
        return False
    share = peak / max(1, vram_total_mb - plan.headroom_mb)
    return NEAR[0] <= share <= NEAR[1]


def other_modes(plan: Plan, user_args: tuple[str, ...], *, auto_lowvram: bool = False) -> list[str]:
    """The load modes worth one probe besides the plan's: none where the user's own flag picks one; no flag
    and --lowvram, and --normalvram where this ComfyUI would switch to lowvram by itself (`auto_lowvram`:
    elsewhere --normalvram is what it does anyway)."""
    if any(flag in user_args for flag in VRAM_GROUP):
        return []
    mine = plan_mode(plan.args)
    return [m for m in ("default", "lowvram", *(("normalvram",) if auto_lowvram else ())) if m != mine]


def switches_to_lowvram(tree: Path, vram_total_mb: int | None) -> bool:
    """Whether this ComfyUI turns lowvram on by itself on this card: older versions do on cards of 4 GB or
    less unless --normalvram is given (comfy/model_management.py: "...If you don't want this use:
    --normalvram"); v0.3.x no longer does, and there --normalvram changes nothing."""
    if vram_total_mb is None or vram_total_mb > 4096:
        return False
    source = tree / "comfy" / "model_management.py"
    try:
        with source.open("rb") as fh:
            text = fh.read(2 << 20).decode("utf-8", errors="replace")
    except OSError:
        return False
    return "use: --normalvram" in text and "4096" in text


def history_outcome(entry: Any) -> tuple[bool, str, float | None]:
    """(succeeded, why not, seconds from execution_start to execution_success) of one /history entry."""
    status = entry.get("status", {}) if isinstance(entry, dict) else {}
    messages = [m for m in status.get("messages", []) if isinstance(m, list) and len(m) == 2]
    stamps = {m[0]: m[1].get("timestamp") for m in messages if isinstance(m[1], dict)}
    if status.get("status_str") != "success":
        error: dict[str, Any] = next((m[1] for m in messages if m[0] in ("execution_error", "execution_interrupted")
                                      and isinstance(m[1], dict)), {})
        text = f"{error.get('exception_type', '')}: {error.get('exception_message', '')}" if error else ""
        if "out of memory" in text.lower() or "outofmemory" in text.lower():
            return False, "out of memory (ComfyUI's execution_error)", None
        return False, (text.strip(": \n") or f"ComfyUI reported {status.get('status_str') or 'no success'}")[:160], None
    start, end = stamps.get("execution_start"), stamps.get("execution_success")
    took = (end - start) / 1000.0 if isinstance(start, (int, float)) and isinstance(end, (int, float)) else None
    return True, "", took if took is None or took >= 0 else None


class ComfyTreeSnapshot:
    """What ComfyUI may write in its tree (user/, temp/, output/, input/): the entries there before tune,
    and the bytes of user/'s files (its settings and database); `restore` removes what appeared and puts
    changed user files back (docs/architecture.md#tune)."""

    MAX_SAVED = 64 << 20  # a user/ file larger than this is only checked, not saved

    def __init__(self, tree: Path) -> None:
        self.tree = tree
        self.entries: dict[str, set[str] | None] = {name: self._listing(tree / name) for name in WATCHED}
        self.saved: dict[str, tuple[bytes, int]] = {}
        for rel in sorted(self.entries.get("user") or ()):
            path = tree / "user" / rel
            with contextlib.suppress(OSError):
                if path.is_file() and not path.is_symlink() and path.stat().st_size <= self.MAX_SAVED:
                    self.saved[rel] = (path.read_bytes(), path.stat().st_mode & 0o7777)

    @staticmethod
    def _listing(root: Path) -> set[str] | None:
        if not root.is_dir() or root.is_symlink():
            return None
        out: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            out.update((rel / n).as_posix() for n in (*dirnames, *filenames))
        return out

    def restore(self) -> list[str]:
        problems: list[str] = []
        for name, before in self.entries.items():
            root = self.tree / name
            try:
                self._put_back(root, before, self.saved if name == "user" else {})
            except OSError as exc:
                problems.append(f"{root} could not be put back ({exc})")
        return problems

    @staticmethod
    def _put_back(root: Path, before: set[str] | None, saved: dict[str, tuple[bytes, int]]) -> None:
        if before is None:
            if root.is_dir() and not root.is_symlink():
                shutil.rmtree(root)
            return
        now = ComfyTreeSnapshot._listing(root) or set()
        for rel in sorted(now - before, key=lambda r: r.count("/")):  # shallowest first: a new folder goes whole
            path = root / rel
            if not os.path.lexists(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        for rel, (data, mode) in saved.items():
            path = root / rel
            with contextlib.suppress(FileNotFoundError):
                if path.read_bytes() == data:
                    continue
            from lowvram.world.fsutil import atomic_write_bytes

            atomic_write_bytes(path, data, mode)


def tuning_observation(probe: Probe, *, plan: Plan, checkpoint: str | None, driver: str | None,
                       vram_total_mb: int | None, size: tuple[int, int], steps: int, tag: str) -> Observation:
    return Observation(
        time=time.time(), source="tuning", checkpoint=checkpoint, family=plan.model_family,
        flags=tuple(_candidate_args(plan, Candidate(probe.reserve_vram_mb, probe.load_mode))), road=None,
        offload=plan.offload, device=probe.device, vram_total_mb=vram_total_mb, sit=probe.sit,
        width=size[0], height=size[1], batch=1, steps=steps, wall_s=probe.wall_s,
        images=1 if probe.wall_s is not None else None, ooms=probe.ooms, ok=probe.ok, reason=probe.reason,
        driver=driver, tag=tag, load_mode=probe.load_mode, reserve_vram_mb=probe.reserve_vram_mb)


def _candidate_args(plan: Plan, cand: Candidate) -> list[str]:
    """The plan's flags less the load mode and --reserve-vram, then the candidate's."""
    args: list[str] = []
    skip = False
    for arg in plan.args:
        if skip:
            skip = False
            continue
        if arg == "--reserve-vram":
            skip = True
            continue
        if arg.startswith("--reserve-vram=") or arg in MODE_FLAGS.values():
            continue
        args.append(arg)
    return [*args, *cand.flags()]


class _ComfyUi:
    """One candidate's ComfyUI: started with its flags (loopback, a free port, the scratch folders), its
    workflows run through /prompt and timed from /history, its process group stopped."""

    settings: TuneSettings
    report: Reporter
    lock: FileLock
    webui: Path
    plan: Plan
    facts: Facts
    source: ModelSource
    size: tuple[int, int]
    tag: str
    log_path: Path
    scratch: Path
    ui: UiProcess | None
    deadline: float
    nodes_checked = False  # the workflow's loader nodes were found in /object_info (checked at the first start)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def _measure(self, cand: Candidate) -> tuple[list[float], list[float], str, str | None]:
        """Start ComfyUI with the candidate, one warm-up and K measured workflows: (request walls, /history
        execution times, why it stopped, the device ComfyUI ran on)."""
        client = self.start(cand)
        device = _device(client)
        walls: list[float] = []
        took: list[float] = []
        for n in range(1 + self.settings.repeats):
            left = self.time_left()
            if left <= 0 and n > 0:
                break
            ok, why, seconds, wall = self._run_workflow(client, n, max(1.0, min(self.settings.request_timeout_s,
                                                                                  left)))
            if not ok:
                return walls, took, why, device
            if n > 0:
                walls.append(wall)
                if seconds is not None:
                    took.append(seconds)
        return walls, took, "", device

    def _run_workflow(self, client: ApiClient, n: int, timeout: float) -> tuple[bool, str, float | None, float]:
        graph = workflow(self.source, self.size[0], self.size[1], self.settings.steps, f"lowvram-tune-{n}")
        t0 = time.monotonic()
        status, body = client.post("/prompt", {"prompt": graph, "client_id": self.tag}, timeout=min(60.0, timeout))
        if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
            return False, f"POST /prompt answered {status}: {str(body)[:120]}", None, 0.0
        pid = str(body["prompt_id"])
        while time.monotonic() - t0 < timeout:
            if self.ui is not None and not self.ui.running():
                return False, f"ComfyUI exited ({self.ui.last_line() or 'no output'})", None, 0.0
            try:
                status, history = client.get(f"/history/{pid}", timeout=10.0)
            except OSError:
                history = None
            if isinstance(history, dict) and pid in history:
                ok, why, seconds = history_outcome(history[pid])
                return ok, why, seconds, time.monotonic() - t0
            time.sleep(0.1)
        return False, f"no result from /history within {timeout:.0f} s", None, 0.0

    def start(self, cand: Candidate) -> ApiClient:
        from lowvram.world.launch import build_launch

        port = free_port()
        spec = build_launch(replace(self.plan, args=tuple(_candidate_args(self.plan, cand))), self.facts, self.webui,
                            extra_args=(*self.settings.extra_args, *own_args(self.facts, self.scratch, port)), python=None)
        spec = replace(spec, stdin_closed=True, env_changes={**spec.env_changes, "PYTHONDONTWRITEBYTECODE": "1"})
        self.ui = UiProcess(spec, self.log_path, self.lock)
        client = ApiClient(port)
        self.report(TuneEvent("starting", f"starting ComfyUI ({client.base}) with {cand.words()}"))
        self.ui.start()
        seconds = _wait_ready_comfy(self.ui, client, min(self.settings.ready_timeout_s, max(1.0, self.time_left())),
                              self.report)
        check_listening(port)
        self.report(TuneEvent("ready", f"ComfyUI answered after {seconds:.1f} s"))
        if not self.nodes_checked:
            check_nodes(client, self.source, self.log_path)
            self.nodes_checked = True
        return client

    def stop(self) -> None:
        if self.ui is not None:
            self.report(TuneEvent("stopping", "stopping ComfyUI (SIGTERM to its process group, SIGKILL after "
                                              f"{self.settings.stop_timeout_s:.0f} s)"))
            self.ui.stop(self.settings.stop_timeout_s)
            self.ui = None


class ComfySession(_ComfyUi):
    """A tune on ComfyUI; the same face as session._Session: run(), restore(), probes, partial(), restored."""

    restored = RESTORED_COMFY

    def __init__(self, *, ctx: Any, facts: Facts, settings: TuneSettings, report: Reporter, lock: FileLock,
                 gpu: Any, size: tuple[int, int]) -> None:
        self.settings, self.report, self.lock, self.facts = settings, report, lock, facts
        self.webui, self.plan = Path(ctx.webui).resolve(), ctx.plan
        webui = facts.webui
        self.source = model_source(self.webui, webui, self.plan.model_family)  # refused here: nothing started
        self.checkpoint = webui.checkpoint_key if webui is not None else None
        self.driver = gpu.driver if gpu is not None else None
        self.vram_total_mb = gpu.vram_total_mb if gpu is not None else None
        self.size = size
        self.tag = f"tune-comfy-{int(time.time())}-{os.getpid()}"
        self.obs_path = paths.observations_path(self.webui)
        self.log_path = paths.webui_state_dir(self.webui) / "tune-ui.log"
        self.snapshot = TreeSnapshot.take(self.webui)
        self.tree = ComfyTreeSnapshot(self.webui)  # before anything starts: restore() puts it back
        self.scratch = Path(tempfile.mkdtemp(prefix="lowvram-tune-comfy-"))
        self.probes: list[Probe] = []
        self.saved = 0
        self.ui, self.deadline = None, time.monotonic() + settings.max_minutes * 60.0

    def run(self) -> TuneResult:
        w, h = self.size
        self.report(TuneEvent("plan", f"tuning ComfyUI at {self.webui} at {w}×{h}, "
                                      f"{plural(self.settings.steps, 'step')}, "
                                      f"{plural(self.settings.repeats, 'measured run')} per candidate, one ComfyUI "
                                      "start per candidate (it reads --reserve-vram and the load mode at start)"))
        self.report(TuneEvent("note", f"the workflow loads the model with {self.source.words()}"))
        done = self._sweep(reserve_candidates(self.plan))
        if done and near_card(self.plan, self.vram_total_mb):
            best = self.best()
            reserve = best.reserve_vram_mb if best is not None else None
            extra = [Candidate(reserve, m) for m in other_modes(
                self.plan, self.settings.extra_args, auto_lowvram=switches_to_lowvram(self.webui, self.vram_total_mb))]
            if extra:
                self.report(TuneEvent("note", "the estimate puts the model near this card's size: the load mode "
                                              "is measured too"))
            done = self._sweep(extra)
        why = (f"{plural(len(self.probes), 'candidate')} measured" if done
               else f"out of time after {plural(len(self.probes), 'candidate')}")
        return self._result(done, why)

    def _sweep(self, candidates: list[Candidate]) -> bool:
        for cand in candidates:
            if self.time_left() <= 0:
                return False
            self.probe(cand)
        return True

    def probe(self, cand: Candidate) -> Probe:
        self.report(TuneEvent("probing", cand.words()))
        try:
            walls, took, failure, device = self._measure(cand)
        finally:
            self.stop()
        probe = _judge(cand, walls, took, failure, device=device, steps=self.settings.steps)
        self.probes.append(probe)
        append_observation(self.obs_path, self._observation(probe))
        self.saved += 1
        self.report(TuneEvent("probe", probe=probe))
        return probe

    def restore(self) -> list[str]:
        problems = stop_then_restore(self.stop, self.tree.restore, self.snapshot.restore, name="ComfyUI")
        shutil.rmtree(self.scratch, ignore_errors=True)
        return problems

    def best(self) -> Probe | None:
        winner = best_tuned([self._observation(p) for p in self.probes])
        if winner is None:
            return None
        return next(p for p in self.probes if p.ok and p.reserve_vram_mb == winner.reserve_vram_mb
                    and p.load_mode == winner.load_mode)

    def _result(self, closed: bool, reason: str) -> TuneResult:
        mode, reserve = plan_mode(self.plan.args), plan_reserve_mb(self.plan.args)
        start = next((p for p in self.probes if p.load_mode == mode and p.reserve_vram_mb == reserve), None)
        return TuneResult(best=self.best(), start=start, probes=tuple(self.probes), closed=closed, reason=reason,
                          width=self.size[0], height=self.size[1], steps=self.settings.steps,
                          repeats=self.settings.repeats, roads=(ROAD,), webui=str(self.webui), saved=self.saved,
                          start_plan={"road": ROAD, "load_mode": mode, "reserve_vram_mb": reserve})

    def partial(self) -> TuneResult:
        return self._result(False, "interrupted")

    def _observation(self, probe: Probe) -> Observation:
        return tuning_observation(probe, plan=self.plan, checkpoint=self.checkpoint, driver=self.driver,
                                  vram_total_mb=self.vram_total_mb, size=self.size, steps=self.settings.steps,
                                  tag=self.tag)


def own_args(facts: Facts, scratch: Path, port: int) -> tuple[str, ...]:
    """Loopback, a free port, and ComfyUI's writable folders in the scratch dir (where this version
    has the flags); the user's --listen/--port are overridden (argparse keeps the last)."""
    from lowvram.ui.base import flags_for

    out, temp, user = scratch / "output", scratch / "temp", scratch / "user"
    for folder in (out, temp, user):
        folder.mkdir(exist_ok=True)
    webui = facts.webui
    from lowvram import ui as ui_mod

    flagset = flags_for(ui_mod.adapter("comfyui"), webui.version if webui else None,
                        webui.ui_flags if webui else None)[0]
    wanted = [("--output-directory", str(out)), ("--temp-directory", str(temp)), ("--user-directory", str(user)),
              ("--database-url", "sqlite:///:memory:"), ("--disable-auto-launch", None)]
    args: list[str] = ["--listen", LOOPBACK, "--port", str(port)]
    for flag, value in wanted:
        if flag in flagset:
            args += [flag] if value is None else [flag, value]
    return tuple(args)


def check_nodes(client: ApiClient, source: ModelSource, log_path: Path) -> None:
    """The loader nodes the workflow needs are in this ComfyUI (/object_info/<node> answers {} for one
    that is not: a custom node that failed to import, ComfyUI-GGUF without its `gguf` package)."""
    missing: list[str] = []
    for node in sorted({n["class_type"] for n in source.nodes().values()}):
        with contextlib.suppress(OSError):
            status, body = client.get(f"/object_info/{node}", timeout=10.0)
            if status == 200 and isinstance(body, dict) and node not in body:
                missing.append(node)
    if missing:
        gguf = any("GGUF" in node for node in missing)
        raise TuneError(f"ComfyUI has no {' or '.join(missing)} node" + (
            ": custom_nodes/ComfyUI-GGUF did not load" if gguf else ""),
            f"its output is in {log_path}" + (" (ComfyUI-GGUF needs the `gguf` package in ComfyUI's Python)"
                                              if gguf else ""))


def _judge(cand: Candidate, walls: list[float], took: list[float], failure: str, *, device: str | None,
           steps: int) -> Probe:
    common: dict[str, Any] = {"load_mode": cand.mode, "reserve_vram_mb": cand.reserve_mb, "device": device,
                              "walls": tuple(walls)}
    if failure or not walls:
        oom = "out of memory" in failure
        return Probe(ROAD, cand.reserve_mb or 0, None, False, failure or "no run measured", ooms=int(oom), **common)
    per_image = round(statistics.median(took or walls), 6)
    return Probe(ROAD, cand.reserve_mb or 0, round(per_image / steps, 6), True, sit_source="history",
                 wall_s=per_image, **common)


def _device(client: ApiClient) -> str | None:
    """cuda or cpu, from /system_stats (ComfyUI names its torch device there)."""
    with contextlib.suppress(OSError):
        status, body = client.get("/system_stats", timeout=10.0)
        devices = body.get("devices") if status == 200 and isinstance(body, dict) else None
        if isinstance(devices, list) and devices and isinstance(devices[0], dict):
            kind = str(devices[0].get("type", ""))
            return kind or None
    return None


def _wait_ready_comfy(ui: UiProcess, client: ApiClient, timeout: float, report: Reporter) -> float:
    """ComfyUI answers GET /system_stats once its server is up."""
    return wait_ready(ui, client, timeout, report, 0.2, path="/system_stats", name="ComfyUI", slow_start="")


def comfy_session(*, ctx: Any, facts: Facts, settings: TuneSettings, report: Reporter, lock: FileLock,
                  gpu: Any, size: tuple[int, int]) -> ComfySession:
    return ComfySession(ctx=ctx, facts=facts, settings=settings, report=report, lock=lock, gpu=gpu, size=size)
