"""Property: for any facts and any bundled profile, the plan's flags are real flags of the target UI,
nothing contradicts (inside the plan, nor between the plan and the user's kept flags), and the
JSON round-trips."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowvram import ui
from lowvram.core import policy
from lowvram.core.errors import ProfileError
from lowvram.core.facts import Facts, GpuFacts, OtherGpu, SystemFacts, TcmallocFacts, WebuiFacts
from lowvram.core.observations import Observation
from lowvram.core.plan import Overrides
from lowvram.world import paths, profile_files
from lowvram.world.plan_inputs import load_registry

BUNDLED = sorted(p.stem for p in paths.bundled_profiles_dir().glob("*.yaml"))
REGISTRY = load_registry()
NAMES = ["NVIDIA GeForce GTX 1070", "NVIDIA GeForce GTX 1650", "NVIDIA GeForce GTX 1660 Ti",
         "NVIDIA GeForce RTX 3050 Laptop GPU", "NVIDIA GeForce RTX 3060", "NVIDIA GeForce RTX 4090",
         "NVIDIA GeForce GT 1030", "Tesla T4", None]
CCS = ["6.1", "7.5", "8.6", "8.9", "5.2", "12.0", None]
USER_FLAGS = {
    "a1111": [["--medvram"], ["--lowvram"], ["--medvram-sdxl"], ["--xformers"], ["--opt-sdp-attention"],
              ["--no-half-vae"], ["--api"], ["--listen"], ["--port", "7861"], ["--upcast-sampling"],
              ["--device-id", "0"], ["--precision", "full"]],
    "forge": [["--always-low-vram"], ["--always-high-vram"], ["--attention-pytorch"], ["--cuda-malloc"],
              ["--api"], ["--gpu-device-id", "0"], ["--vae-in-fp16"]],
    "sdnext": [["--medvram"], ["--lowvram"], ["--use-xformers"], ["--listen"], ["--debug"]],
    "comfyui": [["--lowvram"], ["--highvram"], ["--use-split-cross-attention"], ["--reserve-vram", "1.5"],
                ["--fp16-vae"], ["--listen"]],
}


@st.composite
def gpu_st(draw: st.DrawFn, index: int) -> GpuFacts:
    total = draw(st.one_of(st.none(), st.integers(1500, 49152)))
    used = draw(st.integers(0, 2000))
    return GpuFacts(index=index, uuid=f"GPU-{index}", name=draw(st.sampled_from(NAMES)), vram_total_mb=total,
                    vram_free_mb=None if total is None else max(0, total - used),
                    driver=draw(st.sampled_from(["531.79", "537.13", "551.86", "535.54", None])),
                    compute_capability=draw(st.sampled_from(CCS)))


@st.composite
def facts_st(draw: st.DrawFn) -> tuple[Facts, str, str]:
    os_name = draw(st.sampled_from(["linux", "windows"]))
    fallback = draw(st.sampled_from(["on", "off", "unknown", "unsupported"]))
    system = SystemFacts(os=os_name, ram_mb=draw(st.one_of(st.none(), st.integers(4096, 131072))),
                         wsl=os_name == "linux" and draw(st.booleans()), sysmem_fallback=fallback)
    n = draw(st.integers(0, 2))
    gpus = tuple(draw(gpu_st(i)) for i in range(n))
    others = (OtherGpu("amd", "Radeon"),) if n == 0 and draw(st.booleans()) else ()
    tc = draw(st.sampled_from([TcmallocFacts("/usr/lib/libtcmalloc_minimal.so.4", True, "ok"),
                               TcmallocFacts("/usr/lib/libtcmalloc.so.4", False, "no pthread"), TcmallocFacts()]))
    flavor = draw(st.sampled_from(["a1111", "forge", "sdnext", "comfyui"]))
    family = draw(st.sampled_from(["sd15", "sd2", "sdxl", "sdxl-refiner"]))
    user: list[str] = []
    picked = draw(st.lists(st.sampled_from(range(len(USER_FLAGS[flavor]))), max_size=3, unique=True))
    for i in picked:
        user += USER_FLAGS[flavor][i]
    flagset = ui.adapter(flavor).flagset(None)
    parsed = ui.parse_args(user, flagset, strict=False)
    if ui.adapter(flavor).contradictions(parsed, flagset):
        user = []  # the user's own flags are assumed consistent
    version = {"a1111": draw(st.sampled_from(["1.8.0", "1.10.1", "1.5.2", None])), "forge": None,
               "sdnext": None, "comfyui": "0.3.40"}[flavor]
    webui = WebuiFacts(path="/w", flavor=flavor, version=version, torch=draw(st.sampled_from(
        ["2.1.2+cu121", "2.3.1+cu121", "2.6.0+cu126", None])), model_family=family,
        checkpoint="m.safetensors", checkpoint_key="m|1|1", user_args=tuple(user), batch_cond_uncond=draw(st.booleans()))
    facts = Facts(system=system, gpus=gpus, other_gpus=others, tcmalloc=tc, webui=webui)
    return facts, flavor, family


observation_st = st.builds(
    Observation,
    time=st.floats(0, 1e6),
    source=st.sampled_from(["hook", "tuning", "manual"]),
    checkpoint=st.sampled_from(["m|1|1", None]),
    offload=st.sampled_from(["none", "medvram-sdxl", "medvram", "lowvram", None]),
    road=st.sampled_from(["swap", "resident", None]),
    layout=st.booleans(),
    reserve_mb=st.one_of(st.none(), st.integers(0, 4096)),
    free_mb=st.one_of(st.none(), st.integers(0, 4096)),
    overflow_mb=st.one_of(st.none(), st.integers(0, 4096)),
    peak_reserved_mb=st.one_of(st.none(), st.integers(500, 24000)),
    sit=st.one_of(st.none(), st.floats(0.1, 30)),
    ooms=st.integers(0, 2),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=facts_st(), profile=st.one_of(st.none(), st.sampled_from(BUNDLED)),
       offload=st.sampled_from([None, "auto", "none", "medvram-sdxl", "medvram", "lowvram"]),
       layout=st.sampled_from([None, "auto", "on", "off"]),
       observations=st.lists(observation_st, max_size=8))
def test_any_facts_any_profile_gives_valid_consistent_flags(
    data: tuple[Facts, str, str], profile: str | None, offload: str | None, layout: str | None,
    observations: list[Observation],
) -> None:
    facts, _flavor, _family = data
    ov = Overrides(profile=profile, offload=offload, layout=layout)
    resolved = profile_files.load_profile(profile) if profile else None
    fam = policy.resolve_family(facts, ov, resolved)
    selection = None
    if resolved is None:
        try:
            selection = profile_files.select_profile(facts, fam.family, gpu=policy.gpu_for(facts, ov), use_largest_gpu=False)
        except ProfileError:
            return  # no profile for this machine: a clear error, nothing to plan
        resolved = profile_files.load_profile(selection.name)
    plan = policy.plan(facts, resolved, observations, ov, hook_config_path="/h.json", webui_path="/w", registry=REGISTRY,
                       family=fam, selection=selection)
    adapter = ui.adapter(plan.ui)
    version = facts.webui.version if facts.webui else None
    ui.validate(plan.ui, version, plan.args)  # real flags, values fit, no contradiction inside the plan
    flagset = adapter.flagset(version)
    if plan.merge == "assign":
        effective = [*plan.user_args_kept, *plan.args]
    else:
        effective = [*(facts.webui.user_args or ()), *plan.args] if facts.webui else list(plan.args)
    parsed = ui.parse_args(effective, flagset, strict=False)
    assert not adapter.contradictions(parsed, flagset), (effective, plan.warnings)
    rungs = [a for a in plan.args if a in ("--medvram", "--medvram-sdxl", "--lowvram", "--always-low-vram",
                                            "--always-no-vram", "--novram")]
    assert len(rungs) <= 1
    data_out = json.loads(json.dumps(plan.to_dict()))
    assert data_out["schema"] == 1 and data_out["args"] == list(plan.args)
    assert data_out["env"] == plan.env
    assert all(d["reason"] for d in data_out["decisions"])
    assert plan.reserve.mb >= 0 and plan.reserve.mb % 64 == 0
    assert plan.road in ("swap", "resident")
    assert plan.reserve.applied == (plan.road == "resident")
