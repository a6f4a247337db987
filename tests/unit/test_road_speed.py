"""Issue 17 §3–§5: what roads are compared on, when the resident road is explored, failures steer the plan.

§3 Roads (and tune's probes) are compared on wall time per image at the user's step count: s/it is
the median per-step time, which drops --medvram's once-per-image model moves. Records without a
wall time fall back to s/it, and the reason says so.
§4 The resident road is explored only where the swap road offloads: where the whole model already
fits with offload none, keeping it resident only pins all free VRAM.
§5 A rung or a road whose recent runs failed is not chosen again until flags, model or driver change,
and the plan says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.core import policy
from lowvram.core.facts import Facts
from lowvram.core.observations import Observation
from lowvram.core.plan import Overrides, Plan
from lowvram.world import paths, profile_files
from lowvram.world.detect.webui import probe_webui
from lowvram.world.observation_log import append_observation
from lowvram.world.plan_inputs import load_registry
from tests.fixtures.api_ui import ApiUi, make_api_webui, write_gtx1070_windows_facts
from tests.fixtures.facts_matrix import MACHINES, _gpu, _machine, _windows, with_webui, write_facts
from tests.fixtures.webui_trees import make_webui

WIN8 = MACHINES["rtx4060-8gb-win"]
DRIVER = "551.86"
UNTIL = "until flags, model or driver change"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_webui(tmp_path / "stable-diffusion-webui")  # A1111 1.8.0, an SDXL checkpoint


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    return write_facts(WIN8, tmp_path / "rtx4060-8gb-win.json")


def plan_json(cli: Any, tree: Path, facts: Path, *extra: str) -> dict[str, Any]:
    res = cli("plan", "--webui", str(tree), "--facts", str(facts), "--json", *extra)
    assert res.code == 0, res.err
    data: dict[str, Any] = json.loads(res.out)
    return data


def reason(plan: dict[str, Any], setting: str) -> str:
    found = [d["reason"] for d in plan["decisions"] if d["setting"] == setting]
    assert found, setting
    return str(found[0])


def record(tree: Path, *runs: Observation) -> None:
    for o in runs:
        append_observation(paths.observations_path(tree), o)


def run_on(tree: Path, t: float, road: str, offload: str, *, flags: tuple[str, ...], **kw: Any) -> Observation:
    """A hook record of this tree's checkpoint at 1024×1024 on the card's driver."""
    key = probe_webui(tree).checkpoint_key
    kw.setdefault("driver", DRIVER)
    if road == "resident":
        kw.setdefault("layout", True)
        kw.setdefault("reserve_mb", 0)
    return Observation(time=t, source="hook", checkpoint=kw.pop("checkpoint", key), family="sdxl", road=road,
                       offload=offload, flags=flags, width=1024, height=1024, batch=1, device="cuda", **kw)


def with_rung(args: list[str], old: str, new: str | None) -> tuple[str, ...]:
    """The plan's flags with its offload flag swapped for another rung's (the hook records the plan's flags)."""
    out = [a for a in args if a != f"--{old}"]
    return tuple(out + ([f"--{new}"] if new and new != "none" else []))


# -- §3 wall time per image, at the user's step count --------------------------------------------------


def test_medvram_moves_count_so_the_resident_road_wins_at_the_users_step_count(cli: Any, tree: Path,
                                                                               facts: Path) -> None:
    base = plan_json(cli, tree, facts)
    rung = base["offload"]
    assert base["road"] == "swap" and rung != "none"  # 8 GB SDXL on Windows swaps with --medvram-sdxl
    flags = tuple(base["args"])
    # Swap: 1.0 s/it but 20 s of model moves per image at 20 steps (40 s). Resident: 1.3 s/it, 1 s overhead,
    # at 30 steps (40 s), the user's step count now. At 30 steps swap takes 50 s, resident 40 s.
    record(tree, *(run_on(tree, t, "swap", rung, flags=flags, sit=1.0, wall_s=40.0, steps=20, images=1)
                   for t in (1, 2, 3)),
           *(run_on(tree, t, "resident", "none", flags=with_rung(base["args"], rung, None), sit=1.3, wall_s=40.0,
                    steps=30, images=1) for t in (4, 5)))
    after = plan_json(cli, tree, facts)
    assert after["road"] == "resident" and after["reserve"]["applied"] is True
    why = reason(after, "road")
    assert "swap 50.00 s/image vs resident 40.00 s/image" in why, why
    assert "wall time per image at 30 steps" in why and "plus their per-image overhead" in why


def test_records_without_wall_time_fall_back_to_s_it_and_say_so(cli: Any, tree: Path, facts: Path) -> None:
    base = plan_json(cli, tree, facts)
    rung = base["offload"]
    record(tree, run_on(tree, 1, "swap", rung, flags=tuple(base["args"]), sit=1.0, steps=20),
           run_on(tree, 2, "resident", "none", flags=with_rung(base["args"], rung, None), sit=1.3, steps=20))
    after = plan_json(cli, tree, facts)
    why = reason(after, "road")
    assert after["road"] == "swap" and "swap 1.00 s/it vs resident 1.30 s/it" in why
    assert "s/it only: older records have no wall time per image" in why and "--medvram" in why


@pytest.fixture
def api_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiUi]:
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))  # extensions fail at once, offline
    # The swap road is faster per step (0.008 < the resident road's best 0.010 s/it) but moves the model
    # for 0.3 s every image: per image at tune's 4 steps, 0.33 s against 0.04 s.
    ui = make_api_webui(tmp_path / "stable-diffusion-webui", optimum_mb=1216, swap_sit=0.008, swap_image_s=0.3)
    yield ui
    ui.kill_all()


