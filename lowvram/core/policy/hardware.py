"""The machine: which GPU the UI would use (as CUDA picks it), whether memory can spill into
shared memory, the device flag that follows the UUID pin, and the headroom other programs hold.

doctor, estimate and reserve size the card through webui_gpu and headroom_mb, so they agree with `plan`."""

from __future__ import annotations

from lowvram.core.facts import Facts, GpuFacts
from lowvram.core.gpuselect import GpuChoice, select_gpu
from lowvram.core.plan import Overrides
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, UiStep
from lowvram.core.profiles import match_failure
from lowvram.ui import adapter, parse_args
from lowvram.ui.base import UiAdapter

MIN_HEADROOM_LINUX_MB = 256
MIN_HEADROOM_WINDOWS_MB = 512
FORGE_INFERENCE_MB = 1024  # Forge's forge_inference_memory default (reference/a1111_integration.md §7)


def choose_gpu(facts: Facts, device_flag_value: str | None, ui: UiAdapter | None = None) -> GpuChoice:
    """The GPU the UI would use, worked out as CUDA does (lowvram.core.gpuselect, docs/architecture.md#detection)."""
    return _choose_gpu(facts, device_flag_value, ui)[0]


def _choose_gpu(facts: Facts, device_flag_value: str | None,
                ui: UiAdapter | None) -> tuple[GpuChoice, str | None]:
    """The choice, and a warning when the user's device flag names no GPU CUDA would see.

    Such a flag makes the UI fail at start-up; it does not make the machine GPU-less, so the plan
    goes on for the GPU the UI would use without it (never CPU mode, docs/architecture.md#detection, docs/architecture.md#the-policy).
    """
    sets_visible = bool(ui and ui.device_flag_sets_visible)
    choice = select_gpu(facts, device_flag_value, flag_sets_visible=sets_visible)
    if choice.gpu is not None or device_flag_value is None or not facts.usable_gpus:
        return choice, None
    fallback = select_gpu(facts, None)
    if fallback.gpu is None:
        return choice, None
    flag = (ui.device_flag if ui else None) or "device flag"
    warning = (f"your {flag} {device_flag_value} does not name a GPU CUDA would use ({choice.reason}): "
               f"planned for {fallback.reason.split(': ', 1)[-1]} instead")
    return fallback, warning


def target_ui(facts: Facts, overrides: Overrides) -> str:
    """--ui > the WebUI tree's flavor > A1111."""
    if overrides.ui:
        return overrides.ui
    if facts.webui is not None and facts.webui.flavor:
        return facts.webui.flavor
    return "a1111"


def user_device_flag(facts: Facts, ui_key: str) -> str | None:
    """The value of the UI's device flag in the user's literal COMMANDLINE_ARGS, if any."""
    if facts.webui is None or facts.webui.flavor != ui_key or not facts.webui.user_args_literal:
        return None
    ui = adapter(ui_key)
    parsed = parse_args(tuple(facts.webui.user_args or ()), ui.flagset(facts.webui.version), strict=False)
    return next((p.value for p in parsed if p.name == ui.device_flag and p.value), None)


def webui_gpu(facts: Facts) -> GpuChoice:
    """The GPU the facts' WebUI (A1111 when there is none) would run on, with its own device flag.

    doctor, estimate and reserve use this, so they size the same card `plan` does.
    """
    ui_key = facts.webui.flavor if facts.webui is not None else "a1111"
    return choose_gpu(facts, user_device_flag(facts, ui_key), adapter(ui_key))


def gpu_for(facts: Facts, overrides: Overrides) -> GpuFacts | None:
    """The GPU the plan targets (what auto-selection matches profiles against)."""
    ui_key = target_ui(facts, overrides)
    return choose_gpu(facts, user_device_flag(facts, ui_key), adapter(ui_key)).gpu


def headroom_floor(os_name: str, wsl: bool = False) -> int:
    """The least VRAM other programs hold: the desktop compositor on Windows (and under WSL)."""
    return MIN_HEADROOM_WINDOWS_MB if os_name == "windows" or wsl else MIN_HEADROOM_LINUX_MB


def headroom_mb(facts: Facts, gpu: GpuFacts | None) -> int:
    """What other programs hold (measured total − free), at least 256 MiB Linux / 512 MiB Windows."""
    floor = headroom_floor(facts.system.os, facts.system.wsl)
    if gpu is None or gpu.vram_total_mb is None or gpu.vram_free_mb is None:
        return floor
    return max(floor, gpu.vram_total_mb - gpu.vram_free_mb)


