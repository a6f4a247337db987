"""Flux.1 and SD3/SD3.5 (the diffusion transformers) on the UIs that run them: the file's weight format,
what streams from RAM every step where the model does not fit whole, a much faster format of the same
model, RAM, and the memory knobs of Forge (GPU Weights) and ComfyUI (--reserve-vram).

Forge, ComfyUI and SD.Next load what fits of a DiT and stream the rest per step by themselves
(estimate.STREAMING_UIS): the plan says how much streams and what it costs (estimate/format_choice.py)
instead of climbing the offload ladder. A1111 1.10 runs SD3 medium only, on its ladder (family.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

from lowvram.core.estimate import dit as arch
from lowvram.core.estimate import memory as est
from lowvram.core.estimate.format_choice import CardSpeed, FormatRow, card_speed, compare_formats, format_row, recommend
from lowvram.core.estimate.formats import COMPARED, FORMATS, native_fp8, ui_loads
from lowvram.core.facts import GpuFacts, WebuiFacts
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, UiStep
from lowvram.core.policy.estimate import Fits
from lowvram.core.policy.family import decide_ui_runs, planned_model
from lowvram.core.policy.forge_tuned import FORGE_SLIDER_UIS, record_tuned, tuned_forge

MUCH_FASTER = 1.3  # another format of the same model this much faster is worth a warning
FORGE_INFERENCE_DEFAULT_MB = 1024  # Forge's forge_inference_memory default (modules_forge/main_entry.py)


def _gb(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB"


def file_format(fam: str, webui: WebuiFacts | None) -> tuple[str, str]:
    """(the format the estimate counts, "" = bf16; why) from the file's header (doctor's model_format)."""
    raw = webui.model_format if webui is not None and webui.model_family == fam else None
    if raw is None:
        return "", "the model file's format is unknown: counted as bf16, the format Flux.1 and SD3 are published in"
    if raw in ("fp32", "mixed") or raw not in FORMATS:
        return "", f"the file is {raw}: the UI casts it to 16 bit on load, counted as bf16"
    return raw, f"{raw}, from the model file's header (the UI keeps it in that format)"


def decide_model_format(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, fam: str) -> str:
    """Whether this UI runs the family (family.decide_ui_runs), then a DiT file's format (a decision, with
    what this UI and card make of it); "" for the UNet families."""
    decide_ui_runs(b, inp, u, fam)
    if fam not in arch.DIT_FAMILIES:
        return ""
    fmt, why = file_format(fam, planned_model(inp.facts, inp.overrides))
    shown = FORMATS[fmt or "bf16"]
    cannot = ui_loads(u.key, shown, fam)
    if cannot:
        other = ("a GGUF file (ComfyUI-GGUF) or an fp8 one" if u.key == "comfyui"
                 else "its fp16 or fp8 safetensors")
        b.warn(f"{u.ui.title} cannot load this {shown.name} file of {fam} ({cannot}): use {other}, "
               "or run this file in Forge")
    elif u.key == "comfyui" and shown.kind == "gguf":
        why += ("; ComfyUI loads GGUF through the ComfyUI-GGUF custom node (city96/ComfyUI-GGUF, its "
                "'Unet Loader (GGUF)'): install it if it is not there")
    cc = g.gpu.cc_tuple if g.gpu is not None else None
    if cc is not None and cc < (8, 0) and (shown.name == "bf16" or shown.kind == "fp8"):
        why += (f"; this card has no bf16 math (compute capability {cc[0]}.{cc[1]} < 8.0): the UI computes in "
                f"fp16 or fp32 and casts the {shown.name} weights to it layer by layer")
    b.add("model_format", shown.name, "auto", why)
    if u.key == "a1111" and fam == "sd3-medium":
        b.add("t5", "off", "auto", "A1111 runs SD3 without T5-XXL unless Settings → Stable Diffusion 3 → 'Enable T5' "
              "(sd3_enable_t5) is on: estimated without it (on, it adds "
              f"{_gb(arch.T5XXL_PARAMS * 2 / est.MIB)} in fp16 and needs a model reload)")
    return fmt


NEO_FAST_FP8_FORMAT = "fp8_e4m3fn"  # Neo's ForgeOperationsFP8 takes only a float8_e4m3fn storage dtype


def fast_fp8_applies(ui_key: str, cc: tuple[int, int] | None, fmt: str) -> bool:
    """Forge Neo's --fast-fp8 changes something: an fp8_e4m3fn model on a card with fp8 matrix math (sm 8.9+)."""
    return ui_key == "forge-neo" and fmt == NEO_FAST_FP8_FORMAT and native_fp8(cc)


