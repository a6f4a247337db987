"""The road: swap or resident, where both exist (docs/architecture.md#the-policy, "Two roads"), and the
offload the resident road overrides."""

from __future__ import annotations

from collections.abc import Sequence

from lowvram.core.facts import GpuFacts
from lowvram.core.observations import Observation
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, RoadChoice, Target, UiStep
from lowvram.core.policy.road_history import (
    NO_WALL,
    RunSetup,
    avoid_failed,
    failure_text,
    last_failures,
    measured_choice,
    road_history,
)
from lowvram.core.reserve import laid_out
from lowvram.core.words import RESIDENT, SWAP, road_words


def _tuned_road(observations: Sequence[Observation], checkpoint: str | None, gpu: GpuFacts | None,
                size: tuple[int, int]) -> tuple[str, str, str] | None:
    """`lowvram tune` measured both roads at the target size: its winner stands (docs/architecture.md#tune).

    Only tune's own probes count here; the hook's runs keep the median comparison
    (road_history.measured_choice).
    """
    from lowvram.core import search

    # A probe planned for the resident road whose layout did not run measured nothing about it.
    probes = [o for o in observations if o.source == "tuning" and laid_out(o)]
    if not probes:
        return None
    state = search.tuning_state(probes, checkpoint, gpu.driver if gpu else None, size)
    measured = {p.road for p in state.probes if p.sit is not None}
    if state.best is None or measured != {"swap", "resident"}:
        return None
    speed = (f"{state.best.wall_s:.3f} s/image at {size[0]}×{size[1]}" if state.best.wall_s is not None
             else f"{state.best.sit:.3f} s/it at {size[0]}×{size[1]}; s/it only: {NO_WALL}")
    return (state.best.road, "tuning",
            f"{road_words(state.best.road)}: `lowvram tune` measured both ways and this one was faster ({speed})")


def _resident_failed(observations: Sequence[Observation], checkpoint: str | None, gpu: GpuFacts | None,
                     setup: RunSetup | None) -> str | None:
    """Why the resident road's last run failed, or None when it did not."""
    history = road_history(observations, checkpoint, gpu.driver if gpu else None)
    failed = last_failures(history, "", setup).get("resident")
    return None if failed is None else failure_text(failed)


def _auto_road(observations: Sequence[Observation], checkpoint: str | None, gpu: GpuFacts | None, *,
               rung: str, target: tuple[int, int, int], setup: RunSetup | None) -> RoadChoice:
    """`--layout auto` where both roads exist: not a road that just failed, then tune's winner, then
    the faster measured like with like, else explore (docs/architecture.md#the-policy)."""
    driver = gpu.driver if gpu else None
    history = road_history(observations, checkpoint, driver)
    failed = last_failures(history, rung, setup)
    if failed:
        return avoid_failed(failed, rung)
    tuned = _tuned_road(observations, checkpoint, gpu, target[:2])
    if tuned is not None:
        return RoadChoice(*tuned)
    return measured_choice(history, rung, (*target, "cuda"))


def decide_road(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, *, spill_possible: bool, rung: str,
               checkpoint: str | None, target: Target, setup: RunSetup | None = None,
               whole_fits: bool = False) -> RoadChoice:
    """`whole_fits`: the swap road keeps the whole model on the GPU (offload none, and its estimate fits)."""
    facts, prof, overrides, gpu, vram_total = inp.facts, inp.prof, inp.overrides, g.gpu, g.vram_total
    ram_ok = bool(facts.system.ram_mb and vram_total and facts.system.ram_mb >= 2 * vram_total)
    resident_possible = u.key == "a1111" and spill_possible and ram_ok and gpu is not None and not g.cpu_mode
    why_no_resident = (
        "keeping the model in VRAM needs lowvram's layout hook, which runs on A1111 only" if u.key != "a1111" else
        "the driver here cannot spill VRAM into RAM (sysmem fallback off), which keeping the model in VRAM relies on"
        if not spill_possible else
        "no NVIDIA GPU" if gpu is None else
        f"RAM {facts.system.ram_mb} MiB is under 2 × VRAM, too little to keep the model in VRAM and spill into RAM"
        if not ram_ok else ""
    )
    layout_mode = overrides.layout or prof.layout.mode
    layout_src = "cli" if overrides.layout else "profile"
    asked = f"--layout {layout_mode}" if layout_src == "cli" else f"profile {prof.name} (layout {layout_mode})"
    if g.no_nvidia:
        return RoadChoice("swap", layout_src, "no NVIDIA GPU: nothing to keep in VRAM")
    if layout_mode == "off":
        return RoadChoice("swap", layout_src, f"{asked}: {SWAP}")
    if not resident_possible:
        if layout_mode == "on":
            b.warn(f"{asked} asked to {RESIDENT}, but {why_no_resident}")
        return RoadChoice("swap", "auto", f"{SWAP}: {why_no_resident}")
    if layout_mode == "on":
        if (failed := _resident_failed(inp.observations, checkpoint, gpu, setup)) is not None:
            b.warn(f"{asked}: the last run that kept the model in VRAM failed ({failed}); trying it again as asked")
        return RoadChoice("resident", layout_src, f"{asked}: {RESIDENT}")
    if rung == "none" and whole_fits:
        # The swap road already keeps the whole model on the GPU: the resident road (the same model in
        # VRAM, plus a reserve of all free VRAM and no empty_cache) cannot be faster, only hold VRAM.
        return RoadChoice("swap", "auto", f"{SWAP}, though here nothing is swapped: the whole model fits in VRAM "
                          "with no offload, so keeping it there with a reserve has nothing to win and would only hold "
                          "all free VRAM")
    auto = _auto_road(inp.observations, checkpoint, gpu, rung=rung,
                      target=(target.width, target.height, target.batch), setup=setup)
    if auto.warning:
        b.warn(auto.warning)
    return RoadChoice(auto.road, auto.source, auto.reason)


def record_offload_and_road(b: Builder, offload: tuple[str, str, str], road: RoadChoice) -> str:
    """The resident road keeps the whole model on the GPU; both decisions are recorded here."""
    rung, src, why = offload
    if road.road == "resident" and rung != "none":
        why = f"the whole model stays in VRAM ({RESIDENT}), so no offload (it would have been {rung})"
        rung, src = "none", road.source
    b.add("offload", rung, src, why)
    b.add("road", road.road, road.source, road.reason)
    return rung
