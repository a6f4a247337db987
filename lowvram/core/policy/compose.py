"""`plan()`: the decision steps composed in the order `lowvram plan` shows their settings.

Each step records its Decisions on one Builder and lives in the module named for what it decides;
docs/architecture.md#the-policy gives each rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lowvram.core.facts import Facts
from lowvram.core.observations import Observation, OtherTreeRuns
from lowvram.core.plan import EstimateSummary, ExtensionSpec, HookPlan, Overrides, Plan, ReservePlan, TcmallocPlan
from lowvram.core.policy.attention import decide_attention
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, Merge, Target, UiStep
from lowvram.core.policy.comfy_reserve import load_mode_flags, tuned_load_mode
from lowvram.core.policy.dit import (
    decide_comfy_reserve,
    decide_fast_fp8,
    decide_forge_memory,
    decide_model_format,
    decide_streaming,
)
from lowvram.core.policy.environment import decide_allocator, decide_env, decide_tcmalloc, decide_torch_install
from lowvram.core.policy.estimate import Fits, decide_estimate
from lowvram.core.policy.evidence import decide_evidence
from lowvram.core.policy.extensions import decide_extensions
from lowvram.core.policy.family import FamilyChoice, decide_family, decide_profile, decide_target
from lowvram.core.policy.flags import checked_against, decide_flags, decide_ui, merge_user_flags
from lowvram.core.policy.hardware import decide_device_flag, decide_gpu, decide_headroom, decide_sysmem_fallback
from lowvram.core.policy.offload import decide_offload, map_to_ui_rung, recent_runs, run_setup
from lowvram.core.policy.precision import decide_precision
from lowvram.core.policy.reserve import decide_hook, decide_reserve
from lowvram.core.policy.road import decide_road, record_offload_and_road
from lowvram.core.policy.road_history import road_history
from lowvram.core.profiles import ResolvedProfile, Selection
from lowvram.ui import UiSettings


def plan(
    facts: Facts,
    resolved: ResolvedProfile,
    observations: Sequence[Observation],
    overrides: Overrides,
    *,
    hook_config_path: str | None,
    webui_path: str | None,
    registry: Mapping[str, ExtensionSpec],
    family: FamilyChoice | None = None,
    selection: Selection | None = None,
    xformers_builds: Mapping[str, str] | None = None,
    other_runs: Sequence[OtherTreeRuns] = (),
) -> Plan:
    """Decide everything for one WebUI, one step per setting in the order `lowvram plan` shows them;
    see docs/architecture.md#the-policy for each rule."""
    b = Builder()
    inp = Inputs(facts, resolved, observations, overrides, webui_path, xformers_builds)
    decide_profile(b, inp, selection)
    u = decide_ui(b, inp)
    fam = decide_family(b, inp, family)
    g = decide_gpu(b, inp, u, fam)
    fallback = decide_sysmem_fallback(b, inp)
    attention = decide_attention(b, inp, u, g)
    unet_prec, vae_prec, ui_vae = decide_precision(b, inp, g, ui_key=u.key, family=fam)  # ui_vae: as the flags spell it
    target = decide_target(inp, fam)
    rungs, tuned = u.ui.rungs(fam, u.version), tuned_load_mode(inp, u, g, target)  # tuned: ComfyUI's load mode
    checkpoint = facts.webui.checkpoint_key if facts.webui else None
    fits = decide_evidence(b, other_runs, g, Fits(fam, g, target, unet=unet_prec, vae=vae_prec, attention=attention,
                           ui_key=u.key, weight_format=decide_model_format(b, inp, u, g, fam)))  # + other UIs' runs
    setup = run_setup(u, fam, rungs, attention=attention, unet=unet_prec, vae=ui_vae)
    rung, rung_src, rung_why = decide_offload(b, inp, g, rungs=rungs, fits=fits, spill_possible=fallback == "on",
                                              recent=recent_runs(observations, checkpoint), setup=setup, tuned=tuned,
                                              history=road_history(observations, checkpoint,
                                                                   g.gpu.driver if g.gpu else None))
    rung, rung_why = map_to_ui_rung(rung, rung_why, u, g, rungs)
    road = decide_road(b, inp, u, g, spill_possible=fallback == "on", rung=rung, checkpoint=checkpoint, target=target,
                       setup=setup, whole_fits=rung == "none" and fits("none") is True)
    offload = record_offload_and_road(b, (rung, rung_src, rung_why), road)
    reserve = decide_reserve(b, inp, g, road.road, checkpoint=checkpoint, target=target)
    hook = decide_hook(b, inp, u, reserve)
    alloc_conf = decide_allocator(b, inp, reserve)
    tc, tc_env = decide_tcmalloc(b, inp, u)
    device_index = decide_device_flag(b, u, g)
    plan_args = decide_flags(b, inp, u, UiSettings(
        offload="none" if g.foreign else offload, attention=attention,
        unet_precision="half" if g.foreign else unet_prec, vae_precision=ui_vae,
        device_index=device_index, headroom_mb=decide_comfy_reserve(b, inp, u, g, fam=fam, checkpoint=checkpoint),
        family=fam, fast_fp8=decide_fast_fp8(b, u, g, fits.weight_format))) + load_mode_flags(tuned, offload)
    m = merge_user_flags(b, inp, u, plan_args, device_index=device_index, offload=offload, attention=attention)
    exts = decide_extensions(b, inp, u, g, registry)
    estimate = decide_estimate(b, fam, u, g, t=target, fits=fits, offload=m.offload, road=road.road, rungs=rungs,
                               unet=unet_prec, vae=vae_prec, attention=m.attention)
    decide_headroom(b, inp, u, g, forge_inference_mb=decide_forge_memory(
        b, inp, u, g, fits, row=decide_streaming(b, inp, u, g, fam=fam, fits=fits)))
    env = decide_env(b, u, g, m, tc_env=tc_env, alloc_conf=alloc_conf, hook=hook,
                     hook_config_path=hook_config_path)
    env.update(decide_torch_install(b, inp, u, g))
    return _assemble(b, inp, u, g, m, fam=fam, road=road.road, reserve=reserve, hook=hook, tc=tc, exts=exts,
                     estimate=estimate, env=env, extra=_extra(inp, u, target, fallback, selection))


