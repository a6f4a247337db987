"""UNet and VAE precision: the profile's, except where the card or CPU mode cannot run it."""

from __future__ import annotations

from lowvram.core.policy.builder import Builder, GpuStep, Inputs


def decide_precision(b: Builder, inp: Inputs, g: GpuStep) -> tuple[str, str]:
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
        b.add("precision.unet", unet_prec, prec_src,
              f"profile {prof.name}" if unet_prec != "half" else "fp16 weights (the default)")
    if not g.cpu_mode:
        b.add("precision.vae", vae_prec, "profile" if vae_prec != "half" else "auto",
              "VAE in fp32 (avoids NaN/black images at decode)" if vae_prec == "full" else "VAE in fp16 (the default)")
    return unet_prec, vae_prec
