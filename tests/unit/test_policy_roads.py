"""Choosing the road from observations (docs/architecture.md#the-policy, "Two roads", issue 13 §1 and §3).

Never a road whose last run failed; swap and resident compared only like with like (same size,
batch and device, the swap side on the plan's rung, layouts that really ran, no failed runs).
"""

from __future__ import annotations

from typing import Any

from lowvram.core import policy
from lowvram.core.facts import Facts
from lowvram.core.observations import Observation
from lowvram.core.plan import Overrides, Plan
from lowvram.world import profile_files
from lowvram.world.plan_inputs import load_registry
from tests.fixtures.facts_matrix import MACHINES, with_webui

CKPT = "sdxl.safetensors|100|1700000000"
WIN8 = with_webui(MACHINES["rtx4060-8gb-win"], "a1111", "sdxl")  # ladder: medvram-sdxl; target 1024×1024
RUNG = "medvram-sdxl"
STORAGE_ERROR = "AttributeError: 'UntypedStorage' object has no attribute 'to'"
NO_WALL = "; s/it only: older records have no wall time per image, which would count --medvram's model moves"


def run(observations: list[Observation], facts: Facts = WIN8, **overrides: Any) -> Plan:
    ov = Overrides(**overrides)
    fam = policy.resolve_family(facts, ov, None)
    sel = profile_files.select_profile(facts, fam.family, gpu=policy.gpu_for(facts, ov), use_largest_gpu=False)
    return policy.plan(facts, profile_files.load_profile(sel.name), observations, ov, hook_config_path="/state/hook.json",
                       webui_path="/srv/webui", registry=load_registry(), family=fam, selection=sel)


def swap(t: float, sit: float | None = 2.0, *, offload: str = RUNG, size: int = 1024, device: str | None = "cuda",
         **kw: Any) -> Observation:
    return Observation(time=t, source=kw.pop("source", "hook"), checkpoint=CKPT, family="sdxl", road="swap",
                       offload=offload, sit=sit, width=size, height=size, batch=1, device=device, **kw)


def resident(t: float, sit: float | None = 1.5, *, size: int = 1024, device: str | None = "cuda",
             layout: bool = True, **kw: Any) -> Observation:
    kw.setdefault("reserve_mb", 0 if layout else None)
    return Observation(time=t, source=kw.pop("source", "hook"), checkpoint=CKPT, family="sdxl", road="resident",
                       offload="none", layout=layout, sit=sit, width=size, height=size, batch=1, device=device, **kw)


def road(plan: Plan) -> tuple[str, str, str]:
    d = plan.decision("road")
    assert d is not None
    return plan.road, d.source, d.reason


def test_the_fixture_plans_the_rung_these_tests_assume() -> None:
    assert run([]).offload == RUNG and run([]).road == "swap"


# -- 1. never a road whose last run failed -----------------------------------------------------------


def test_a_failed_layout_is_not_explored_again() -> None:
    # Issue 13 §1: the layout failed on torch 2.1.2, the job failed; the next plan must not go back.
    failed = resident(2, None, layout=False, layout_error=STORAGE_ERROR, ok=False, reason=STORAGE_ERROR)
    chosen, source, why = road(run([swap(1), failed]))
    assert (chosen, source) == ("swap", "observations")
    assert why.startswith("swap parts of the model to RAM: the last run that kept the model in VRAM failed "
                          "(layout failed: AttributeError")
    assert "--layout on tries that again" in why


def test_a_refused_layout_whose_job_went_on_is_a_failed_resident_run() -> None:
    # The hook refused the layout and the job ran without it, fast: not a resident measurement.
    refused = resident(2, 0.5, layout=False, layout_error="refused: no CUDA device")
    chosen, _, why = road(run([swap(1), refused]))
    assert chosen == "swap" and "layout failed: refused: no CUDA device" in why


def test_a_resident_job_that_failed_for_any_reason_turns_the_plan_back() -> None:
    ran = [swap(1), resident(2, 1.5), resident(3, None, ok=False, reason="RuntimeError: Expected all tensors "
                                                                        "to be on the same device")]
    chosen, source, why = road(run(ran))
    assert (chosen, source) == ("swap", "observations")
    assert "kept the model in VRAM failed (RuntimeError: Expected all tensors" in why


def test_a_later_success_on_the_road_clears_its_failure() -> None:
    ran = [swap(1), resident(2, None, ok=False, reason="RuntimeError"), resident(3, 1.5)]
    chosen, source, why = road(run(ran))
    assert (chosen, source) == ("resident", "observations") and why.startswith("keep the model in VRAM and reserve memory, the faster way measured")


