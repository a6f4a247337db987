"""Forge's memory settings as `lowvram tune` measured them (world/tune/forge.py saves each probe as an
observation with source `tuning` and the settings it ran with), and what a page load of Forge does to them.

Forge 2 has the GPU Weights slider: `forge_inference_memory` (MiB kept free for the computation; GPU Weights =
total − this), Swap Method (`forge_async_loading`: Queue | Async) and Swap Location (`forge_pin_shared_memory`:
CPU | Shared), all `shared.opts` keys kept in config.json. reForge (Forge 1's backend) has none of them, and
neither has Forge Neo: its memory management is ComfyUI's (backend/memory_management.py; `--reserve-vram` and
the load flags), and its modules_forge/main_entry.py and presets.py define no such option.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lowvram.core.observations import Observation, forge_knobs
from lowvram.core.policy.builder import Builder
from lowvram.core.words import plural

FORGE_SLIDER_UIS = ("forge",)  # the UIs with the GPU Weights slider (reForge and Forge Neo have none)
SWAP_METHODS = ("Queue", "Async")
SWAP_LOCATIONS = ("CPU", "Shared")
PAGE_LOAD = ("a browser page load of Forge sets Swap Method and Swap Location back to Queue and CPU "
             "(modules_forge/main_entry.py on_preset_change, in every UI preset): the value applied holds for "
             "API use and until the page is loaded; choose it again at the top of the page after each load")


@dataclass(frozen=True)
class TunedForge:
    """The fastest Forge settings tune measured for this checkpoint, card and size."""

    inference_mb: int
    swap_method: str | None
    swap_location: str | None
    speed: float  # seconds per image (the whole job), else s/it
    per_image: bool
    probes: int  # successful probes it was chosen from
    width: int
    height: int


def _speed(o: Observation) -> float | None:
    return o.wall_s if o.wall_s is not None else o.sit


def tuned_forge(observations: Sequence[Observation], *, checkpoint: str | None, size: tuple[int, int],
                vram_total_mb: int | None) -> TunedForge | None:
    """The fastest successful Forge tuning probe of this checkpoint (or a WebUI-wide one) at `size` on a card
    of this size, among the probes of the latest tune that measured there; None where tune measured none."""
    runs = [o for o in observations if o.source == "tuning" and forge_knobs(o) and o.ok and not o.ooms
            and _speed(o) is not None and (checkpoint is None or o.checkpoint in (None, checkpoint))
            and o.size == size and (vram_total_mb is None or o.vram_total_mb in (None, vram_total_mb))]
    if not runs:
        return None
    latest = max(runs, key=lambda o: o.time)
    same = [o for o in runs if o.device == latest.device and o.steps == latest.steps]
    per_image = all(o.wall_s is not None for o in same)
    best = min(same, key=lambda o: ((o.wall_s if per_image else o.sit) or 0.0, -o.time))
    assert best.forge_inference_mb is not None
    return TunedForge(inference_mb=best.forge_inference_mb, swap_method=best.forge_swap_method,
                      swap_location=best.forge_swap_location, speed=(best.wall_s if per_image else best.sit) or 0.0,
                      per_image=per_image, probes=len(same), width=size[0], height=size[1])


def record_tuned(b: Builder, t: TunedForge, *, estimated: int) -> int:
    """The tuned settings as decisions (source `tuning`); returns the inference memory."""
    unit = "s/image" if t.per_image else "s/it"
    measured = (f"the fastest of {plural(t.probes, 'probe')} `lowvram tune` measured at {t.width}×{t.height} "
                f"({t.speed:.3f} {unit})")
    b.add("forge_inference_memory", t.inference_mb, "tuning",
          f"memory Forge keeps free for the computation: {measured}; the estimate alone would keep {estimated} MiB")
    for setting, value, what in (("forge_async_loading", t.swap_method, "Swap Method"),
                                 ("forge_pin_shared_memory", t.swap_location, "Swap Location")):
        if value is None:
            continue
        why = f"{what} {value}: {measured}"
        if value in ("Async", "Shared"):
            why += f"; {PAGE_LOAD}"
        b.add(setting, value, "tuning", why)
    return t.inference_mb
