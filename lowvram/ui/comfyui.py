"""ComfyUI: `--lowvram`/`--novram`/`--cpu` (one exclusive group) and `--reserve-vram <GiB>`.

Facts: reference/peers.md (ComfyUI). ComfyUI loads partially by itself, so the none/medvram
rungs need no flag; it parses strictly, so an unknown flag stops it.
"""

from __future__ import annotations

from lowvram.ui.base import FlagSet, Rendered, UiAdapter, UiSettings, load_flagset, reserve_gb

COMFY_ATTENTION = {
    "sdp": "--use-pytorch-cross-attention",
    "sdp-no-mem": "--use-pytorch-cross-attention",
    "sub-quad": "--use-quad-cross-attention",
    "split": "--use-split-cross-attention",
}


class ComfyUI(UiAdapter):
    key = "comfyui"
    title = "ComfyUI"
    device_flag = "--cuda-device"
    device_flag_sets_visible = True  # it sets CUDA_VISIBLE_DEVICES=<id> before torch starts
    has_webui_user = False

    def flagset(self, version: str | None) -> FlagSet:
        return load_flagset("comfyui.txt", "ComfyUI")

    def rungs(self, family: str | None, version: str | None) -> tuple[str, ...]:
        return ("none", "lowvram", "novram")

    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        args: list[str] = []
        notes: list[str] = []
        if settings.offload == "cpu":
            return Rendered(("--cpu",), ("CPU mode: --cpu",))
        if settings.offload in ("medvram", "medvram-sdxl"):
            notes.append("ComfyUI loads partially by itself: no flag for medvram")
        elif settings.offload == "lowvram":
            args.append("--lowvram")
        elif settings.offload == "novram":
            args.append("--novram")
        att = COMFY_ATTENTION.get(settings.attention)
        if att:
            args.append(att)
        elif settings.attention == "xformers":
            notes.append("ComfyUI uses xformers whenever it is installed: no flag")
        if settings.unet_precision == "full":
            args.append("--force-fp32")
        elif settings.unet_precision == "upcast":  # decided for GTX 16xx only (policy/precision.py, the 16xx profiles)
            notes.append("ComfyUI computes in fp32 on GTX 16xx cards by itself (comfy/model_management.py "
                         "should_use_fp16 lists the 1630/1650/1660), so --force-upcast-attention would change "
                         "nothing: no flag")
        if settings.vae_precision == "full" and settings.unet_precision != "full":
            args.append("--fp32-vae")
        if settings.headroom_mb is not None:
            args += ["--reserve-vram", reserve_gb(settings.headroom_mb)]
        if settings.device_index is not None:
            args += ["--cuda-device", str(settings.device_index)]
        return Rendered(tuple(args), tuple(notes))
