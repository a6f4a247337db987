"""`lowvram tune`'s results and settings: what a run is asked for, what it measured, what it tells the CLI as it goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lowvram.core.errors import LowvramError, UsageError

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
    max_candidates: int | None = None  # Forge: at most this many candidates (None: forge.MAX_CANDIDATES)
    extra_args: tuple[str, ...] = ()  # ComfyUI: the user's own flags (after `--`), on every candidate's command line

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
    # Seconds per image, the whole job (--medvram's model moves included, which s/it leaves out):
    # the hook's wall_s of the measured jobs, else the API's wall time per request (batch 1).
    wall_s: float | None = None
    # ComfyUI (road "comfyui"): the candidate's load mode (default | lowvram | normalvram) and its
    # --reserve-vram in MiB (None: no flag, ComfyUI's own reserve).
    load_mode: str = ""
    reserve_vram_mb: int | None = None
    # Forge (road "forge"): reserve_mb is forge_inference_memory; its Swap Method and Swap Location.
    swap_method: str | None = None
    swap_location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"road": self.road, "reserve_mb": self.reserve_mb, "sit": self.sit, "ok": self.ok,
               "reason": self.reason, "walls": [round(w, 4) for w in self.walls], "sit_source": self.sit_source,
               "free_mb": self.free_mb, "overflow_mb": self.overflow_mb, "ooms": self.ooms,
               "layout_error": self.layout_error or None, "device": self.device, "wall_s": self.wall_s}
        if self.load_mode:
            out.update(load_mode=self.load_mode, reserve_vram_mb=self.reserve_vram_mb)
        if self.swap_method:
            out.update(forge_inference_memory=self.reserve_mb, forge_async_loading=self.swap_method,
                       forge_pin_shared_memory=self.swap_location)
        return out

    @property
    def speed(self) -> float | None:
        """What probes are compared on: wall time per image where measured, else s/it."""
        return self.wall_s if self.wall_s is not None else self.sit


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
        """How much faster the best is than the start: per image where both have a wall time, else per step."""
        if self.best is None or self.start is None:
            return None
        wall = self.start.wall_s is not None and self.best.wall_s is not None
        start, best = (self.start.wall_s, self.best.wall_s) if wall else (self.start.sit, self.best.sit)
        if not start or best is None:
            return None
        return round((start - best) / start * 100.0, 1)

    def to_dict(self) -> dict[str, Any]:
        def point(p: Probe | None) -> dict[str, Any] | None:
            if p is None:
                return None
            out: dict[str, Any] = {"road": p.road, "reserve_mb": p.reserve_mb, "sit": p.sit}
            if p.load_mode:
                out.update(load_mode=p.load_mode, reserve_vram_mb=p.reserve_vram_mb, wall_s=p.wall_s)
            if p.swap_method:
                out.update(forge_inference_memory=p.reserve_mb, forge_async_loading=p.swap_method,
                           forge_pin_shared_memory=p.swap_location, wall_s=p.wall_s)
            return out

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
