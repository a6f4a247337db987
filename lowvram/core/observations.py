"""Observations: what the hook (inside the UI), `reserve --add` and `tune` recorded, one JSON line each.

The pure part: the record, the rules on what it may say, and the parsing of the file's bytes. The
file itself (append-only JSON lines in the WebUI's state dir) is read and written by the edge
`observation_log.py`. Parsing skips a corrupt line with a
warning naming the file and the line and keeps the rest (docs/architecture.md#damaged-and-hostile-inputs): broken or cut-short JSON,
nesting too deep, numbers over Python's 4300-digit limit, not finite or over 2^40, wrong types, lone
surrogates. The first few damaged lines are named one by one, the rest counted in one more warning,
so a file of garbage never floods a plan. Observations only refine a plan: damage never stops one.
`encode_line` gives the one line a writer appends. The hook (patches/) writes the same format
without importing this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

SOURCES = ("hook", "manual", "tuning")
ROADS = ("swap", "resident")
SCHEMA = 1


@dataclass(frozen=True)
class Observation:
    """One generation (hook), one manual Task Manager reading, or one tuning probe."""

    time: float
    source: str  # hook | manual | tuning
    checkpoint: str | None = None  # markers.checkpoint_key(); None = WebUI-wide (manual)
    family: str | None = None
    flags: tuple[str, ...] = ()
    road: str | None = None  # swap | resident
    offload: str | None = None  # none | medvram-sdxl | medvram | lowvram | ...
    layout: bool = False  # the layout ran with this reserve
    reserve_mb: int | None = None
    free_mb: int | None = None  # free dedicated VRAM after the load, before any reserve
    overflow_mb: int | None = None  # shared memory used during generation
    peak_allocated_mb: int | None = None
    peak_reserved_mb: int | None = None
    vram_total_mb: int | None = None
    sit: float | None = None  # seconds per iteration
    width: int | None = None
    height: int | None = None
    batch: int | None = None
    steps: int | None = None
    ooms: int = 0
    ok: bool = True
    reason: str = ""
    driver: str | None = None
    # Added with the hook: how overflow was measured ("pdh" = Windows shared usage counter,
    # "estimate" = peak reserved + non-torch use − dedicated total, "manual" = Task Manager).
    overflow_source: str | None = None
    layout_s: float | None = None  # how long the layout took, when it ran before this job
    tag: str | None = None  # free text a caller put in the hook config (tune uses "tune")
    pid: int | None = None  # the UI process that recorded it
    # Added for the real UIs (issue 13). `layout_error`: why a planned layout did not happen (it
    # failed and was rolled back, or the hook refused it); a resident-road record with it set is a
    # failed resident run, not a resident measurement. `device`: "cuda" or "cpu", so runs on
    # different devices are never compared. `wall_s`: seconds per image, the whole job (model
    # moves of --medvram included) divided by `images`.
    layout_error: str | None = None
    device: str | None = None
    wall_s: float | None = None
    images: int | None = None
    # Added for tune on ComfyUI (issue 19). `load_mode`: the ComfyUI load mode a tuning probe ran
    # with ("default", "lowvram", "normalvram"); set only on ComfyUI's tuning records, which it marks.
    # `reserve_vram_mb`: its --reserve-vram in MiB, None = no flag (ComfyUI's own reserve).
    load_mode: str | None = None
    reserve_vram_mb: int | None = None
    # Added for tune on Forge (issue 19): the memory settings a Forge tuning probe ran with
    # (forge_inference_memory in MiB, Swap Method Queue/Async, Swap Location CPU/Shared). Knobs of one UI:
    # the offload ladder and the roads never learn from a record that has them (forge_knobs).
    forge_inference_mb: int | None = None
    forge_swap_method: str | None = None
    forge_swap_location: str | None = None
    # Added so what is learnt about a model on a GPU carries across UIs (issue 19 item 5). `gpu_uuid`: the
    # card's UUID, where the writer knows it (the hook on torch >= 2.2, `reserve --add`); compared through
    # gpu_uuid_key. `model_key`: markers.content_key of the model file (size + hash of its first bytes), the
    # same for a copy in another tree. `ui`: the UI that ran it, filled in by the reader for another tree's
    # records (world/observation_log.py, other_tree_runs).
    gpu_uuid: str | None = None
    model_key: str | None = None
    ui: str | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        if self.width is None or self.height is None:
            return None
        return (self.width, self.height)


def measured_road(obs: Observation) -> str | None:
    """The road this run really measured, or None when it measured neither.

    A record planned for the resident road counts as resident only when the layout really ran
    (the hook refused it, or it failed and was rolled back: then the model was not laid out and
    its s/it says nothing about the resident road).
    """
    if obs.road == "swap":
        return "swap"
    if obs.road == "resident" and obs.layout and not obs.layout_error:
        return "resident"
    return None


def run_failed(obs: Observation) -> bool:
    """The run did not do what its road promised: the job failed, ran out of memory, or its
    planned layout failed or was refused."""
    return (not obs.ok) or obs.ooms > 0 or (obs.road == "resident" and bool(obs.layout_error))


def gpu_uuid_key(uuid: str | None) -> str | None:
    """A GPU UUID compared across writers: NVML says "GPU-xxxxxxxx-…", torch's `props.uuid` the bare hex."""
    if not uuid or not uuid.strip():
        return None
    text = uuid.strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def model_evidence(obs: Observation) -> bool:
    """A run that says something about the model's memory on its card whatever UI ran it: a generation the
    hook measured on the GPU with none of one UI's own knobs in force (A1111's layout and its reserve tie
    the peak and any OOM to that reserve). Tuning probes sweep such knobs and manual readings are of the
    reserve: neither crosses to another UI."""
    return obs.source == "hook" and not obs.layout and obs.device in (None, "cuda") and not forge_knobs(obs)


