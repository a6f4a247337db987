"""doctor's checks over facts (pure): what each card, driver, OS and WebUI state says, and the hints."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lowvram.core.facts import Facts, GpuFacts, OtherGpu, SystemFacts, TcmallocFacts, WebuiFacts
from lowvram.world.diagnosis import (
    STATUSES,
    Check,
    DoctorReport,
    build_report,
    min_driver_for_cuda,
    run_checks,
    xformers_torch,
)

LINUX = SystemFacts(os="linux", os_version="Debian 12", arch="x86_64", ram_mb=32000, swap_mb=2048, glibc="2.36")
TCM_OK = TcmallocFacts(library="/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", usable=True, reason="ok")


def gpu(name: str, mb: int | None, cc: str, driver: str = "550.54.14", cuda: str | None = "12.4", **kw: object) -> GpuFacts:
    return GpuFacts(index=0, uuid="GPU-1", name=name, vram_total_mb=mb, vram_free_mb=(mb - 300) if mb else None,
                    driver=driver, cuda_driver=cuda, compute_capability=cc, pcie_gen=3, pcie_width=16, **kw)  # type: ignore[arg-type]


GTX1050TI = gpu("NVIDIA GeForce GTX 1050 Ti", 4096, "6.1")
GTX1070 = gpu("NVIDIA GeForce GTX 1070", 8192, "6.1")
GTX1660 = gpu("NVIDIA GeForce GTX 1660", 6144, "7.5")
RTX3060 = gpu("NVIDIA GeForce RTX 3060", 12288, "8.6")


def webui(**kw: object) -> WebuiFacts:
    base: dict[str, object] = {"path": "/sd", "flavor": "a1111", "version": "1.8.0", "python": "/sd/venv/bin/python",
                                   "torch": "2.1.2+cu121", "torch_cuda": "12.1", "xformers": "0.0.23.post1",
                                   "checkpoint": "sd_xl_base_1.0.safetensors", "checkpoint_path": "/sd/m/sd_xl.safetensors",
                                   "model_family": "sdxl", "batch_cond_uncond": True}
    base.update(kw)
    return WebuiFacts(**base)  # type: ignore[arg-type]


def make(*gpus: GpuFacts, system: SystemFacts = LINUX, tcm: TcmallocFacts = TCM_OK, web: WebuiFacts | None = None,
         others: tuple[OtherGpu, ...] = (), err: str | None = None) -> Facts:
    return Facts(system=system, gpus=gpus, other_gpus=others, tcmalloc=tcm, webui=web, nvml_error=err)


def by_id(facts: Facts) -> dict[str, Check]:
    return {c.id: c for c in run_checks(facts)}


SCENARIOS = {
    "no_gpu": make(err="NVIDIA driver not found (NVML library missing)"),
    "gtx1050ti": make(GTX1050TI, web=webui()),
    "gtx1070": make(GTX1070, web=webui()),
    "gtx1660": make(GTX1660, web=webui(model_family="sd15")),
    "rtx3060": make(RTX3060),
    "two_gpus": make(GTX1050TI, replace(RTX3060, index=1, uuid="GPU-2")),
    "memory_unknown": make(gpu("NVIDIA GeForce GTX 1070", None, "6.1", errors=("memory: NotSupported",))),
    "lost": make(GTX1070, replace(RTX3060, index=1, uuid="GPU-2", lost=True)),
    "amd_only": make(others=(OtherGpu("amd", "Radeon RX 6600"),), err="NVIDIA driver not found (NVML library missing)"),
    "windows": make(GTX1070, system=SystemFacts(os="windows", ram_mb=16000), tcm=TcmallocFacts()),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_gives_a_well_formed_report(name: str) -> None:
    checks = run_checks(SCENARIOS[name])
    ids = [c.id for c in checks]
    assert len(ids) == len(set(ids))
    for c in checks:
        assert c.status in STATUSES
        assert c.message and "\n" not in c.message
        if c.status in ("warn", "fail"):
            assert c.hint, f"{c.id} has no hint"
    assert {"gpu.nvidia", "gpu.vram_class", "system.ram", "gpu.driver", "tcmalloc", "webui.found",
            "webui.torch_driver", "webui.xformers", "gpu.quirks", "gpu.other", "webui.checkpoint"} <= set(ids)


def test_no_gpu_fails_and_exits_1() -> None:
    report = build_report(SCENARIOS["no_gpu"])
    gpu_check = by_id(SCENARIOS["no_gpu"])["gpu.nvidia"]
    assert gpu_check.status == "fail" and "NVML library missing" in gpu_check.message
    assert "nvidia-smi" in gpu_check.hint
    assert report.exit_code == 1


def test_amd_only_says_built_for_nvidia() -> None:
    checks = by_id(SCENARIOS["amd_only"])
    assert checks["gpu.nvidia"].status == "fail"
    assert checks["gpu.other"].status == "warn" and "built for NVIDIA" in checks["gpu.other"].message


def test_igpu_beside_nvidia_is_a_warning_not_a_failure() -> None:
    facts = make(RTX3060, others=(OtherGpu("intel", "Intel UHD 770"),))
    checks = by_id(facts)
    assert checks["gpu.other"].status == "warn" and "plans for the NVIDIA GPU" in checks["gpu.other"].message
    assert build_report(facts).exit_code == 0


def test_healthy_rtx3060_exits_0() -> None:
    checks = by_id(SCENARIOS["rtx3060"])
    assert checks["gpu.nvidia"].status == "ok" and "RTX 3060" in checks["gpu.nvidia"].message
    assert checks["gpu.quirks"].status == "ok"
    assert "SDXL fit without offloading" in checks["gpu.vram_class"].message
    assert build_report(SCENARIOS["rtx3060"]).exit_code == 0


@pytest.mark.parametrize(("card", "words"), [
    # 4 GiB: SDXL 1024² runs only with --lowvram (one block at a time; the fp16 VAE decode fits beside it).
    (GTX1050TI, ["4 GB class", "--medvram", "SDXL only with --lowvram"]),
    (gpu("NVIDIA GeForce RTX 3050", 5050, "8.6"), ["4 GB class", "--medvram (pinned", "SDXL only with --lowvram"]),
    (GTX1660, ["6 GB class", "--medvram-sdxl"]),
    (GTX1070, ["8 GB class", "tight"]),
    (gpu("NVIDIA GeForce GT 1030", 2048, "6.1"), ["--lowvram", "not practical"]),
])
def test_vram_class_says_what_it_means(card: GpuFacts, words: list[str]) -> None:
    message = by_id(make(card))["gpu.vram_class"].message
    for w in words:
        assert w in message


def test_gtx16_fp16_quirk_points_to_upcast_sampling() -> None:
    q = by_id(SCENARIOS["gtx1660"])["gpu.quirks"]
    assert q.status == "warn" and "NaN" in q.message and "--upcast-sampling" in q.hint


def test_pascal_slow_fp16() -> None:
    q = by_id(SCENARIOS["gtx1070"])["gpu.quirks"]
    assert q.status == "warn" and "Pascal" in q.message


def test_ram_must_exceed_twice_vram_for_the_layout() -> None:
    # The resident road exists only where VRAM spills (Windows ≥ 536.40, WSL): that is where RAM < 2 × VRAM
    # costs something. It used to warn on native Linux too, where lowvram keeps the swap road whatever the RAM.
    win = SystemFacts(os="windows", ram_mb=16000, sysmem_fallback="unknown")
    check = by_id(make(GTX1070, system=win, tcm=TcmallocFacts()))["system.ram"]
    assert check.status == "warn" and "2 × VRAM" in check.message
    assert by_id(make(GTX1070, system=replace(win, ram_mb=32000), tcm=TcmallocFacts()))["system.ram"].status == "ok"
    # Exactly 2 × VRAM is enough: the policy's own test is RAM ≥ 2 × VRAM.
    assert by_id(make(GTX1070, system=replace(win, ram_mb=16384), tcm=TcmallocFacts()))["system.ram"].status == "ok"
    linux = by_id(make(GTX1070, system=replace(LINUX, ram_mb=16000)))["system.ram"]
    assert linux.status == "ok" and "cannot spill" in linux.message


def test_windows_sysmem_fallback_by_driver() -> None:
    win = SystemFacts(os="windows", ram_mb=32000)
    always = by_id(make(replace(GTX1070, driver="537.58"), system=win, tcm=TcmallocFacts()))["gpu.sysmem_fallback"]
    assert always.status == "warn" and "546.01" in always.hint
    assert "CUDA - Sysmem Fallback Policy" in always.hint and "Manage 3D settings" in always.hint
    choosable = by_id(make(replace(GTX1070, driver="551.86"), system=win, tcm=TcmallocFacts()))["gpu.sysmem_fallback"]
    assert choosable.status == "ok" and "Prefer No Sysmem Fallback" in choosable.hint
    old = by_id(make(replace(GTX1070, driver="531.79"), system=win, tcm=TcmallocFacts()))["gpu.sysmem_fallback"]
    assert "predates" in old.message


def test_wsl_spills_whatever_the_control_panel_says() -> None:
    wsl = replace(LINUX, wsl=True, sysmem_fallback="on")
    assert "11050" in by_id(make(GTX1070, system=wsl))["gpu.sysmem_fallback"].message


def test_old_driver_and_torch_build_too_new_for_it() -> None:
    old = replace(GTX1070, driver="470.256.02", cuda_driver="11.4")
    checks = by_id(make(old, web=webui()))
    assert checks["gpu.driver"].status == "warn" and "525.60.13" in checks["gpu.driver"].message
    td = checks["webui.torch_driver"]
    assert td.status == "fail" and "530.30.02" in td.hint and "Linux" in td.hint
    assert build_report(make(old, web=webui())).exit_code == 1


def test_windows_torch_driver_minimum_is_the_windows_one() -> None:
    old = replace(GTX1070, driver="511.79", cuda_driver="11.6")
    td = by_id(make(old, system=SystemFacts(os="windows"), tcm=TcmallocFacts(), web=webui()))["webui.torch_driver"]
    assert td.status == "fail" and "531.14" in td.hint and "Windows" in td.hint


def test_minor_version_compatibility_is_ok() -> None:
    r525 = replace(GTX1070, driver="525.60.13", cuda_driver="12.0")
    td = by_id(make(r525, web=webui()))["webui.torch_driver"]
    assert td.status == "ok" and "minor-version compatibility" in td.message


def test_driver_newer_than_torch_cuda_is_ok() -> None:
    td = by_id(make(GTX1070, web=webui()))["webui.torch_driver"]
    assert td.status == "ok" and "supports CUDA 12.4" in td.message


def test_cpu_torch_with_an_nvidia_gpu_fails() -> None:
    td = by_id(make(GTX1070, web=webui(torch="2.1.2", torch_cuda=None)))["webui.torch_driver"]
    assert td.status == "fail" and "CPU build" in td.message


def test_no_torch_yet_is_skipped() -> None:
    assert by_id(make(GTX1070, web=webui(torch=None, torch_cuda=None, xformers=None)))["webui.torch_driver"].status == "skip"


def test_xformers_against_torch() -> None:
    ok = by_id(make(GTX1070, web=webui()))["webui.xformers"]
    assert ok.status == "ok"
    bad = by_id(make(GTX1070, web=webui(torch="2.3.1+cu121")))["webui.xformers"]
    assert bad.status == "warn" and "built for torch 2.1.2" in bad.message and "--xformers" in bad.hint
    unknown = by_id(make(GTX1070, web=webui(xformers="0.0.99")))["webui.xformers"]
    assert unknown.status == "warn" and "not in lowvram's table" in unknown.message
    none = by_id(make(GTX1070, web=webui(torch="2.3.1+cu121", xformers=None)))["webui.xformers"]
    assert none.status == "ok" and "0.0.23.post1" in none.message


def test_tcmalloc_missing_names_the_package() -> None:
    missing = TcmallocFacts(usable=False, reason="not in ldconfig", package="libtcmalloc-minimal4")
    check = by_id(make(GTX1070, tcm=missing))["tcmalloc"]
    assert check.status == "warn" and check.hint == "sudo apt install libtcmalloc-minimal4"
    fedora = TcmallocFacts(usable=False, reason="x", package="gperftools-libs")
    assert by_id(make(GTX1070, tcm=fedora))["tcmalloc"].hint == "sudo dnf install gperftools-libs"
    assert by_id(SCENARIOS["windows"])["tcmalloc"].status == "skip"


def test_webui_found_names_flavor_and_version() -> None:
    check = by_id(make(GTX1070, web=webui(flavor="forge", version="f2.0.1")))["webui.found"]
    assert check.status == "ok" and "Forge f2.0.1" in check.message
    missing = by_id(make(GTX1070))["webui.found"]
    assert missing.status == "warn" and "--webui" in missing.hint


def test_checkpoint_family() -> None:
    assert by_id(make(GTX1070, web=webui()))["webui.checkpoint"].message.endswith("SDXL")
    unknown = by_id(make(GTX1070, web=webui(checkpoint="flux.safetensors", model_family="unknown")))["webui.checkpoint"]
    assert unknown.status == "warn" and "--model" in unknown.hint
    pickle = by_id(make(GTX1070, web=webui(checkpoint="old.ckpt", model_family="unknown")))["webui.checkpoint"]
    assert ".ckpt" in pickle.message
    comfy = by_id(make(GTX1070, web=webui(flavor="comfyui", checkpoint=None, model_family=None)))["webui.checkpoint"]
    assert comfy.status == "warn" and "no model file" in comfy.message and "--model" in comfy.hint


def test_a_fresh_a1111_without_a_checkpoint_is_told_about_the_sd15_download() -> None:
    fresh = by_id(make(GTX1070, web=webui(checkpoint=None, model_family=None)))["webui.checkpoint"]
    assert "downloads SD 1.5" in fresh.message and "lowvram plans for it" in fresh.message
    assert "--model sdxl" in fresh.hint
    no_download = by_id(make(GTX1070, web=webui(checkpoint=None, model_family=None,
                                                user_args=("--no-download-sd-model",))))["webui.checkpoint"]
    assert "no checkpoint found" in no_download.message


def test_lost_gpu_warns_and_the_other_is_used() -> None:
    check = by_id(SCENARIOS["lost"])["gpu.nvidia"]
    assert check.status == "warn" and "GTX 1070" in check.message and "lost" in check.message


def test_two_gpus_say_which_one_and_why() -> None:
    check = by_id(SCENARIOS["two_gpus"])["gpu.nvidia"]
    assert "RTX 3060" in check.message and "largest of 2" in check.message


def test_device_flag_in_user_args_is_honoured() -> None:
    facts = make(GTX1050TI, replace(RTX3060, index=1, uuid="GPU-2"), web=webui(user_args=("--device-id", "1")))
    assert "GTX 1050 Ti" in by_id(facts)["gpu.nvidia"].message


def test_memory_unknown() -> None:
    check = by_id(SCENARIOS["memory_unknown"])["gpu.vram_class"]
    assert check.status == "warn" and "unknown" in check.message


def test_extra_checks_are_appended_and_count() -> None:
    extra = Check("lowvram.block", "fail", "lowvram's block was removed from webui-user.sh", "run `lowvram apply`")
    checks = run_checks(SCENARIOS["rtx3060"], extra_checks=[extra])
    assert checks[-1] == extra
    assert DoctorReport(SCENARIOS["rtx3060"], checks).exit_code == 1


def test_json_contract_keys() -> None:
    data = build_report(make(GTX1070, web=webui(), others=(OtherGpu("intel", "UHD"),))).to_dict()
    assert next(iter(data)) == "schema" and data["schema"] == 1
    assert {"system", "gpus", "other_gpus", "tcmalloc", "webui", "checks"} <= set(data)
    assert {"os", "os_version", "ram_mb", "swap_mb", "glibc", "wsl", "sysmem_fallback"} <= set(data["system"])
    assert {"index", "uuid", "name", "vram_total_mb", "vram_free_mb", "driver", "cuda_driver", "compute_capability",
            "pcie_gen", "pcie_width"} <= set(data["gpus"][0])
    assert set(data["other_gpus"][0]) >= {"vendor", "name"}
    assert {"library", "usable", "reason"} <= set(data["tcmalloc"])
    assert {"path", "flavor", "version", "python", "torch", "torch_cuda", "xformers", "checkpoint", "model_family",
            "batch_cond_uncond"} <= set(data["webui"])
    assert set(data["checks"][0]) == {"id", "status", "message", "hint"}


def test_tables_answer_known_rows() -> None:
    assert min_driver_for_cuda("12.1", "linux") == ("530.30.02", "525.60.13")
    assert min_driver_for_cuda("11.8", "windows") == ("520.06", "452.39")
    assert xformers_torch("0.0.23.post1") == "2.1.2"
    assert xformers_torch("0.0.27.post2+cu118") == "2.4.0"
    assert xformers_torch("9.9.9") is None


# The bundled class profiles' VRAM ranges, read from the YAML: doctor's classes must be the same ones.
def test_vram_classes_are_the_bundled_profiles_classes() -> None:
    from lowvram.world.diagnosis import VRAM_CLASSES
    from lowvram.world.profile_files import load_profile

    lo = 0
    for top, label, sd15_pin, sdxl_pin in VRAM_CLASSES:
        gb = {"2 GB class": "2gb", "4 GB class": "4gb", "6 GB class": "6gb", "8 GB class": "8gb",
              "10–12 GB class": "12gb", "16 GB+ class": "16gb"}[label]
        for fam, pin in (("sd15", sd15_pin), ("sdxl", sdxl_pin)):
            prof = load_profile(f"{gb}-{fam}").profile
            assert prof.match.vram_mb is not None and prof.match.vram_mb[0] == lo, (gb, fam)
            if top < 1 << 40:
                assert prof.match.vram_mb[1] == top - 1, (gb, fam)
            assert prof.offload == (pin or "auto"), (gb, fam)
        lo = top


@pytest.mark.parametrize("os_name", ["linux", "windows"])
def test_vram_class_names_the_rung_plan_actually_picks(os_name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every card size: the flag doctor names for SD 1.5 and SDXL is the offload `lowvram plan` decides (no WebUI:
    A1111). Before, a 3.2 GB card was told "--lowvram" (plan: --medvram) and a 10 GB card "SDXL fits without
    offloading" (plan: --medvram-sdxl)."""
    from lowvram.core.plan import Overrides
    from lowvram.world.plan_inputs import make_plan
    from tests.fixtures.facts_matrix import write_facts

    system = LINUX if os_name == "linux" else SystemFacts(os="windows", ram_mb=32000)
    for mb in (2000, 3000, 3200, 3878, 4096, 5050, 5200, 6144, 7100, 8192, 9100, 10240, 11264, 12288, 16380):
        card = gpu("NVIDIA GeForce RTX 3060", mb, "8.6")
        facts = make(card, system=system)
        path = write_facts(facts, tmp_path / f"{mb}.json")
        message = by_id(facts)["gpu.vram_class"].message
        for fam in ("sd15", "sdxl"):
            planned = make_plan(webui=None, facts_file=path, overrides=Overrides(model=fam)).plan
            offload = next(d.value for d in planned.decisions if d.setting == "offload")
            said = _said_rung(message, "SD 1.5" if fam == "sd15" else "SDXL")
            assert said == offload, (mb, os_name, fam, message, offload)


