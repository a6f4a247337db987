"""The resident road's reserve (fixed by the profile or learned, lowvram.core.reserve) and the hook that
observes every run and lays the reserve out."""

from __future__ import annotations

from collections.abc import Sequence

from lowvram.core.estimate import memory as est
from lowvram.core.facts import GpuFacts
from lowvram.core.observations import Observation
from lowvram.core.plan import HookPlan, ReservePlan
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, Target, UiStep
from lowvram.core.reserve import compute_reserve
from lowvram.core.words import SWAP


def decide_reserve(b: Builder, inp: Inputs, g: GpuStep, road: str, *, checkpoint: str | None,
                   target: Target) -> ReservePlan:
    prof = inp.prof
    if road == "resident":
        if isinstance(prof.layout.reserve, int):
            reserve = ReservePlan("fixed", prof.layout.reserve, True, source="profile",
                                  reason=f"fixed by profile {prof.name}")
        else:
            reserve = _reserve(inp.observations, checkpoint, g.vram_total, g.gpu, (target.width, target.height))
    else:
        why = ("no NVIDIA GPU, so no reserve is needed" if g.no_nvidia
               else f"the plan is to {SWAP}, so nothing should spill and no reserve is needed")
        reserve = ReservePlan("off", 0, False, source="none", reason=why)
    b.add("reserve", reserve.mb, reserve.source if reserve.source != "none" else "auto", reserve.reason)
    return reserve


def _reserve(observations: Sequence[Observation], checkpoint: str | None, vram_total: int | None,
             gpu: GpuFacts | None, size: tuple[int, int]) -> ReservePlan:
    result = compute_reserve(observations, checkpoint=checkpoint, vram_total_mb=vram_total,
                             cuda_context_mb=est.CUDA_CONTEXT_MB, driver=gpu.driver if gpu else None, size=size)
    return ReservePlan(
        mode="auto",
        mb=int(result.reserve_mb),
        applied=True,
        free_dedicated_mb=result.free_dedicated_mb,
        overflow_mb=result.overflow_mb,
        clamped_by=result.clamped_by,
        source=result.source,
        reason=result.reason,
    )


def decide_hook(b: Builder, inp: Inputs, u: UiStep, reserve: ReservePlan) -> HookPlan:
    overrides = inp.overrides
    if u.key != "a1111":
        hook = HookPlan(False, f"the layout hook runs on A1111 only ({u.ui.title} moves weights itself)")
    elif overrides.no_hook:
        hook = HookPlan(False, "--no-hook")
    else:
        hook = HookPlan(True, "records every generation, so the offload level and the reserve learn from it"
                        + ("; sets the reserve aside in VRAM" if reserve.applied
                           else "; this plan has no reserve to set aside"))
    b.add("hook", hook.enabled, "cli" if overrides.no_hook else "auto", hook.reason)
    return hook