def oom_run(obs: Observation) -> bool:
    """The run ran out of memory (not merely failed)."""
    reason = obs.reason.lower()
    return obs.ooms > 0 or (not obs.ok and ("oom" in reason or "out of memory" in reason))


@dataclass(frozen=True)
class OtherTreeRuns:
    """Runs of this model on this GPU recorded for another WebUI tree: evidence of the model's memory."""

    ui: str | None  # the tree's flavor key; None where the tree is gone or unknown
    title: str  # the UI's name on screen ("another WebUI" where unknown)
    webui: str | None  # its path, as its hook config says
    runs: tuple[Observation, ...]

    def describe(self) -> str:
        """'2 generations of this model on this GPU in A1111 at /path'."""
        n = len(self.runs)
        return (f"{n} generation{'s' if n != 1 else ''} of this model on this GPU in {self.title}"
                + (f" at {self.webui}" if self.webui else ""))


def comparable_key(obs: Observation) -> tuple[object, ...]:
    """Runs are compared only with runs of the same size, batch and device (like with like)."""
    return (obs.width, obs.height, obs.batch or 1, obs.device)


_INT_FIELDS = {"reserve_mb", "free_mb", "overflow_mb", "peak_allocated_mb", "peak_reserved_mb", "vram_total_mb",
               "width", "height", "batch", "steps", "pid", "images", "reserve_vram_mb"}
_FLOAT_FIELDS = {"sit", "layout_s", "wall_s"}
_STR_FIELDS = {"checkpoint", "family", "road", "offload", "driver", "overflow_source", "tag", "layout_error",
               "device", "load_mode"}
_INT_FIELDS = _INT_FIELDS | {"forge_inference_mb"}
_STR_FIELDS = _STR_FIELDS | {"forge_swap_method", "forge_swap_location"}
_STR_FIELDS = _STR_FIELDS | {"gpu_uuid", "model_key", "ui"}
_KNOWN = {f.name for f in fields(Observation)}
FORGE_KNOB_VALUES = {"forge_swap_method": ("Queue", "Async"), "forge_swap_location": ("CPU", "Shared")}


def forge_knobs(obs: Observation) -> bool:
    """A record of Forge's memory settings (a Forge tune probe): it teaches those settings only."""
    return obs.forge_inference_mb is not None


def observation_to_dict(obs: Observation) -> dict[str, Any]:
    """The JSON form of one line: `schema` first, then every field (None kept, so lines line up)."""
    data = asdict(obs)
    data["flags"] = list(obs.flags)
    return {"schema": SCHEMA, **data}


MAX_LINES_WARNED = 5  # damaged lines named one by one; the rest are counted in one more warning
MAX_NUMBER = float(1 << 40)  # MiB, pixels, steps, seconds: anything larger is damage, not a measurement