def test_a_failure_is_not_forgotten_behind_ten_swap_runs() -> None:
    ran = [resident(1, None, ok=False, reason="RuntimeError: boom")] + [swap(t) for t in range(2, 20)]
    assert road(run(ran))[0] == "swap"
    assert "kept the model in VRAM failed (RuntimeError: boom)" in road(run(ran))[2]


def test_a_failed_swap_run_on_the_plan_rung_sends_the_plan_to_the_resident_road() -> None:
    # The rung pinned (--offload), so the ladder cannot step off it: the road does.
    failed = swap(1, None, ok=False, reason="RuntimeError: NaN in the VAE")
    chosen, source, why = road(run([failed], offload=RUNG))
    assert (chosen, source) == ("resident", "observations")
    assert why == (f"keep the model in VRAM and reserve memory: the last run swapping to RAM (offload {RUNG}) failed "
                   "(RuntimeError: NaN in the VAE); until flags, model or driver change")
    # With the ladder free, the failed rung is left instead, and the swap road one level down is tried.
    plan = run([failed])
    off = plan.decision("offload")
    assert plan.offload == "lowvram" and off is not None and off.reason == (
        f"{RUNG} failed in the last run (RuntimeError: NaN in the VAE at 1024×1024); "
        "using lowvram until flags, model or driver change")


def test_both_roads_failed_takes_the_swap_road_and_warns() -> None:
    ran = [swap(1, None, ok=False, reason="RuntimeError: NaN"), resident(2, None, ok=False, reason="boom")]
    plan = run(ran, offload=RUNG)
    chosen, _, why = road(plan)
    assert chosen == "swap" and plan.offload == RUNG and "the last runs both ways failed" in why
    assert any("both ways failed" in w and "planned to swap parts of the model to RAM" in w for w in plan.warnings)


def test_the_oom_ladder_still_steps_down_beside_a_failed_resident_road() -> None:
    # An OOM on medvram-sdxl moves the swap road to lowvram (a different swap road, not failed yet).
    plan = run([swap(1, None, ooms=1, ok=False, reason="out of memory"),
                resident(2, None, layout=False, layout_error=STORAGE_ERROR, ok=False)])
    assert plan.road == "swap" and plan.offload == "lowvram"
    off = plan.decision("offload")
    assert off is not None and off.reason == (f"{RUNG} ran out of memory in the last run at 1024×1024; "
                                              "using lowvram until flags, model or driver change")
    assert "the last run that kept the model in VRAM failed" in road(plan)[2] and not plan.warnings


def test_layout_on_still_takes_the_resident_road_but_warns() -> None:
    plan = run([swap(1), resident(2, None, layout=False, layout_error=STORAGE_ERROR, ok=False)], layout="on")
    assert plan.road == "resident" and plan.reserve.applied
    assert any(w.startswith("--layout on: the last run that kept the model in VRAM failed (layout failed: AttributeError")
               for w in plan.warnings)


def test_the_quoted_reason_is_short() -> None:
    long = "RuntimeError: " + "x" * 500 + "\nTraceback (most recent call last): ..."
    why = road(run([swap(1), resident(2, None, ok=False, reason=long)]))[2]
    quoted = why.split("failed (", 1)[1].split("); --layout on", 1)[0]
    assert len(quoted) <= policy.FAILURE_TEXT and quoted.endswith("…") and "\n" not in why


def test_a_tune_probe_that_ran_out_of_memory_at_one_reserve_does_not_close_the_road() -> None:
    # tune tries reserves that may not fit: an OOM at 3000 MiB says nothing against the road.
    probes = [swap(1, 2.0, source="tuning"), resident(2, 1.5, source="tuning", reserve_mb=1600),
              resident(3, None, source="tuning", reserve_mb=3000, ooms=1, ok=False, reason="out of memory"),
              resident(4, None, reserve_mb=3000, ooms=1, ok=False, reason="out of memory", tag="tune-17-42-3")]
    chosen, source, _ = road(run(probes))
    assert (chosen, source) == ("resident", "tuning")


def test_a_tune_probe_whose_layout_was_refused_does_close_it() -> None:
    probes = [swap(1, 2.0, source="tuning"),
              resident(2, 1.5, source="tuning", reserve_mb=0, layout=False, layout_error="refused: CPU")]
    chosen, _, why = road(run(probes))
    assert chosen == "swap" and "refused: CPU" in why


# -- 2. like with like ----------------------------------------------------------------------------


