"""The facts matrix × {sd15, sdxl} × {a1111, forge, comfyui}: the profile and the flags an
experienced user would pick, asserted per case (no GPU needed: the policy is pure)."""

from __future__ import annotations

import pytest

from lowvram.core import policy
from lowvram.core.plan import Overrides, Plan
from lowvram.world import profile_files
from lowvram.world.plan_inputs import load_registry
from tests.fixtures.facts_matrix import MACHINES, with_webui

XF = "--xformers"
SDP_COMFY = "--use-pytorch-cross-attention"

# machine, family, profile, A1111 flags, Forge flags, ComfyUI flags (each: flags that must be there;
# a rung flag absent from the set must be absent from the plan).
CASES = [
    ("gt1030-2gb", "sd15", "2gb-sd15", {"--lowvram", XF}, {"--always-low-vram"}, {"--lowvram"}),
    ("gt1030-2gb", "sdxl", "2gb-sdxl", {"--lowvram", XF}, {"--always-low-vram"}, {"--lowvram"}),
    ("gtx1050ti-4gb-win", "sd15", "4gb-sd15", {"--medvram", XF}, set(), set()),
    ("gtx1050ti-4gb-win", "sdxl", "4gb-sdxl", {"--lowvram", XF}, {"--always-low-vram"}, {"--lowvram"}),
    ("gtx1650-4gb", "sd15", "gtx1650-sd15", {"--medvram", "--upcast-sampling"}, set(), set()),
    ("gtx1650-4gb", "sdxl", "gtx1650-sdxl", {"--lowvram", "--upcast-sampling"}, {"--always-low-vram"}, {"--lowvram"}),
    ("rtx3050-laptop-4gb-win", "sd15", "laptop-4gb-sd15", {"--medvram", XF}, set(), set()),
    ("rtx3050-laptop-4gb-win", "sdxl", "laptop-4gb-sdxl", {"--lowvram", XF}, {"--always-low-vram"}, {"--lowvram"}),
    ("gtx1060-6gb", "sd15", "pascal-sd15", {XF}, {XF}, set()),
    ("gtx1060-6gb", "sdxl", "6gb-sdxl", {"--medvram-sdxl", XF}, set(), set()),
    ("gtx1660s-6gb-win", "sd15", "gtx16xx-sd15", {"--upcast-sampling", XF}, set(), set()),
    ("gtx1660s-6gb-win", "sdxl", "gtx16xx-sdxl", {"--medvram-sdxl", "--upcast-sampling"}, set(), set()),
    ("rtx2060-6gb", "sd15", "6gb-sd15", {XF}, set(), set()),
    ("rtx2060-6gb", "sdxl", "6gb-sdxl", {"--medvram-sdxl", XF}, set(), set()),
    ("gtx1070-8gb", "sd15", "pascal-sd15", {XF}, {XF}, set()),
    # ComfyUI runs the VAE in fp32 by itself below sm 8.0 (model_management.vae_dtype): no --fp32-vae
    ("gtx1070-8gb", "sdxl", "gtx1070-sdxl", {"--medvram-sdxl", XF, "--no-half-vae"}, {XF}, set()),
    ("rtx4060-8gb-win", "sd15", "8gb-sd15", {XF}, set(), set()),
    ("rtx4060-8gb-win", "sdxl", "8gb-sdxl", {"--medvram-sdxl", XF}, set(), set()),
    ("rtx3060-12gb", "sd15", "12gb-sd15", {XF}, set(), set()),
    ("rtx3060-12gb", "sdxl", "12gb-sdxl", {XF}, set(), set()),
    ("rtx3060-12gb-wsl", "sd15", "12gb-sd15", {XF}, set(), set()),
    ("rtx4060ti-16gb", "sdxl", "16gb-sdxl", {XF}, set(), set()),
    ("rtx4090-24gb", "sd15", "16gb-sd15", {XF}, set(), set()),
    ("rtx4090-24gb", "sdxl", "16gb-sdxl", {XF}, set(), set()),
    ("no-gpu", "sd15", "cpu", {"--use-cpu", "all", "--skip-torch-cuda-test", "--no-half", "--precision", "full"},
     {"--always-cpu"}, {"--cpu"}),
    ("no-gpu", "sdxl", "cpu", {"--use-cpu", "--no-half"}, {"--always-cpu"}, {"--cpu"}),
    ("amd-only", "sdxl", "cpu", set(), set(), set()),
    ("two-gpus", "sdxl", "12gb-sdxl", {XF}, set(), set()),
]