def _show(value: Any) -> str:
    try:
        return json.dumps(value)[:40]
    except (ValueError, TypeError, RecursionError):
        return type(value).__name__


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{key}` should be a number, not {_show(value)}")
    try:
        number = float(value)  # an int too large for a float raises OverflowError
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"`{key}` should be a finite number")
    if key != "time" and abs(number) > MAX_NUMBER:
        raise ValueError(f"`{key}` should be at most 2^40, not {_show(value)}")
    return number


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"`{key}` should be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"`{key}` holds a lone surrogate (\\ud800...), not text") from None
    return value


def observation_from_dict(data: Any) -> Observation:
    """Build an Observation from one parsed line; unknown keys are ignored, wrong types raise ValueError."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "time" not in data:
        raise ValueError("`time` is missing")
    source = data.get("source", "hook")
    if source not in SOURCES:
        raise ValueError(f"`source` should be one of {', '.join(SOURCES)}, not {_show(source)}")
    kwargs: dict[str, Any] = {"time": _number(data["time"], "time"), "source": source}
    for key, value in data.items():
        if key not in _KNOWN or key in ("time", "source") or value is None:
            continue
        if key in _INT_FIELDS:
            number = _number(value, key)
            if number < 0 and key != "pid":
                raise ValueError(f"`{key}` should be ≥ 0")
            kwargs[key] = int(number)
        elif key in _FLOAT_FIELDS:
            number = _number(value, key)
            if number < 0:
                raise ValueError(f"`{key}` should be ≥ 0")
            kwargs[key] = number
        elif key in _STR_FIELDS or key == "reason":
            kwargs[key] = _text(value, key)
        elif key in ("layout", "ok"):
            if not isinstance(value, bool):
                raise ValueError(f"`{key}` should be true or false")
            kwargs[key] = value
        elif key == "ooms":
            number = _number(value, key)
            if number < 0:
                raise ValueError("`ooms` should be ≥ 0")
            kwargs[key] = int(number)
        elif key == "flags":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError("`flags` should be a list of strings")
            kwargs[key] = tuple(_text(v, key) for v in value)
    for key, allowed in FORGE_KNOB_VALUES.items():  # lenient: a value Forge does not know is dropped, not the line
        if kwargs.get(key) is not None and kwargs[key] not in allowed:
            del kwargs[key]
    if kwargs.get("road") is not None and kwargs["road"] not in ROADS:
        raise ValueError(f"`road` should be swap or resident, not {json.dumps(kwargs['road'])[:40]}")
    return Observation(**kwargs)


@dataclass(frozen=True)
class LoadedObservations:
    items: tuple[Observation, ...]
    warnings: tuple[str, ...]


def parse_observations(raw: bytes, name: str, *, cut: bool = False) -> LoadedObservations:
    """Every line of `raw` that parses; each line that does not is named (by its number) in a warning.

    `name` is what the warnings call the file. `cut`: `raw` is the tail of a longer file and starts
    inside a line, so its first piece is dropped silently and the lines are not numbered.
    """
    warnings: list[str] = []
    lines = raw.split(b"\n")
    first_line = 1
    if cut:
        # The first piece is the tail of a line cut by the seek: drop it, and count lines from there.
        lines = lines[1:]
        first_line = 0
    items: list[Observation] = []
    damaged = 0
    for n, line in enumerate(lines, start=first_line):
        text = line.strip()
        if not text:
            continue
        where = f"{name} line {n}" if not cut else f"{name} (a recent line)"
        problem = None
        try:
            data = json.loads(text.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except (ValueError, RecursionError):  # JSONDecodeError, an int over Python's 4300-digit limit, nesting
            problem = "not valid JSON (a write cut short?)"
        else:
            try:
                items.append(observation_from_dict(data))
            except (ValueError, TypeError, RecursionError) as exc:
                problem = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        if problem is not None:
            damaged += 1
            if damaged <= MAX_LINES_WARNED:
                warnings.append(f"{where}: {problem}; skipped, the other lines are used")
    if damaged > MAX_LINES_WARNED:
        warnings.append(f"{name}: {damaged - MAX_LINES_WARNED} more damaged lines skipped "
                        "(delete the file to start learning afresh)")
    return LoadedObservations(tuple(items), tuple(warnings))


def encode_line(obs: Observation) -> bytes:
    """One record as the bytes of one line; ValueError on NaN/inf in a float field."""
    return (json.dumps(observation_to_dict(obs), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