def decide_gpu(b: Builder, inp: Inputs, u: UiStep, fam: str) -> GpuStep:
    facts, prof, overrides, ui = inp.facts, inp.prof, inp.overrides, u.ui
    choice, device_warning = _choose_gpu(facts, u.user_device, ui)
    if device_warning:
        replaced = bool(choice.pin_uuid) and not ui.device_flag_sets_visible  # rewritten to 0 below
        b.warn(device_warning + ("" if replaced else "; the UI fails to start with that value: fix or remove it"))
    gpu = choice.gpu
    foreign = gpu is None and bool(facts.other_gpus)
    # An explicit profile applies as written even where no GPU is visible (planning for another
    # machine); CPU mode is for auto-selection on a machine with no GPU at all, or the cpu profile.
    cpu_mode = not foreign and (prof.offload == "cpu" or (gpu is None and not overrides.explicit_profile))
    as_written = gpu is None and not foreign and not cpu_mode
    if gpu is not None:
        b.add("gpu", f"{gpu.name} ({gpu.vram_total_mb} MiB)" if gpu.vram_total_mb else gpu.name, "auto", choice.reason)
    elif foreign:
        names = ", ".join(f"{o.vendor} {o.name or ''}".strip() for o in facts.other_gpus)
        b.add("gpu", None, "auto", f"no NVIDIA GPU ({names}): lowvram is built for NVIDIA and adds no device "
                                   "or offload flags; the UI's own setup (ROCm, webui-macos-env.sh) stands")
        b.warn(f"lowvram is built for NVIDIA GPUs; this machine has {names}: no device or offload flags planned")
    elif as_written:
        b.add("gpu", None, "auto", f"no usable GPU here ({facts.nvml_error or 'NVML found none'}): planning "
                                   f"profile {prof.name} as written")
    else:
        why_none = choice.reason if facts.gpus else (facts.nvml_error or "NVML found none")
        b.add("gpu", None, "auto", f"no usable GPU ({why_none}): CPU mode")
    if overrides.explicit_profile:
        why_not = match_failure(prof, facts, fam, gpu)
        if why_not:
            b.warn(f"profile {prof.name} does not match this machine ({why_not}); applied as written")
    return GpuStep(choice, device_warning, foreign, cpu_mode, as_written, headroom_mb(facts, gpu))


def decide_sysmem_fallback(b: Builder, inp: Inputs) -> str:
    facts, prof, overrides = inp.facts, inp.prof, inp.overrides
    if overrides.sysmem_fallback in ("on", "off"):
        fallback, fb_src, fb_why = overrides.sysmem_fallback, "cli", f"--sysmem-fallback {overrides.sysmem_fallback}"
    elif prof.sysmem_fallback in ("on", "off"):
        fallback, fb_src, fb_why = prof.sysmem_fallback, "profile", f"profile {prof.name} says {prof.sysmem_fallback}"
    else:
        detected = facts.system.sysmem_fallback
        fallback = "on" if detected in ("on", "unknown") else "off"
        fb_src = "auto"
        fb_why = {
            "on": "the driver spills into shared memory (Windows 536.40–546.00, or WSL2)",
            "unknown": "driver ≥ 546.01: the Control Panel choice cannot be read; the default is on",
            "unsupported": "this platform never spills into shared memory (native Linux/macOS or an older driver)",
            "off": "the driver does not spill",
        }.get(detected, detected)
    b.add("sysmem_fallback", fallback, fb_src, fb_why)
    return fallback


def decide_device_flag(b: Builder, u: UiStep, g: GpuStep) -> int | None:
    """The device index the flags carry: 0 where the pin rewrites the user's device flag."""
    ui = u.ui
    if g.choice.pin_uuid and u.user_device is not None:
        if ui.device_flag_sets_visible and g.device_warning:
            pass  # the user's value names no GPU: warned above, nothing to keep or rewrite
        elif ui.device_flag_sets_visible:
            # Forge/ComfyUI turn the flag into CUDA_VISIBLE_DEVICES=<id>, replacing the UUID pin: a
            # rewritten `0` would pick CUDA's first GPU. The user's own value names the chosen GPU: keep it.
            b.add("device_flag", u.user_device, "user",
                  f"your {ui.device_flag} {u.user_device} stays: {ui.title} sets CUDA_VISIBLE_DEVICES from it, "
                  "which picks the same GPU as lowvram's pin")
        else:
            return 0  # the pinned GPU is the only one visible
    return None


def decide_headroom(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, *, forge_inference_mb: int | None = None) -> None:
    """Forge's GPU Weights follow the headroom (or, for a DiT, the inference memory decided from its
    estimate, policy/dit.py); then the headroom itself."""
    vram_total, room, facts = g.vram_total, g.room, inp.facts
    if forge_inference_mb is not None and vram_total:
        b.add("forge.gpu_weights_mb", vram_total - forge_inference_mb, "auto",
              f"GPU Weights (MB) {vram_total - forge_inference_mb} (= {vram_total} − forge_inference_memory "
              f"{forge_inference_mb}): `lowvram apply` writes both into Forge's config.json, and the value a page "
              "load of the 'xl' or 'flux' UI preset resets the slider to (xl_GPU_MB / flux_GPU_MB); the 'sd' and "
              "'all' presets reset it to total − 1024 at each page load (they have no such setting)")
    elif u.key == "forge" and vram_total and not g.cpu_mode:  # Forge 2's GPU Weights slider (not Neo's: it has none)
        weights = max(0, vram_total - room - FORGE_INFERENCE_MB)
        b.add("forge.gpu_weights_mb", weights, "auto",
              f"Forge's GPU Weights slider (Settings) follows the VRAM kept free: at most {vram_total} − {room} kept "
              f"free − {FORGE_INFERENCE_MB} inference memory; lowvram does not write Forge's settings")
    windows = facts.system.os == "windows" or facts.system.wsl
    b.add("headroom_mb", room, "auto", "VRAM kept free for other programs: what they hold now (measured total − "
          f"free), at least {headroom_floor(facts.system.os, facts.system.wsl)} MiB on "
          f"{'Windows' if windows else 'Linux'}")