def _said_rung(message: str, name: str) -> str:
    """The rung doctor's message names for a family: its --flag, or none for "fits without offloading"."""
    import re

    if "SD 1.5 and SDXL fit without offloading" in message:
        return "none"
    part = next(p for p in message.split(": ", 1)[1].split("; ") if p.startswith(name + " "))
    if "without offloading" in part:
        return "none"
    m = re.search(r"--(medvram-sdxl|medvram|lowvram)", part)
    assert m, part
    return m.group(1)


def test_quirk_hints_claim_only_what_lowvram_does() -> None:
    """The Pascal hint used to say "lowvram's Pascal profiles use xformers" – false where the venv's torch does
    not match the xformers A1111 installs (the plan then says SDP). Only consumer Pascal (sm 6.1) has slow fp16."""
    pascal = by_id(make(GTX1070, web=webui(torch="2.3.1+cu121")))["gpu.quirks"]
    assert pascal.status == "warn" and "xformers" not in pascal.hint and "--upcast-sampling" in pascal.hint
    p100 = by_id(make(gpu("Tesla P100-PCIE-16GB", 16384, "6.0")))["gpu.quirks"]
    assert p100.status == "ok"
    maxwell = by_id(make(gpu("NVIDIA GeForce GTX 970", 4096, "5.2")))["gpu.quirks"]
    assert maxwell.status == "warn" and "--no-half" not in maxwell.hint and "never plans xformers" in maxwell.hint


