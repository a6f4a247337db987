"""UNet and VAE precision: the profile's, except where the card or CPU mode cannot run it.

The SDXL VAE in fp16: SDXL's stock VAE overflows fp16
at decode (NaN: a black image). Each UI already answers that by itself, so fp16 stays the default and
`--no-half-vae` is planned only where the UI's answer is switched off:
- A1111 (since 1.5.0, the release that brought SDXL): `decode_latent_batch` tests the decoded image for
  NaNs and, with the setting "Automatically revert VAE to 32-bit floats" (`auto_vae_precision`, on by
  default, modules/shared_options.py), converts the VAE to fp32, decodes again and keeps it in fp32.
  `--disable-nan-check` skips the test, so the retry never runs.
- Forge and ComfyUI never run the VAE in fp16 unless told (`VAE_DTYPES`: bf16 on sm 8.0+, else fp32).
  So their fp32-VAE flag changes nothing below sm 8.0 and is left out there (`ui_vae_precision`); the
  decision stays "full", so the estimate counts an fp32 VAE. ComfyUI (comfy/model_management.py `vae_dtype`)
  takes the first of the VAE's `working_dtypes` the card runs well: the VAE of every family lowvram plans
  (comfy/sd.py's default AutoencoderKL: SD 1.x/2.x, SDXL, Flux.1, SD3) lists bf16 then fp32, and
  `should_use_bf16` is false on NVIDIA below sm 8.0 on Windows and Linux alike. (Its video VAEs list fp16
  first, which `should_use_fp16` allows on Turing and, on Windows, on the named Pascal cards: lowvram plans
  none of those families.)
- SD.Next decodes through diffusers, which upcasts an fp16 SDXL VAE (`force_upcast` in its config).
fp16 first is worth it: a checkpoint with the fp16-fixed VAE never NaNs, and its decode needs 3.2 GB
at 1024² against 5.6 GB in fp32 (InvokeAI PR #7674, reference/vram_data.md §2).
"""

from __future__ import annotations

from lowvram.core.estimate.dit import DIT_FAMILIES
from lowvram.core.estimate.memory import SD_FAMILIES
from lowvram.core.policy.builder import Builder, GpuStep, Inputs
from lowvram.ui import adapter, lineage_key

SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
FP32_DECODE_1024_MB = 5568  # SDXL VAE decode at 1024², fp32, reserved (InvokeAI PR #7674)
# Families whose VAE ComfyUI runs in bf16 or else fp32 (comfy/sd.py working_dtypes [bf16, fp32]): see above.
COMFY_BF16_VAE_FAMILIES = SD_FAMILIES + DIT_FAMILIES


def decide_precision(b: Builder, inp: Inputs, g: GpuStep, *, ui_key: str | None = None,
                     family: str | None = None) -> tuple[str, str, str]:
    """(UNet, VAE, the VAE precision the UI's flags spell: `ui_vae_precision`)."""
    prof, gpu = inp.prof, g.gpu
    unet_prec, vae_prec = prof.precision.unet, prof.precision.vae
    if g.cpu_mode:
        unet_prec, vae_prec = "full", "full"
        b.add("precision.unet", "full", "auto", "CPU mode runs in fp32 (no fp16 on the CPU)")
    elif gpu is not None and unet_prec == "half" and "GTX 16" in (gpu.name or "") and gpu.cc_tuple == (7, 5):
        unet_prec = "upcast"
        b.add("precision.unet", "upcast", "auto",
              "GTX 16xx produces NaN (black) images in fp16: --upcast-sampling (--no-half is the fallback)")
    else:
        prec_src = "profile" if inp.resolved.origins.get("precision.unet", "default") != "default" else "auto"
        half_why = ("16-bit compute (the default); the weights stay in the file's format (model_format)"
                    if family in DIT_FAMILIES else "fp16 weights (the default)")
        b.add("precision.unet", unet_prec, prec_src, f"profile {prof.name}" if unet_prec != "half" else half_why)
    if not g.cpu_mode:
        vae_prec, src, why = _vae(inp, g, vae_prec, ui_key=ui_key, family=family)
        b.add("precision.vae", vae_prec, src, why)
    return unet_prec, vae_prec, ui_vae_precision(ui_key, g, vae_prec, family=family)