def decide_fast_fp8(b: Builder, u: UiStep, g: GpuStep, fmt: str) -> bool:
    """Forge Neo's --fast-fp8 for an fp8 model file (backend/operations.py: ForgeOperationsFP8 where the storage
    dtype is float8_e4m3fn, args.fast_fp8 and memory_management.supports_fp8_compute(), i.e. sm 8.9+); a decision
    only where the file is fp8 on Neo, saying why the flag is left out where a user might expect it."""
    shown = FORMATS.get(fmt)
    if u.key != "forge-neo" or shown is None or shown.kind != "fp8" or g.no_nvidia:
        return False
    cc = g.gpu.cc_tuple if g.gpu is not None else None
    if cc is not None and fast_fp8_applies(u.key, cc, fmt):
        b.add("fast_fp8", True, "auto",
              f"--fast-fp8: the file is {fmt} and this card has fp8 matrix math (sm {cc[0]}.{cc[1]} ≥ 8.9), so Forge Neo multiplies the fp8 weights as they are "
              "(torch._scaled_mm, its ForgeOperationsFP8) instead of casting them to 16 bit layer by layer every "
              "step: the step-time estimate counts no fp8 cast; the activations are rounded to fp8 on the way in "
              "(clamped to ±448), which can change the image a little, not the memory")
        return True
    if fmt != NEO_FAST_FP8_FORMAT:
        why = (f"no --fast-fp8: Forge Neo's fp8 matmul takes fp8_e4m3fn weights only (backend/operations.py), this "
               f"file is {fmt}: Neo casts it to 16 bit layer by layer whatever the flag")
    elif cc is None:
        why = "no --fast-fp8: this card's compute capability is unknown, and Neo's fp8 matmul needs sm 8.9 (Ada) or newer"
    else:
        why = (f"no --fast-fp8: this card is sm {cc[0]}.{cc[1]} and fp8 matrix math (torch._scaled_mm) needs sm 8.9 "
               "(Ada) or newer; Neo ignores the flag below it and casts the fp8 weights to 16 bit layer by layer")
    b.add("fast_fp8", False, "auto", why)
    return False


def gpu_speed(gpu: GpuFacts) -> CardSpeed:
    """The card's compute and PCIe rates (the link's maximum: an idle card drops to Gen 1)."""
    return card_speed(cc=gpu.cc_tuple, name=gpu.name, cores=gpu.cuda_cores, clock_mhz=gpu.sm_clock_max_mhz,
                      pcie_gen=gpu.pcie_gen_max, pcie_width=gpu.pcie_width_max)


def decide_streaming(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, *, fam: str, fits: Fits) -> FormatRow | None:
    """What streams from RAM every step on a UI that streams by itself, what it costs, a much faster format
    of the same model, and RAM; None where the UI does not stream or the card's size is unknown."""
    gpu, vram = g.gpu, g.vram_total
    if not fits.streams or gpu is None or vram is None:
        return None
    fmt = fits.weight_format or "bf16"
    req, speed, usable = fits.request("none"), gpu_speed(gpu), vram - g.room
    fast = fast_fp8_applies(u.key, gpu.cc_tuple, fmt)
    row = format_row(req, fmt, speed, usable_mb=usable, margin=est.DEFAULT_MARGIN, fast_fp8=fast)
    assumed = f" (assumed: {'; '.join(speed.assumed)})" if speed.assumed else ""
    if row.step_s is None:
        b.add("streaming", None, "auto", f"{fam} {fmt} does not run on this card even with every weight in RAM")
        b.warn(f"{fam} at {req.width}×{req.height} is estimated not to run on this {vram} MiB card even with every "
               f"weight streamed from RAM ({usable} MiB usable): try a smaller size")
        return row
    if row.fits:
        b.add("streaming", 0, "auto", f"{fam} {fmt} fits whole on this card ({row.peak_mb} MiB peak of {usable} MiB "
              "usable, with the 10 % margin): nothing streams")
    else:
        whole = format_row(req, fmt, speed, usable_mb=1 << 30, margin=est.DEFAULT_MARGIN, fast_fp8=fast)
        ratio = (row.step_s / whole.step_s) if whole.step_s else 1.0
        b.add("streaming", row.offloaded_mb, "auto",
              f"{fam} {fmt} on {vram / 1024:.0f} GB: {_gb(row.weights_mb)} of weights, {_gb(row.offloaded_mb)} "
              f"streamed from RAM per step (~{ratio:.1f}× the step time it would have whole on the GPU; "
              f"{u.ui.title} does this by itself){assumed}")
        _warn_ram(b, inp, req, fmt=fmt, row=row)
    _warn_faster_format(b, req, fmt=fmt, speed=speed, gpu=gpu, usable=usable, vram=vram)
    return row


def _warn_faster_format(b: Builder, req: est.EstimateRequest, *, fmt: str, speed: CardSpeed, gpu: GpuFacts,
                        usable: int, vram: int) -> None:
    """Where another format of the same model runs MUCH_FASTER than the file's, say which and how to see all."""
    fam = req.family
    formats = COMPARED if fmt in COMPARED else (*COMPARED, fmt)
    rows = compare_formats(req, speed, usable_mb=usable, margin=est.DEFAULT_MARGIN, formats=formats)
    rec = recommend(rows, vram, pcie_gen=gpu.pcie_gen_max, pcie_width=gpu.pcie_width_max, speed=speed)
    if rec is None or rec.format == fmt:
        return
    mine = next(r for r in rows if r.format == fmt)
    best = next(r for r in rows if r.format == rec.format)
    if not best.relative_sit:
        return
    show = f"`lowvram estimate --model {fam} --formats` compares them all"
    if mine.relative_sit is None:
        b.warn(f"this {fmt} file of {fam} does not run here; {rec.format} does ({rec.reason}); {show}")
    elif mine.relative_sit / best.relative_sit >= MUCH_FASTER:
        b.warn(f"{rec.format} of {fam} would run ~{mine.relative_sit / best.relative_sit:.1f}× faster here than this "
               f"{fmt} file ({rec.reason}); {show}")


