"""ComfyUI's --reserve-vram: only from evidence (a tune, a run that ran out of memory), never by default.

What ComfyUI does by itself (comfy/model_management.py, v0.3.64): at every model load it measures the
free memory (what other programs hold is already out of it), keeps `minimum_inference_memory()` =
0.8 GiB + EXTRA_RESERVED_VRAM free for the computation and loads only the weights that fit beside it,
streaming the rest per layer (NORMAL_VRAM and LOW_VRAM alike). EXTRA_RESERVED_VRAM is 400 MiB (600 MiB on
Windows, 700 MiB there on 16 GB+ cards); `--reserve-vram X` only replaces it with X GiB. So writing
what other programs hold into --reserve-vram counts them twice. A reserve is set only from
evidence: the fastest one `lowvram tune` measured (source `tuning`), or what other programs hold
kept free after a run of this model ran out of memory (source `observations`).

`tuned_runs` and `best_tuned` are also what tune itself names its winner with (world/tune/comfy.py),
so tune's verdict and the next plan agree. Where that tune measured more than one load mode (the model
near the card's size), the plan runs the winner's mode too (`tuned_load_mode`): the offload step
(policy/offload.py) takes the rung it names (--lowvram is ComfyUI's lowvram rung; no flag and
--normalvram are its "none"), and `load_mode_flags` adds --normalvram, which no rung renders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lowvram.core.observations import Observation
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, Target, UiStep

TOLERANCE = 0.03  # probes within 3 % of the fastest are as fast: no flag, else the larger reserve, wins
LOAD_MODES = ("default", "lowvram", "normalvram")


def comfy_default_reserve_mb(os_name: str, vram_total_mb: int | None) -> int:
    """EXTRA_RESERVED_VRAM, what ComfyUI keeps free without --reserve-vram."""
    if os_name != "windows":
        return 400
    return 700 if vram_total_mb is not None and vram_total_mb > 15 * 1024 else 600


def reserve_words(reserve_mb: int | None) -> str:
    """A candidate as the user would type it."""
    return "no --reserve-vram (ComfyUI's own)" if reserve_mb is None else f"--reserve-vram {reserve_mb / 1024:.1f}"


def is_comfy_tuning(obs: Observation) -> bool:
    return obs.source == "tuning" and obs.load_mode in LOAD_MODES


def tuned_runs(observations: Sequence[Observation], *, checkpoint: str | None, driver: str | None,
               size: tuple[int, int] | None) -> list[Observation]:
    """The probes of the latest ComfyUI tune of this checkpoint and driver (at `size` where one was
    tuned there): probes of one run were measured alike, older runs may describe another setup."""
    mine = [o for o in observations if is_comfy_tuning(o)
            and (checkpoint is None or o.checkpoint in (None, checkpoint))
            and (driver is None or o.driver in (None, driver))]
    sized = [o for o in mine if size is not None and o.size == size]
    runs = sized or mine
    if not runs:
        return []
    latest = max(runs, key=lambda o: o.time).tag
    return [o for o in runs if o.tag == latest]


def _speed(obs: Observation) -> float | None:
    return obs.wall_s if obs.wall_s is not None else obs.sit


def best_tuned(runs: Sequence[Observation]) -> Observation | None:
    """The fastest probe that succeeded; among those within TOLERANCE of it, ComfyUI's own default
    (no flag changes nothing), else the largest reserve (as fast, and safer when other programs grow)."""
    ok = [o for o in runs if o.ok and o.ooms == 0 and _speed(o) is not None]
    if not ok:
        return None
    fastest = min(_speed(o) or 0.0 for o in ok)
    close = [o for o in ok if (_speed(o) or 0.0) <= fastest * (1 + TOLERANCE)]
    return min(close, key=lambda o: (o.reserve_vram_mb is not None, o.load_mode != "default",
                                     -(o.reserve_vram_mb or 0), _speed(o) or 0.0))


@dataclass(frozen=True)
class TunedMode:
    """The load mode the latest tune measured fastest, where it measured more than one."""

    mode: str  # default | lowvram | normalvram
    rung: str  # the offload rung that spells it: lowvram, else none
    reason: str


def tuned_load_mode(inp: Inputs, u: UiStep, g: GpuStep, target: Target) -> TunedMode | None:
    """The fastest load mode of the latest ComfyUI tune of this model and driver at the plan's target
    (best_tuned, the rule its reserve comes from), where that tune measured more than one mode; else None
    (the mode was not tuned)."""
    if u.key != "comfyui" or g.gpu is None or g.cpu_mode or g.foreign:
        return None
    checkpoint = inp.facts.webui.checkpoint_key if inp.facts.webui else None
    runs = tuned_runs(inp.observations, checkpoint=checkpoint, driver=g.gpu.driver, size=(target.width, target.height))
    modes = sorted({o.load_mode or "default" for o in runs})
    best = best_tuned(runs) if len(modes) > 1 else None
    if best is None or best.load_mode is None:
        return None
    at = f"{best.width}×{best.height}" if best.size else "the tuned size"
    speed = f"{best.wall_s:.2f} s/image" if best.wall_s is not None else f"{best.sit or 0.0:.3f} s/it"
    tried = ", ".join("no load-mode flag" if m == "default" else f"--{m}" for m in modes)
    mode = "no load-mode flag" if best.load_mode == "default" else f"--{best.load_mode}"
    why = (f"`lowvram tune` measured {mode} fastest at {at} ({speed}; it tried {tried}, the model being near "
           "this card's size)")
    if best.load_mode == "normalvram":
        why += ": --normalvram keeps ComfyUI from switching to lowvram by itself on this card"
    return TunedMode(best.load_mode, "lowvram" if best.load_mode == "lowvram" else "none", why)


def load_mode_flags(tuned: TunedMode | None, rung: str) -> list[str]:
    """--normalvram where the tuned mode is it and the plan runs the rung it belongs to (no rung renders it)."""
    return ["--normalvram"] if tuned is not None and tuned.mode == "normalvram" and rung == tuned.rung else []


def _oom(obs: Observation) -> bool:
    reason = obs.reason.lower()
    return obs.ooms > 0 or (not obs.ok and ("out of memory" in reason or "oom" in reason))


def ran_out(observations: Sequence[Observation], checkpoint: str | None) -> list[Observation]:
    """Runs of this model that ran out of memory (tune's own candidates are not evidence: it tries
    reserves that may fail, and its verdict already weighs them)."""
    return [o for o in observations if (checkpoint is None or o.checkpoint in (None, checkpoint))
            and not is_comfy_tuning(o) and _oom(o)]


def decide_comfy_reserve(b: Builder, inp: Inputs, g: GpuStep, *, checkpoint: str | None,
                         size: tuple[int, int]) -> int | None:
    """The `reserve_vram` decision (MiB for ComfyUI's --reserve-vram, None = no flag)."""
    gpu = g.gpu
    own = comfy_default_reserve_mb(inp.facts.system.os, g.vram_total)
    best = best_tuned(tuned_runs(inp.observations, checkpoint=checkpoint, driver=gpu.driver if gpu else None,
                                 size=size))
    if best is not None:
        at = f"{best.width}×{best.height}" if best.size else "the tuned size"
        speed = f"{best.wall_s:.2f} s/image" if best.wall_s is not None else f"{best.sit or 0.0:.3f} s/it"
        b.add("reserve_vram", best.reserve_vram_mb, "tuning",
              f"`lowvram tune` measured {reserve_words(best.reserve_vram_mb)} fastest at {at} ({speed})"
              + ("" if best.load_mode == "default" else f", with --{best.load_mode}"))
        return best.reserve_vram_mb
    oom = ran_out(inp.observations, checkpoint)
    if oom:
        b.add("reserve_vram", g.room, "observations",
              f"{len(oom)} run(s) of this model ran out of memory: --reserve-vram keeps what other programs hold "
              f"({g.room} MiB) free beside ComfyUI's measured budget")
        return g.room
    b.add("reserve_vram", None, "auto",
          "no --reserve-vram: ComfyUI sizes each load from the memory it measures free (what other programs hold "
          f"is already out of it) and keeps 0.8 GiB + its own {own} MiB free for the computation; the flag would "
          f"only replace those {own} MiB, so what other programs hold would count twice. No run of this model ran "
          "out of memory and none was tuned, so there is no evidence to keep more free (`lowvram tune` measures "
          "whether another reserve is faster)")
    return None