@pytest.mark.parametrize(("flavor", "expect", "never"), [
    ("a1111", "--reinstall-torch", "--reinstall "),
    ("forge", "--reinstall-torch", "--reinstall "),
    ("sdnext", "--reinstall ", "--reinstall-torch"),
    ("comfyui", "CUDA build of torch", "--reinstall"),
])
def test_cpu_torch_hint_uses_flags_that_ui_has(flavor: str, expect: str, never: str) -> None:
    """SD.Next has --reinstall, ComfyUI neither flag (lowvram/ui/flags): each UI gets a fix it accepts."""
    check = by_id(make(GTX1070, web=webui(flavor=flavor, torch="2.3.1+cpu", torch_cuda=None)))["webui.torch_driver"]
    assert check.status == "fail" and expect in check.hint + " " and never not in check.hint + " "


@pytest.mark.parametrize(("flavor", "expect"), [
    ("a1111", "lowvram then plans --xformers where the venv's torch is 2.1.2"),
    ("forge", "lowvram then plans --xformers where the venv's torch is 2.3.1"),
    ("sdnext", "SD.Next then uses PyTorch SDP attention"),
    ("comfyui", "--disable-xformers"),
])
def test_mismatched_xformers_hint_per_ui(flavor: str, expect: str) -> None:
    """ComfyUI and Forge load xformers whenever it imports, so "drop --xformers" fixes nothing there; removing
    the mismatched build works on every UI and the hint says what happens next."""
    web = webui(flavor=flavor, torch="2.4.0+cu121", xformers="0.0.23.post1", python="/sd/venv/bin/python")
    check = by_id(make(RTX3060, web=web))["webui.xformers"]
    assert check.status == "warn" and "/sd/venv/bin/python -m pip uninstall -y xformers" in check.hint
    assert expect in check.hint
    none = by_id(make(RTX3060, web=webui(flavor="comfyui", xformers=None)))["webui.xformers"]
    assert "A1111" not in none.message