def _assemble(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, m: Merge, *, fam: str, road: str,
              reserve: ReservePlan, hook: HookPlan, tc: TcmallocPlan, exts: Sequence[ExtensionSpec],
              estimate: EstimateSummary, env: dict[str, str], extra: dict[str, Any]) -> Plan:
    """The Plan the steps decided, with every Decision and warning in the order they were made."""
    gpu = g.gpu
    return Plan(
        profile=inp.prof.name,
        ui=u.key,
        webui=inp.webui_path,
        args=tuple(m.plan_args),
        env=env,
        tcmalloc=tc,
        extensions=tuple(exts),
        road=road,
        reserve=reserve,
        headroom_mb=g.room,
        hook=hook,
        estimate=estimate,
        decisions=tuple(b.decisions),
        warnings=tuple(b.warnings),
        model_family=fam,
        offload=m.offload,
        attention=m.attention,
        merge=m.merge,
        user_args_dropped=tuple(m.user_dropped),
        user_args_kept=tuple(m.user_kept) if m.merge == "assign" else (),
        plan_args_dropped=tuple(m.plan_dropped),
        gpu_index=gpu.index if gpu else None,
        gpu_uuid=gpu.uuid if gpu else None,
        extra=extra,
    )


def _extra(inp: Inputs, u: UiStep, t: Target, fallback: str, selection: Selection | None) -> dict[str, Any]:
    prof = inp.prof
    extra: dict[str, Any] = {
        "target": {"width": t.width, "height": t.height, "batch": t.batch, "hires_scale": t.hires},
        "profile_chain": list(inp.resolved.chain),
        "ui_version": u.version,
        "flags_checked_against": checked_against(inp, u),
        "sysmem_fallback": fallback,
        # The hook config reads this (hookconfig.build_hook_config): the order the layout moves tensors back in.
        "layout_order": prof.layout.order,
        "layout_model_first": prof.layout.model_first,
    }
    if selection is not None:
        extra["selection"] = {"name": selection.name, "reason": selection.reason,
                              "others_matched": list(selection.others_matched)}
    return extra
