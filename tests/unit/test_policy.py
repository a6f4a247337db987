"""Policy rules one by one: observations move the rung, roads, reserve, allocator, TCMalloc, merge."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lowvram.core import policy
from lowvram.core.errors import FlagError, ProfileError
from lowvram.core.facts import Facts, TcmallocFacts
from lowvram.core.observations import Observation
from lowvram.core.plan import ExtensionSpec, Overrides, Plan
from lowvram.world import profile_files
from lowvram.world.plan_inputs import load_registry
from tests.fixtures.facts_matrix import MACHINES, with_webui

CKPT = "sdxl.safetensors|100|1700000000"


def run(facts: Facts, profile: str | None = None, observations: list[Observation] | None = None,
        overrides: Overrides | None = None, registry: dict[str, ExtensionSpec] | None = None) -> Plan:
    ov = overrides or Overrides(profile=profile)
    fam = policy.resolve_family(facts, ov, profile_files.load_profile(profile) if profile else None)
    sel = None
    if profile is None:
        sel = profile_files.select_profile(facts, fam.family, gpu=policy.gpu_for(facts, ov), use_largest_gpu=False)
        profile = sel.name
    return policy.plan(facts, profile_files.load_profile(profile), observations or [], ov,
                       hook_config_path="/state/hook.json", webui_path="/srv/webui",
                       registry=load_registry() if registry is None else registry, family=fam, selection=sel)


def obs(offload: str, *, ooms: int = 0, overflow: int | None = None, road: str = "swap", sit: float | None = None,
        peak: int | None = None, layout: bool = False, t: float = 1.0, free: int | None = None,
        reserve: int | None = None) -> Observation:
    return Observation(time=t, source="hook", checkpoint=CKPT, family="sdxl", offload=offload, road=road, ooms=ooms,
                       overflow_mb=overflow, sit=sit, peak_reserved_mb=peak, layout=layout, free_mb=free,
                       reserve_mb=reserve, width=1024, height=1024, ok=ooms == 0)


WIN8 = with_webui(MACHINES["rtx4060-8gb-win"], "a1111", "sdxl")
LIN12 = with_webui(MACHINES["rtx3060-12gb"], "a1111", "sdxl")


def test_every_decision_has_a_source_and_a_reason() -> None:
    plan = run(WIN8)
    allowed = {"cli", "profile", "auto", "user", "remembered", "observations", "tuning"}
    for d in plan.decisions:
        assert d.source in allowed, d
        assert d.reason, d
    settings = {d.setting for d in plan.decisions}
    assert {"profile", "ui", "model", "gpu", "offload", "attention", "road", "reserve", "hook", "tcmalloc",
            "headroom_mb", "sysmem_fallback"} <= settings


def test_an_oom_pushes_the_auto_rung_one_down() -> None:
    before = run(LIN12)
    assert before.offload == "none"
    after = run(LIN12, observations=[obs("none", ooms=1)])
    assert after.offload == "medvram-sdxl"
    d = after.decision("offload")
    assert d is not None and d.source == "observations" and "ran out of memory" in d.reason


def test_a_miss_on_the_rung_it_was_pushed_to_pushes_it_further_down() -> None:
    # none OOMed, so the plan went to medvram-sdxl; that OOMed too: next time lowvram, not medvram-sdxl again.
    walked = run(LIN12, observations=[obs("none", ooms=1, t=1), obs("medvram-sdxl", ooms=1, t=2)])
    assert walked.offload == "lowvram" and "--lowvram" in walked.args
    d = walked.decision("offload")
    assert d is not None and d.source == "observations"
    assert "none ran out of memory" in d.reason and "medvram-sdxl ran out of memory" in d.reason
    # A run that went fine on the pushed rung keeps it there.
    fine = run(LIN12, observations=[obs("none", ooms=1, t=1), obs("medvram-sdxl", peak=6000, t=2)])
    assert fine.offload == "medvram-sdxl"


def test_a_spill_counts_as_a_miss_only_where_memory_can_spill() -> None:
    spill = [obs("medvram-sdxl", overflow=900)]
    assert run(WIN8, observations=spill).offload == "lowvram"  # Windows, fallback on: spill = miss
    linux = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl")
    assert run(linux, "8gb-sdxl", observations=spill).offload == run(linux, "8gb-sdxl").offload


def test_comfortable_runs_let_the_ladder_try_one_rung_up() -> None:
    base = run(WIN8)
    assert base.offload == "medvram-sdxl"
    roomy = [obs("medvram-sdxl", peak=4200, t=float(i)) for i in range(3)]
    up = run(WIN8, observations=roomy)
    assert up.offload == "none"
    assert "room to spare" in up.decision("offload").reason  # type: ignore[union-attr]
    # ...unless the rung above already failed
    failed_above = [*roomy, obs("none", ooms=1, t=0.5)]
    assert run(WIN8, observations=failed_above).offload == "medvram-sdxl"


def test_pinned_rung_stays_but_a_miss_is_reported() -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl")
    plan = run(facts, "gtx1070-sdxl", observations=[obs("medvram-sdxl", ooms=2)])
    assert plan.offload == "medvram-sdxl"
    assert any("offload level medvram-sdxl (pinned by profile gtx1070-sdxl) ran out of memory" in w
               and "--offload lowvram" in w for w in plan.warnings)


def test_cli_offload_wins_over_the_profile() -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl")
    plan = run(facts, overrides=Overrides(profile="gtx1070-sdxl", offload="lowvram"))
    assert plan.offload == "lowvram" and "--lowvram" in plan.args and "--medvram-sdxl" not in plan.args
    assert plan.decision("offload").source == "cli"  # type: ignore[union-attr]


def test_roads_explore_swap_first_then_resident_then_the_faster() -> None:
    assert run(WIN8).road == "swap"
    swap_runs = [obs("medvram-sdxl", sit=2.0, t=1), obs("medvram-sdxl", sit=2.2, t=2)]
    second = run(WIN8, observations=swap_runs)
    assert second.road == "resident" and second.offload == "none" and second.reserve.applied
    assert second.reserve.mb == 0 and "--medvram-sdxl" not in second.args
    resident = [obs("none", road="resident", sit=1.5, t=3, layout=True, free=600, overflow=1000, reserve=0)]
    third = run(WIN8, observations=swap_runs + resident)
    assert third.road == "resident" and third.decision("road").source == "observations"  # type: ignore[union-attr]
    assert third.reserve.mb == 1600 and third.reserve.source in ("observations", "tuning")
    slower = [obs("none", road="resident", sit=3.5, t=3, layout=True, free=600, overflow=1000, reserve=0)]
    assert run(WIN8, observations=swap_runs + slower).road == "swap"


def test_native_linux_has_only_the_swap_road() -> None:
    plan = run(LIN12, overrides=Overrides(layout="on"))
    assert plan.road == "swap" and not plan.reserve.applied
    assert any("sysmem fallback off" in w for w in plan.warnings)
    forced = run(LIN12, overrides=Overrides(layout="on", sysmem_fallback="on"))
    assert forced.road == "resident" and forced.reserve.applied


def test_resident_road_needs_twice_the_vram_in_ram() -> None:
    facts = replace(WIN8, system=replace(WIN8.system, ram_mb=12000))
    plan = run(facts, overrides=Overrides(layout="on"))
    assert plan.road == "swap"
    assert "under 2 × VRAM" in plan.decision("road").reason  # type: ignore[union-attr]


def test_layout_drops_allocator_settings_that_fight_it(tmp_path: object) -> None:
    from lowvram.world import paths

    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "alloc.yaml").write_text(
        "description: x\nextends: 8gb-sdxl\nlayout: {mode: on}\n"
        "alloc_conf: {max_split_size_mb: 512, backend: cudaMallocAsync, roundup_power2_divisions: 4}\n")
    plan = run(WIN8, "alloc")
    assert plan.reserve.applied
    assert plan.env["PYTORCH_CUDA_ALLOC_CONF"] == "roundup_power2_divisions:4"
    dropped = {d.setting: d.reason for d in plan.decisions if d.value is None and d.setting.startswith("alloc")}
    assert "block cache" in dropped["alloc_conf.backend"]
    assert "smaller requests" in dropped["alloc_conf.max_split_size_mb"]
    swap = run(LIN12, "alloc")
    assert "max_split_size_mb:512" in swap.env["PYTORCH_CUDA_ALLOC_CONF"]


def test_reserve_is_zero_and_learning_without_observations() -> None:
    plan = run(WIN8, overrides=Overrides(layout="on"))
    assert plan.reserve.mb == 0 and plan.reserve.applied
    assert "learn" in plan.reserve.reason.lower() or "no observations" in plan.reserve.reason.lower()


@pytest.mark.parametrize(
    ("tcmalloc", "os_name", "ui", "env_key"),
    [
        (TcmallocFacts("/usr/lib/libtcmalloc_minimal.so.4", True, "ok"), "linux", "a1111", "LD_PRELOAD"),
        (TcmallocFacts("/usr/lib/libtcmalloc_minimal.so.4", True, "ok"), "linux", "forge", "LD_PRELOAD"),
        (TcmallocFacts("/usr/lib/libtcmalloc.so.4", False, "glibc < 2.34 and no libpthread"), "linux", "a1111",
         "NO_TCMALLOC"),
        (TcmallocFacts(None, False, "missing", "libtcmalloc-minimal4"), "linux", "a1111", None),
        (TcmallocFacts("/usr/lib/libtcmalloc_minimal.so.4", True, "ok"), "linux", "sdnext", None),
        (TcmallocFacts("/usr/lib/libtcmalloc_minimal.so.4", True, "ok"), "linux", "comfyui", None),
    ],
)
def test_tcmalloc_rules(tcmalloc: TcmallocFacts, os_name: str, ui: str, env_key: str | None) -> None:
    facts = with_webui(replace(MACHINES["gtx1070-8gb"], tcmalloc=tcmalloc), ui, "sdxl")
    plan = run(facts)
    keys = {"LD_PRELOAD", "NO_TCMALLOC"} & set(plan.env)
    assert keys == ({env_key} if env_key else set())
    if env_key == "LD_PRELOAD":
        assert plan.env["LD_PRELOAD"] == tcmalloc.library and plan.tcmalloc.enabled


def test_profile_turning_tcmalloc_off_sets_no_tcmalloc() -> None:
    from lowvram.world import paths

    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "notc.yaml").write_text("description: x\nextends: 8gb-sdxl\ntcmalloc: off\n")
    plan = run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"), "notc")
    assert plan.env.get("NO_TCMALLOC") == "1" and "LD_PRELOAD" not in plan.env


def test_xformers_needs_the_torch_its_build_targets() -> None:
    ok = run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl", torch="2.1.2+cu121"))
    assert "--xformers" in ok.args
    newer = run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl", torch="2.3.1+cu121"))
    assert "--xformers" not in newer.args and "--opt-sdp-attention" in newer.args
    assert any("xformers is not usable" in w for w in newer.warnings)
    no_tree = run(MACHINES["gtx1070-8gb"], "gtx1070-sdxl")
    assert "--xformers" in no_tree.args  # the UI installs its pinned pair


def test_xformers_not_on_cards_outside_sm_60_to_90() -> None:
    from lowvram.ui import adapter

    gpu = replace(MACHINES["rtx4090-24gb"].gpus[0], compute_capability="12.0", name="NVIDIA GeForce RTX 5090")
    ok, why = policy.xformers_usable(adapter("a1111"), gpu, MACHINES["rtx4090-24gb"])
    assert not ok and "6.0–9.0" in why


def test_gtx16xx_gets_upcast_even_from_a_class_profile() -> None:
    facts = with_webui(MACHINES["gtx1660s-6gb-win"], "a1111", "sd15")
    plan = run(facts, "6gb-sd15")
    assert "--upcast-sampling" in plan.args
    assert "NaN" in plan.decision("precision.unet").reason  # type: ignore[union-attr]


def test_user_flags_contradicting_the_plan_without_a_profile_keep_the_users() -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl", user_args=("--lowvram", "--opt-sdp-attention", "--api"))
    plan = run(facts)
    assert plan.merge == "append"
    assert "--medvram-sdxl" in plan.plan_args_dropped and "--xformers" in plan.plan_args_dropped
    assert "--medvram-sdxl" not in plan.args and "--xformers" not in plan.args
    assert plan.env["COMMANDLINE_ARGS"] == " ".join(plan.args)
    assert sum("contradicts" in w for w in plan.warnings) == 2


def test_user_on_off_flag_contradicting_an_explicit_profile_still_wins_live() -> None:
    # The block only appends to the user's live line (issue 14): an on/off flag there cannot be
    # switched off from the block, so the user's --lowvram stays, and the plan says how to drop it.
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl", user_args=("--lowvram", "--api", "--port", "7861"))
    plan = run(facts, "gtx1070-sdxl")
    assert plan.merge == "append" and plan.user_args_dropped == () and plan.user_args_kept == ()
    assert "--medvram-sdxl" in plan.plan_args_dropped and "--medvram-sdxl" not in plan.args
    assert plan.offload == "lowvram"
    assert any("take --lowvram out of it" in w for w in plan.warnings)


def test_non_literal_user_args_append_with_a_warning() -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl", user_args=None, literal=False)
    plan = run(facts)
    assert plan.merge == "append" and any("not a literal value" in w for w in plan.warnings)


def test_user_device_flag_with_two_gpus_is_pinned_and_replaced() -> None:
    # CUDA orders the RTX 3060 first, so the user's device 1 is the GTX 1060: their choice stands.
    facts = with_webui(MACHINES["two-gpus"], "a1111", "sdxl", user_args=("--device-id", "1"))
    plan = run(facts)
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert plan.profile == "6gb-sdxl"
    assert "--device-id" in plan.args and plan.args[plan.args.index("--device-id") + 1] == "0"
    assert plan.merge == "assign" and plan.user_args_dropped == ("--device-id", "1")


@pytest.mark.parametrize(("flavor", "flag"), [("forge", "--gpu-device-id"), ("comfyui", "--cuda-device")])
def test_forge_and_comfyui_device_flag_is_kept_not_rewritten_to_zero(flavor: str, flag: str) -> None:
    # Their device flag becomes CUDA_VISIBLE_DEVICES=<id> and replaces the UUID pin: a rewritten `0`
    # would select CUDA's first (fastest) GPU, the RTX 3060, instead of the GTX 1060 the user chose.
    facts = with_webui(MACHINES["two-gpus"], flavor, "sdxl", user_args=(flag, "1"))
    plan = run(facts)
    assert plan.gpu_uuid == "GPU-aaaa" and plan.profile == "6gb-sdxl"
    assert flag not in plan.args
    assert plan.merge == "append" and plan.user_args_dropped == ()
    d = plan.decision("device_flag")
    assert d is not None and d.value == "1" and "same GPU" in d.reason


def test_profile_args_are_validated_against_the_ui() -> None:
    from lowvram.world import paths

    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "badargs.yaml").write_text("description: x\nextends: 8gb-sdxl\nargs: [--xformer]\n")
    with pytest.raises(FlagError) as err:
        run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"), "badargs")
    assert "--xformers" in err.value.hint
    (d / "goodargs.yaml").write_text("description: x\nextends: 8gb-sdxl\nargs: [--api, --no-hashing]\n")
    plan = run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"), "goodargs")
    assert plan.args[-2:] == ("--api", "--no-hashing")


def test_explicit_profile_that_does_not_match_is_applied_with_a_warning() -> None:
    facts = with_webui(MACHINES["rtx3060-12gb"], "a1111", "sdxl")
    plan = run(facts, "gtx1070-sdxl")
    assert plan.profile == "gtx1070-sdxl" and "--medvram-sdxl" in plan.args
    assert any("does not match this machine" in w for w in plan.warnings)


def test_extensions_follow_the_ui_and_the_registry() -> None:
    a1111 = run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"))
    assert [e.name for e in a1111.extensions] == ["vram-estimator", "giant-kitten"]
    forge = run(with_webui(MACHINES["gtx1070-8gb"], "forge", "sdxl"))
    assert forge.extensions == ()
    skipped = forge.decision("extension.vram-estimator")
    assert skipped is not None and skipped.value == "skipped" and "Forge" in skipped.reason
    empty = run(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"), registry={})
    assert empty.extensions == () and any("not in lowvram's registry" in w for w in empty.warnings)


def test_hook_on_a1111_unless_no_hook_and_never_elsewhere() -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl")
    on = run(facts)
    assert on.hook.enabled and on.env["LOWVRAM_CONFIG"] == "/state/hook.json"
    off = run(facts, overrides=Overrides(no_hook=True))
    assert not off.hook.enabled and "LOWVRAM_CONFIG" not in off.env
    forge = run(with_webui(MACHINES["gtx1070-8gb"], "forge", "sdxl"))
    assert not forge.hook.enabled


def test_headroom_is_measured_with_os_minimums() -> None:
    assert run(LIN12).headroom_mb == 300
    quiet = replace(LIN12, gpus=(replace(LIN12.gpus[0], vram_free_mb=12288),))
    assert run(quiet).headroom_mb == 256
    win = replace(WIN8, gpus=(replace(WIN8.gpus[0], vram_free_mb=8188),))
    assert run(win).headroom_mb == 512


def test_wont_fit_warns_with_what_would() -> None:
    facts = with_webui(MACHINES["gtx1650-4gb"], "a1111", "sdxl")
    from lowvram.world import paths

    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "big.yaml").write_text("description: x\nextends: 4gb-sdxl\noffload: medvram-sdxl\ntarget: {batch: 4}\n")
    plan = run(facts, "big")
    assert plan.estimate.fits is False
    warning = next(w for w in plan.warnings if "not to fit" in w)
    assert "--offload lowvram" in warning and "batch 1" in warning


def test_family_comes_from_checkpoint_then_model_then_profile() -> None:
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sd15")
    assert policy.resolve_family(facts, Overrides(model="sdxl"), None).family == "sd15"
    bare = MACHINES["gtx1070-8gb"]
    assert policy.resolve_family(bare, Overrides(model="sdxl"), None).source == "cli"
    explicit = Overrides(profile="gtx1070-sdxl")
    choice = policy.resolve_family(bare, explicit, profile_files.load_profile("gtx1070-sdxl"))
    assert choice.family == "sdxl" and choice.source == "profile"
    # No WebUI at all: what a fresh A1111 downloads; for ComfyUI nothing says.
    fresh = policy.resolve_family(bare, Overrides(), None)
    assert (fresh.family, fresh.source) == ("sd15", "auto") and "fresh A1111" in fresh.reason
    comfy = Overrides(ui="comfyui")
    with pytest.raises(ProfileError, match="model family is unknown") as err:
        policy.require_family(policy.resolve_family(bare, comfy, None), bare, "comfyui")
    assert "--model" in err.value.hint
    unknown = with_webui(bare, "a1111", "unknown")
    with pytest.raises(ProfileError, match="cannot tell the model family"):
        policy.require_family(policy.resolve_family(unknown, Overrides(), None), unknown)


def test_plan_json_round_trips() -> None:
    import json

    plan = run(WIN8)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["schema"] == 1 and data["profile"] == plan.profile and data["args"] == list(plan.args)



def test_the_profiles_layout_order_reaches_the_hook_config() -> None:
    from pathlib import Path

    from lowvram.world import paths
    from lowvram.world.hookconfig import build_hook_config

    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "desc.yaml").write_text("description: x\nextends: 8gb-sdxl\nlayout: {mode: on, order: descending}\n")
    plan = run(WIN8, "desc")
    assert plan.reserve.applied
    assert build_hook_config(plan, Path("/srv/webui"))["order"] == "descending"
    assert build_hook_config(run(WIN8, "8gb-sdxl"), Path("/srv/webui"))["order"] == "ascending"


def test_the_profiles_model_first_reaches_the_hook_config() -> None:
    from pathlib import Path

    from lowvram.world import paths
    from lowvram.world.hookconfig import build_hook_config

    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "flat.yaml").write_text("description: x\nextends: 8gb-sdxl\nlayout: {mode: on, model_first: false}\n")
    assert build_hook_config(run(WIN8, "flat"), Path("/srv/webui"))["model_first"] is False
    assert build_hook_config(run(WIN8, "8gb-sdxl"), Path("/srv/webui"))["model_first"] is True


def test_a_device_flag_naming_no_gpu_never_turns_the_plan_into_cpu_mode() -> None:
    # One GTX 1070 and `--device-id 3`: the flag is wrong, the machine still has its GPU.
    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl", user_args=("--device-id", "3"))
    plan = run(facts)
    assert plan.profile == "gtx1070-sdxl" and plan.offload == "medvram-sdxl"
    assert "--use-cpu" not in plan.args and plan.gpu_uuid == "GPU-0"
    assert any("--device-id 3 does not name a GPU" in w and "fix or remove it" in w for w in plan.warnings)
    # With two GPUs the chosen one is pinned and the bad value replaced by 0, so the UI starts.
    two = run(with_webui(MACHINES["two-gpus"], "a1111", "sdxl", user_args=("--device-id", "3")))
    assert two.env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb" and two.user_args_dropped == ("--device-id", "3")
    assert not any("fix or remove it" in w for w in two.warnings)


def test_cuda_visible_devices_hiding_every_gpu_says_so() -> None:
    from lowvram.core.facts import CudaEnv

    facts = replace(with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl"), cuda=CudaEnv("", None))
    plan = run(facts)
    assert plan.offload == "cpu"
    d = plan.decision("gpu")
    assert d is not None and "hides every NVIDIA GPU" in d.reason and "NVML found none" not in d.reason


def test_comfyui_is_left_to_pick_its_attention_so_an_installed_xformers_stays_on() -> None:
    # GTX 1070 + SDXL: the profile prefers xformers; ComfyUI uses it whenever it imports, so the plan
    # must not force --use-pytorch-cross-attention (which turns xformers off) or warn that it is unusable.
    facts = with_webui(MACHINES["gtx1070-8gb"], "comfyui", "sdxl")
    facts = replace(facts, webui=replace(facts.webui, xformers="0.0.28.post3"))  # type: ignore[arg-type]
    plan = run(facts)
    assert plan.profile == "gtx1070-sdxl" and plan.attention == "auto"
    assert not {"--use-pytorch-cross-attention", "--use-split-cross-attention", "--use-quad-cross-attention"} & set(
        plan.args)
    assert not any("xformers is not usable" in w for w in plan.warnings)
    d = plan.decision("attention")
    assert d is not None and "0.0.28.post3" in d.reason and "PyTorch SDP" in d.reason
    # A profile that names another backend still gets its flag.
    from lowvram.world import paths

    pdir = paths.user_profiles_dir()
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "split.yaml").write_text("description: x\nextends: 8gb-sdxl\nattention: split\n")
    assert "--use-split-cross-attention" in run(facts, "split").args


def test_when_the_users_rung_wins_the_plan_and_the_hook_record_say_so() -> None:
    from pathlib import Path

    from lowvram.world.hookconfig import build_hook_config

    facts = with_webui(MACHINES["gtx1070-8gb"], "a1111", "sdxl",
                       user_args=("--lowvram", "--opt-split-attention-invokeai"))
    plan = run(facts)
    assert "--medvram-sdxl" in plan.plan_args_dropped and "--xformers" in plan.plan_args_dropped
    # The UI runs on the user's --lowvram: the hook must record runs under that rung, not medvram-sdxl.
    assert plan.offload == "lowvram" and build_hook_config(plan, Path("/srv/webui"))["offload"] == "lowvram"
    d = plan.decision("offload")
    assert d is not None and d.source == "user" and "--lowvram" in d.reason and "medvram-sdxl" in d.reason
    a = plan.decision("attention")
    assert a is not None and a.value == "invokeai" and a.source == "user"
    assert plan.estimate.peak_mb is not None  # estimated for what actually runs


def test_an_installed_xformers_built_for_another_torch_means_no_xformers_flag() -> None:
    """A1111 keeps an xformers that is already in the venv: if it does not match the venv's torch,
    --xformers would make the UI fail to load it, so the plan takes SDP and says why."""
    from lowvram.world.plan_inputs import load_xformers_builds

    builds = load_xformers_builds()
    base = MACHINES["gtx1070-8gb"]
    mismatched = with_webui(base, "a1111", "sd15", torch="2.1.2+cu121")
    mismatched = replace(mismatched, webui=replace(mismatched.webui, xformers="0.0.20"))  # built for torch 2.0.1
    matched = replace(mismatched, webui=replace(mismatched.webui, xformers="0.0.23.post1"))
    bad = policy.plan(mismatched, profile_files.load_profile("8gb-sd15"), (), Overrides(), hook_config_path=None,
                      webui_path="/srv/webui", registry={}, xformers_builds=builds)
    good = policy.plan(matched, profile_files.load_profile("8gb-sd15"), (), Overrides(), hook_config_path=None,
                       webui_path="/srv/webui", registry={}, xformers_builds=builds)
    assert "--xformers" not in bad.args
    attention = bad.decision("attention")
    assert attention is not None and "0.0.20" in attention.reason and "2.0.1" in attention.reason
    assert "--xformers" in good.args