RUNG_FLAGS = {
    "a1111": {"--medvram", "--medvram-sdxl", "--lowvram", "--use-cpu"},
    "forge": {"--always-low-vram", "--always-no-vram", "--always-cpu", "--medvram", "--medvram-sdxl", "--lowvram"},
    "comfyui": {"--lowvram", "--novram", "--cpu", "--highvram", "--gpu-only"},
}


def make(machine: str, family: str, ui: str, overrides: Overrides | None = None) -> Plan:
    facts = with_webui(MACHINES[machine], ui, family)
    ov = overrides or Overrides()
    fam = policy.resolve_family(facts, ov, None)
    sel = profile_files.select_profile(facts, fam.family, gpu=policy.gpu_for(facts, ov), use_largest_gpu=False)
    return policy.plan(facts, profile_files.load_profile(sel.name), [], ov, hook_config_path="/state/hook.json",
                       webui_path="/srv/webui", registry=load_registry(), family=fam, selection=sel)


@pytest.mark.parametrize(("machine", "family", "profile", "a1111", "forge", "comfy"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
@pytest.mark.parametrize("ui", ["a1111", "forge", "comfyui"])
def test_matrix(machine: str, family: str, profile: str, a1111: set[str], forge: set[str], comfy: set[str],
                ui: str) -> None:
    plan = make(machine, family, ui)
    expected = {"a1111": a1111, "forge": forge, "comfyui": comfy}[ui]
    args = set(plan.args)
    assert plan.profile == profile
    assert expected <= args, f"{ui}: {sorted(args)}"
    for rung_flag in RUNG_FLAGS[ui] - expected:
        assert rung_flag not in args, f"{ui}: unexpected {rung_flag} in {sorted(args)}"
    assert plan.decision("offload") is not None and plan.decision("offload").reason
    assert all(d.reason for d in plan.decisions)


def test_forge_and_comfyui_never_get_a1111_memory_flags() -> None:
    for machine in MACHINES:
        for family in ("sd15", "sdxl"):
            assert not {"--medvram", "--medvram-sdxl"} & set(make(machine, family, "forge").args)
            assert not {"--medvram", "--medvram-sdxl", "--xformers"} & set(make(machine, family, "comfyui").args)


def test_comfyui_keeps_its_own_reserve_without_evidence() -> None:
    """ComfyUI sizes its loads from the memory it measures free (what others hold is already out) and keeps its
    own 400/600 MiB: without a run that ran out of memory or a tune, no --reserve-vram, and the plan says why."""
    plan = make("rtx4060-8gb-win", "sdxl", "comfyui")
    assert "--reserve-vram" not in plan.args
    d = plan.decision("reserve_vram")
    assert d is not None and d.value is None and "measures free" in d.reason
    assert "COMMANDLINE_ARGS" not in plan.env  # ComfyUI takes flags on main.py's command line


def test_amd_only_machine_gets_no_device_or_offload_flags_and_a_warning() -> None:
    plan = make("amd-only", "sdxl", "a1111")
    assert plan.args == ()
    assert any("built for NVIDIA" in w for w in plan.warnings)
    assert plan.offload == "none"


def test_two_gpus_pin_the_larger_one_by_uuid() -> None:
    plan = make("two-gpus", "sdxl", "a1111")
    assert plan.env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
    assert plan.gpu_uuid == "GPU-bbbb"


def test_linux_a1111_preloads_tcmalloc_windows_never_does() -> None:
    linux = make("gtx1070-8gb", "sdxl", "a1111")
    assert linux.env["LD_PRELOAD"].endswith("libtcmalloc_minimal.so.4") and linux.tcmalloc.enabled
    win = make("rtx4060-8gb-win", "sdxl", "a1111")
    assert "LD_PRELOAD" not in win.env and "NO_TCMALLOC" not in win.env and not win.tcmalloc.enabled
    assert "LD_PRELOAD" not in make("gtx1070-8gb", "sdxl", "comfyui").env