def test_the_issue_case_other_sizes_and_devices_are_not_compared() -> None:
    # Seen: "swap 13.64 s/it vs resident 0.95 s/it", 512² CPU runs against 64² runs.
    ran = [swap(1, 13.64, size=512, device="cpu"), swap(2, 13.7, size=512, device="cpu"),
           resident(3, 0.95, size=64), resident(4, 0.9, size=64)]
    chosen, source, why = road(run(ran))
    assert source == "auto" and why.startswith("swap parts of the model to RAM: lowvram tries both ways and keeps the "
                                               "faster, but has no swap (offload medvram-sdxl) and resident runs at the same")
    assert "13.64" not in why
    assert chosen == "swap" and why.endswith("this one, to measure it at 64×64 on cuda")


def test_the_target_size_is_compared_not_the_median_of_every_size() -> None:
    ran = [swap(t, 2.0) for t in (1, 2, 3)] + [resident(4, 3.0)] + [resident(t, 0.3, size=512) for t in (5, 6, 7)]
    chosen, source, why = road(run(ran))
    assert (chosen, source) == ("swap", "observations")
    assert why == ("swap parts of the model to RAM, the faster way measured at 1024×1024 on cuda: swap 2.00 s/it vs "
                   f"resident 3.00 s/it (median of 3/1 runs{NO_WALL})")


def test_without_a_pair_at_the_target_the_most_recent_pair_counts() -> None:
    ran = [swap(1, 2.0, size=512), resident(2, 3.0, size=512), swap(3, 2.1, size=768), resident(4, 1.6, size=768),
           resident(5, 1.5, size=768), swap(6, 2.2, size=768), swap(7, 0.1, size=1024, device="cpu")]
    chosen, _, why = road(run(ran))
    assert chosen == "resident"
    assert why == ("keep the model in VRAM and reserve memory, the faster way measured at 768×768 on cuda: swap 2.15 "
                   f"s/it vs resident 1.55 s/it (median of 2/2 runs{NO_WALL})")


def test_a_resident_record_whose_layout_did_not_run_is_no_resident_measurement() -> None:
    # Planned resident, layout off (an older hook that recorded no reason): its fast s/it is a swapped model's.
    ran = [swap(1, 2.0), resident(2, 3.0), resident(3, 0.5, layout=False), resident(4, 0.5, layout=False)]
    chosen, _, why = road(run(ran))
    assert chosen == "swap" and "resident 3.00 s/it" in why


def test_swap_runs_on_another_rung_are_another_swap_road() -> None:
    ran = [swap(1, 5.0, offload="lowvram"), swap(2, 5.0, offload="lowvram"), swap(3, 1.0), resident(4, 2.0)]
    chosen, _, why = road(run(ran))
    assert chosen == "swap" and f"swap 1.00 s/it vs resident 2.00 s/it (median of 1/1 runs{NO_WALL})" in why


def test_failed_runs_are_left_out_of_the_comparison() -> None:
    ran = [swap(1, 2.0), resident(2, 0.4, ooms=1, ok=False, reason="out of memory"), resident(3, 3.0)]
    chosen, _, why = road(run(ran))
    assert chosen == "swap" and "resident 3.00 s/it" in why and "1/1 runs" in why


def test_wall_time_per_image_is_compared_at_the_same_step_count() -> None:
    # --medvram moves the model before and after sampling: s/it hides it, the wall time does not.
    ran = [swap(1, 1.0, wall_s=40.0, steps=20, images=1), resident(2, 1.5, wall_s=32.0, steps=20, images=1)]
    chosen, _, why = road(run(ran))
    assert chosen == "resident"
    assert why == ("keep the model in VRAM and reserve memory, the faster way measured at 1024×1024 on cuda: swap "
                   "40.00 s/image vs resident 32.00 s/image (wall time per image at 20 steps, median of 1/1 runs)")


def test_the_resident_reserve_comes_only_from_layouts_that_ran() -> None:
    ran = [swap(1, 2.0), resident(2, 1.5, free_mb=600, overflow_mb=1000),
           # tune's probe record for a layout the hook refused: its free/overflow are a swapped model's
           resident(3, 1.4, source="tuning", reserve_mb=0, layout=False, free_mb=4000, overflow_mb=4000)]
    plan = run(ran, layout="on")
    assert plan.road == "resident" and plan.reserve.mb == 1600
    assert plan.reserve.free_dedicated_mb == 600 and plan.reserve.overflow_mb == 1000


def test_tune_probes_whose_layout_did_not_run_do_not_name_a_tuned_winner() -> None:
    probes = [swap(1, 2.0, source="tuning"), resident(2, 0.9, source="tuning", reserve_mb=0, layout=False)]
    chosen, source, why = road(run(probes))
    assert chosen == "resident" and source != "tuning" and why.startswith("keep the model in VRAM and reserve memory: lowvram tries both ways")