@pytest.mark.parametrize("flavor", ["a1111", "forge", "comfyui"])
@pytest.mark.parametrize("flag_value", [None, "0", "1"])
@pytest.mark.parametrize("visible", [None, "1,0", "GPU-bbbb"])
def test_doctor_sizes_the_same_gpu_the_plan_targets(flavor: str, flag_value: str | None, visible: str | None) -> None:
    """Forge/ComfyUI device flags set CUDA_VISIBLE_DEVICES themselves; doctor must follow the same rule."""
    from dataclasses import replace as _replace

    from lowvram.core import policy
    from lowvram.core.facts import CudaEnv
    from lowvram.core.plan import Overrides
    from lowvram.ui import adapter
    from lowvram.world.diagnosis import chosen_gpu
    from tests.fixtures.facts_matrix import MACHINES, with_webui

    flag = adapter(flavor).device_flag
    user_args = (flag, flag_value) if flag_value is not None and flag else ()
    facts = with_webui(MACHINES["two-gpus"], flavor, "sd15", user_args=user_args)
    facts = _replace(facts, cuda=CudaEnv(visible_devices=visible))
    planned = policy.gpu_for(facts, Overrides())
    doctored = chosen_gpu(facts)
    assert (doctored.uuid if doctored else None) == (planned.uuid if planned else None)