def _warn_ram(b: Builder, inp: Inputs, req: est.EstimateRequest, *, fmt: str, row: FormatRow) -> None:
    """The weights that do not fit the GPU stream from RAM: model and text encoders past the RAM thrash."""
    ram, fam = inp.facts.system.ram_mb, req.family
    text_mb = round(arch.text_bytes(fam, est.t5_format(replace(req, weight_format=fmt)), 2) / est.MIB)
    if not ram or row.weights_mb + text_mb <= ram:
        return
    windows = inp.facts.system.os == "windows"
    b.warn(f"{fam} {fmt} ({_gb(row.weights_mb)}) and its text encoders ({_gb(text_mb)}) do not fit this machine's "
           f"{_gb(ram)} of RAM, from which the {_gb(row.offloaded_mb)} that do not fit the GPU are streamed every "
           f"step: {'Windows pages to the pagefile' if windows else 'the system swaps'} and each step waits on the "
           "disk; use a smaller format of the model (or fp8 T5) or add RAM")


def decide_forge_memory(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, fits: Fits, *,
                        row: FormatRow | None) -> int | None:
    """Forge's forge_inference_memory (MB kept free for the computation; GPU Weights = total − this), for every
    family on the Forge UIs that have the slider (FORGE_SLIDER_UIS); `lowvram tune`'s best where it measured one.

    Forge subtracts it from the memory it measures free (backend/memory_management.py load_models_gpu), where
    other programs and the CUDA context are already out: the headroom is not added again. Its VAE decode asks
    for its own room and Forge moves models out for it (patcher/vae.py): the decode's need is kept beside the
    model only where the whole model still fits with it, else it costs a partial reload once per image rather
    than that much more streamed every step."""
    if (u.key not in FORGE_SLIDER_UIS or g.vram_total is None or not fits.can_estimate
            or (row is not None and row.step_s is None)):
        return None
    req = fits.request("none")
    terms = est.phase_terms(req)
    slack = 1 + est.DEFAULT_COEFFICIENTS.slack_working
    sampling = sum(terms["sampling"].unet.values()) * slack / est.MIB
    vae = sum(terms["vae_decode"].vae.values()) * slack / est.MIB
    weights = row.weights_mb if row is not None else terms["sampling"].resident.unet / est.MIB
    beside = est.fits(round(weights + max(sampling, vae) + est.CUDA_CONTEXT_MB), g.vram_total, g.room)
    need = max(sampling, vae) if beside else sampling
    value = max(FORGE_INFERENCE_DEFAULT_MB, 64 * math.ceil(need * (1 + est.DEFAULT_MARGIN) / 64))
    checkpoint = inp.facts.webui.checkpoint_key if inp.facts.webui is not None else None
    tuned = tuned_forge(inp.observations, checkpoint=checkpoint, size=(req.width, req.height),
                        vram_total_mb=g.vram_total)
    if tuned is not None:
        return record_tuned(b, tuned, estimated=value)
    size = f"{req.width}×{req.height}"
    what = (f"the larger of the sampling step's working memory at {size} ({sampling:.0f} MiB) and the VAE "
            f"decode's ({vae:.0f} MiB), which fits beside the whole model" if beside else
            f"the sampling step's working memory at {size} ({sampling:.0f} MiB)")
    left = ("" if beside else f"; the VAE decode ({vae:.0f} MiB) is left to Forge, which moves the model out for it "
            "once per image instead of streaming that much more every step")
    b.add("forge_inference_memory", value, "auto",
          f"memory Forge keeps free for the computation: {what}, with allocator slack and a "
          f"{int(est.DEFAULT_MARGIN * 100)} % margin, rounded up to 64 MiB, and never below Forge's default "
          f"{FORGE_INFERENCE_DEFAULT_MB} (the streamed layers' copies and LoRA patches are not in the estimate){left}; "
          "what other programs hold is not added, Forge subtracts this from the memory it finds free")
    return value


def decide_comfy_reserve(b: Builder, inp: Inputs, u: UiStep, g: GpuStep, *, fam: str,
                         checkpoint: str | None) -> int | None:
    """ComfyUI's --reserve-vram, for every family: only from evidence (a tune, a run that ran out of memory),
    else left out: ComfyUI budgets from the memory it measures free and keeps its own reserve
    (policy/comfy_reserve.py)."""
    if u.key != "comfyui" or g.gpu is None:
        return None
    from lowvram.core.policy.comfy_reserve import decide_comfy_reserve as decide
    from lowvram.core.policy.family import decide_target

    target = decide_target(inp, fam)
    return decide(b, inp, g, checkpoint=checkpoint, size=(target.width, target.height))