def forge_upcasts_vae(ui_key: str | None, g: GpuStep) -> bool:
    """The Forge lineage runs the VAE in fp32 by itself below sm 8.0 (its VAE_DTYPES start with bf16 only on
    sm 8.0+ with bf16 support; Forge Neo and reForge keep ComfyUI's same rule), so its fp32-VAE flag changes
    nothing there. An unknown card keeps the flag."""
    cc = g.gpu.cc_tuple if g.gpu is not None else None
    return lineage_key(ui_key or "") == "forge" and cc is not None and cc < (8, 0)


def comfy_upcasts_vae(ui_key: str | None, g: GpuStep, family: str | None) -> bool:
    """ComfyUI runs this family's VAE in fp32 by itself on this card (below sm 8.0: see the module's docstring),
    so --fp32-vae changes nothing there. An unknown card or family keeps the flag."""
    cc = g.gpu.cc_tuple if g.gpu is not None else None
    return (lineage_key(ui_key or "") == "comfyui" and cc is not None and cc < (8, 0)
            and family in COMFY_BF16_VAE_FAMILIES)


def ui_vae_precision(ui_key: str | None, g: GpuStep, vae_prec: str, *, family: str | None = None) -> str:
    """The VAE precision the UI's flags spell: "half" (no flag) where the UI already runs it in fp32, or on a
    GPU that is not NVIDIA's (no precision flags there)."""
    upcasts = forge_upcasts_vae(ui_key, g) or comfy_upcasts_vae(ui_key, g, family)
    return "half" if g.foreign or (vae_prec == "full" and upcasts) else vae_prec


def _vae(inp: Inputs, g: GpuStep, vae_prec: str, *, ui_key: str | None, family: str | None) -> tuple[str, str, str]:
    """(precision, source, reason) of the VAE: see the module's docstring for the SDXL evidence."""
    if vae_prec == "full":
        if forge_upcasts_vae(ui_key, g):
            title = adapter(ui_key or "forge").title
            return "full", "profile", (f"VAE in fp32 (avoids NaN/black images at decode), which {title} does by itself "
                                       f"on this card: its VAE runs in bf16 only on sm 8.0+, else fp32 "
                                       "(VAE_DTYPES, backend/memory_management.py): no flag")
        if comfy_upcasts_vae(ui_key, g, family):
            return "full", "profile", ("VAE in fp32 (avoids NaN/black images at decode), which ComfyUI does by itself "
                                       "on this card: it runs this VAE in bf16 only on sm 8.0+, else fp32, on Windows "
                                       "and Linux alike (model_management.vae_dtype): no --fp32-vae")
        return "full", "profile", "VAE in fp32 (avoids NaN/black images at decode)"
    if family not in SDXL_FAMILIES or ui_key is None:
        return vae_prec, "auto", "VAE in fp16 (the default)"
    if lineage_key(ui_key) in ("forge", "comfyui"):
        return vae_prec, "auto", ("VAE as the UI picks it: bf16 on sm 8.0+, else fp32 (never fp16 unless told), "
                                  "so SDXL's fp16 VAE overflow does not arise")
    if ui_key == "sdnext":
        return vae_prec, "auto", ("VAE in fp16: SD.Next (diffusers) upcasts the SDXL VAE to fp32 for the decode "
                                  "by itself (force_upcast in its config)")
    webui = inp.facts.webui
    if webui is not None and "--disable-nan-check" in (webui.user_args or ()):
        return "full", "auto", ("SDXL's VAE can overflow fp16 (NaN: a black image) and A1111 retries such a decode "
                                "in fp32 only after its NaN check, which your --disable-nan-check turns off: "
                                "--no-half-vae")
    why = ("VAE in fp16: SDXL's stock VAE can overflow fp16 (NaN), and A1111 then decodes again in fp32 and keeps "
           "the VAE there (setting 'Automatically revert VAE to 32-bit floats', on by default since 1.5.0); "
           "a checkpoint with the fp16-fixed VAE decodes in 3.2 GB instead of 5.6 GB at 1024²")
    if g.vram_total is not None and g.vram_total < FP32_DECODE_1024_MB:
        why += ("; on this card that fp32 retry does not fit at 1024²: use a checkpoint with the fp16-fixed SDXL "
                "VAE (or the sdxl-vae-fp16-fix VAE)")
    return vae_prec, "auto", why