def test_tune_names_the_best_by_wall_time_per_image_and_the_plan_follows(cli: Any, api_tree: ApiUi,
                                                                         tmp_path: Path) -> None:
    facts = write_gtx1070_windows_facts(tmp_path / "gtx1070-windows.json")
    root = str(api_tree.root)
    assert cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000", "--webui", root,
               "--facts", str(facts)).code == 0
    res = cli("tune", "--webui", root, "--facts", str(facts), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    swap = next(p for p in data["probes"] if p["road"] == "swap")
    resident = [p for p in data["probes"] if p["road"] == "resident" and p["ok"]]
    assert resident and all(swap["sit"] < p["sit"] for p in resident)  # s/it alone would pick the swap road
    assert data["best"]["road"] == "resident" and data["gain_pct"] > 50
    assert all(p["wall_s"] < swap["wall_s"] for p in resident)
    plan = plan_json(cli, api_tree.root, facts)
    assert plan["road"] == "resident"
    assert "s/image" in reason(plan, "road") and "measured both ways" in reason(plan, "road")


# -- §4 the resident road only where the swap road offloads --------------------------------------------


WINDOWS_BIG = {
    "rtx3060-12gb-win": _machine(_windows(32768, DRIVER), _gpu("NVIDIA GeForce RTX 3060", 12288, "8.6", DRIVER)),
    "rtx4060ti-16gb-win": _machine(_windows(65536, DRIVER), _gpu("NVIDIA GeForce RTX 4060 Ti", 16380, "8.9", DRIVER)),
    "rtx4090-24gb-win": _machine(_windows(65536, DRIVER),
                                 _gpu("NVIDIA GeForce RTX 4090", 24564, "8.9", DRIVER, used=500)),
}


def plan_for(facts: Facts, observations: list[Observation], **overrides: Any) -> Plan:
    ov = Overrides(**overrides)
    fam = policy.resolve_family(facts, ov, None)
    sel = profile_files.select_profile(facts, fam.family, gpu=policy.gpu_for(facts, ov), use_largest_gpu=False)
    return policy.plan(facts, profile_files.load_profile(sel.name), observations, ov, hook_config_path="/state/h.json",
                       webui_path="/srv/webui", registry=load_registry(), family=fam, selection=sel)


def measured_swap(facts: Facts, plan: Plan) -> Observation:
    """One good swap run of the plan as it stands (the first launch)."""
    assert facts.webui is not None and facts.gpus
    t = plan.extra["target"]
    return Observation(time=1, source="hook", checkpoint=facts.webui.checkpoint_key, family=plan.model_family,
                       flags=plan.args, road="swap", offload=plan.offload, sit=1.0, wall_s=25.0, steps=20, images=1,
                       width=t["width"], height=t["height"], batch=t["batch"], device="cuda",
                       driver=facts.gpus[0].driver, peak_reserved_mb=facts.gpus[0].vram_total_mb // 2)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_where_the_swap_road_offloads_nothing_the_resident_road_is_never_explored(family: str) -> None:
    explored = 0
    for name, machine in {**MACHINES, **WINDOWS_BIG}.items():
        facts = with_webui(machine, "a1111", family)
        if not machine.gpus:
            continue  # no NVIDIA GPU: no roads at all
        first = plan_for(facts, [])
        if first.offload != "none" or first.road != "swap":
            continue
        second = plan_for(facts, [measured_swap(facts, first)])
        assert second.road == "swap" and not second.reserve.applied, (name, second.decision("road"))
        assert second.offload == "none", name
        d = second.decision("road")
        assert d is not None and "tries both ways" not in d.reason, (name, d.reason)
        explored += name in WINDOWS_BIG
    assert explored == len(WINDOWS_BIG)  # the 12–24 GB Windows cards were all among them


@pytest.mark.parametrize("name", ["gtx1660s-6gb-win", "rtx4060-8gb-win"])
def test_where_the_swap_road_offloads_the_resident_road_is_still_explored(name: str) -> None:
    facts = with_webui(MACHINES[name], "a1111", "sdxl")
    first = plan_for(facts, [])
    assert first.road == "swap" and first.offload != "none"
    second = plan_for(facts, [measured_swap(facts, first)])
    d = second.decision("road")
    assert second.road == "resident" and second.reserve.applied
    assert d is not None and "now this one, with reserve 0 first" in d.reason


def test_the_16gb_windows_card_plans_no_reserve_after_its_first_run(cli: Any, tmp_path: Path) -> None:
    root = make_webui(tmp_path / "stable-diffusion-webui")
    facts = write_facts(WINDOWS_BIG["rtx4060ti-16gb-win"], tmp_path / "16gb-win.json")
    first = plan_json(cli, root, facts)
    assert first["offload"] == "none" and first["road"] == "swap"
    record(root, run_on(root, 1, "swap", "none", flags=tuple(first["args"]), sit=0.5, wall_s=12.0, steps=20,
                        images=1))
    second = plan_json(cli, root, facts)
    assert second["road"] == "swap" and second["reserve"]["applied"] is False and second["reserve"]["mb"] == 0
    assert "the whole model fits in VRAM with no offload" in reason(second, "road")


# -- §5 failures steer the next plan -----------------------------------------------------------------


def test_a_rung_that_failed_is_not_chosen_again_until_something_changes(cli: Any, tree: Path, facts: Path,
                                                                        tmp_path: Path) -> None:
    base = plan_json(cli, tree, facts, "--layout", "off")  # the swap road alone: the ladder is what is tested
    rung, args = base["offload"], base["args"]
    assert rung == "medvram-sdxl"
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB"
    failed = [run_on(tree, t, "swap", rung, flags=tuple(args), sit=None, ooms=1, ok=False, reason=oom) for t in (1, 2)]
    # Twelve good runs on lowvram since: the failures are older than the ladder's recent runs, not forgotten.
    fine = [run_on(tree, t, "swap", "lowvram", flags=with_rung(args, rung, "lowvram"), sit=3.0, wall_s=70.0, steps=20,
                   images=1, peak_reserved_mb=6500) for t in range(3, 15)]
    record(tree, *failed, *fine)
    after = plan_json(cli, tree, facts, "--layout", "off")
    assert after["offload"] == "lowvram" and "--lowvram" in after["args"] and f"--{rung}" not in after["args"]
    assert reason(after, "offload") == (f"{rung} ran out of memory in the last 2 runs at 1024×1024; "
                                        f"using lowvram {UNTIL}")
    # A new driver is something changed: the rung is tried again.
    other_driver = write_facts(replace(WIN8, gpus=(replace(WIN8.gpus[0], driver="560.94"),)), tmp_path / "new.json")
    assert plan_json(cli, tree, other_driver, "--layout", "off")["offload"] == rung


def test_failures_under_other_flags_or_another_model_do_not_hold(cli: Any, tree: Path, facts: Path) -> None:
    base = plan_json(cli, tree, facts, "--layout", "off")
    rung, args = base["offload"], base["args"]
    other_flags = (*args, "--no-half-vae")  # the run failed with flags this plan no longer has
    record(tree, *(run_on(tree, t, "swap", rung, flags=other_flags, sit=None, ooms=1, ok=False, reason="out of memory")
                   for t in (1, 2)),
           *(run_on(tree, t, "swap", rung, flags=tuple(args), sit=None, ok=False, reason="RuntimeError: boom",
                    checkpoint="other.safetensors|1|1") for t in (3, 4)))
    after = plan_json(cli, tree, facts, "--layout", "off")
    assert after["offload"] == rung, reason(after, "offload")


def test_a_non_memory_failure_holds_the_rung_too_and_a_later_success_clears_it(cli: Any, tree: Path,
                                                                              facts: Path) -> None:
    base = plan_json(cli, tree, facts, "--layout", "off")
    rung, args = base["offload"], tuple(base["args"])
    nan = "NansException: A tensor with all NaNs was produced in Unet"
    record(tree, run_on(tree, 1, "swap", rung, flags=args, sit=None, ok=False, reason=nan))
    held = plan_json(cli, tree, facts, "--layout", "off")
    assert held["offload"] == "lowvram"
    assert reason(held, "offload") == f"{rung} failed in the last run ({nan} at 1024×1024); using lowvram {UNTIL}"
    # The user ran it again on that rung (--offload) and it worked: nothing holds any more.
    record(tree, run_on(tree, 2, "swap", rung, flags=args, sit=1.0, wall_s=30.0, steps=20, images=1))
    assert plan_json(cli, tree, facts, "--layout", "off")["offload"] == rung


def test_a_failed_layout_holds_the_road_until_the_flags_change(cli: Any, tree: Path, facts: Path) -> None:
    base = plan_json(cli, tree, facts)
    rung, args = base["offload"], base["args"]
    resident_flags = with_rung(args, rung, None)
    storage = "AttributeError: 'UntypedStorage' object has no attribute 'to'"
    swap_run = run_on(tree, 1, "swap", rung, flags=tuple(args), sit=1.0, wall_s=30.0, steps=20, images=1)
    failed = run_on(tree, 2, "resident", "none", flags=resident_flags, layout=False, reserve_mb=None,
                    layout_error=storage, ok=False, reason=storage)
    record(tree, swap_run, failed)
    held = plan_json(cli, tree, facts)
    assert held["road"] == "swap" and held["reserve"]["applied"] is False
    assert "the last run that kept the model in VRAM failed (layout failed: AttributeError" in reason(held, "road")
    assert "once flags, model or driver change" in reason(held, "road")


def test_a_failed_layout_under_other_flags_does_not_hold_the_road(cli: Any, tree: Path, facts: Path) -> None:
    base = plan_json(cli, tree, facts)
    rung, args = base["offload"], base["args"]
    storage = "AttributeError: 'UntypedStorage' object has no attribute 'to'"
    record(tree, run_on(tree, 1, "swap", rung, flags=tuple(args), sit=1.0, wall_s=30.0, steps=20, images=1),
           run_on(tree, 2, "resident", "none", flags=(*with_rung(args, rung, None), "--no-half"), layout=False,
                  reserve_mb=None, layout_error=storage, ok=False, reason=storage))
    after = plan_json(cli, tree, facts)
    assert after["road"] == "resident", reason(after, "road")
    assert "now this one, with reserve 0 first" in reason(after, "road")


def test_tunes_report_shows_the_per_image_times_it_compared() -> None:
    from lowvram.cli.cmd_tune import chart, summary
    from lowvram.world.tune.results import Probe, TuneResult

    swap = Probe("swap", 0, 0.008, True, sit_source="hook", wall_s=0.332)
    best = Probe("resident", 1216, 0.010, True, sit_source="hook", wall_s=0.041)
    result = TuneResult(best=best, start=swap, probes=(swap, best), closed=True, reason="closed", width=1024,
                        height=1024, steps=4, repeats=2, roads=("swap", "resident"), webui="/srv/webui", saved=2)
    assert result.gain_pct == pytest.approx(87.7)
    lines = chart(result, width=30).splitlines()
    assert lines[0].startswith("seconds per image per road and reserve")
    rows = {ln.split()[0]: ln for ln in lines[1:]}
    assert "◀ best" in rows["resident"] and rows["resident"].count("█") < rows["swap"].count("█")
    assert summary(result)[0] == ("best: resident (model kept in VRAM, reserve 1216 MiB) at 0.041 s/image (0.0100 s/it), "
                                  "+87.7% faster than the profile's start, swap (parts of the model swapped to RAM) at "
                                  "0.332 s/image (0.0080 s/it)")


def test_a_failure_holds_where_the_users_own_flags_take_over_some_of_the_plans() -> None:
    # The user's --opt-sdp-attention wins over the plan's attention flag, which the records then lack:
    # that difference is the merge's, not a change, so the failure still holds.
    facts = with_webui(WIN8, "a1111", "sdxl", user_args=("--opt-sdp-attention",))
    first = plan_for(facts, [], layout="off")
    assert first.offload == "medvram-sdxl" and first.plan_args_dropped
    assert facts.webui is not None
    oom = Observation(time=1, source="hook", checkpoint=facts.webui.checkpoint_key, family="sdxl", flags=first.args,
                      road="swap", offload=first.offload, ooms=1, ok=False, reason="out of memory", width=1024,
                      height=1024, batch=1, device="cuda", driver=DRIVER)
    fine = [replace(oom, time=t, offload="lowvram", ooms=0, ok=True, reason="", sit=3.0, peak_reserved_mb=6000)
            for t in range(2, 14)]
    after = plan_for(facts, [oom, *fine], layout="off")
    off = after.decision("offload")
    assert after.offload == "lowvram" and off is not None and UNTIL in off.reason
