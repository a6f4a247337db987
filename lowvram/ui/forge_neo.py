"""Stable Diffusion WebUI Forge - Neo (Haoming02/sd-webui-forge-classic, branch neo): Forge 2 with ComfyUI's
memory management ported in.

Facts (flag list in ui/flags/forge-neo.txt, read from Neo's own parsers): backend/args.py is ComfyUI v0.7.0's
cli_args, so the offload levels are `--lowvram`/`--novram`/`--cpu` (one exclusive group), precisions are
`--force-fp32` and `--fp32-vae`, PyTorch attention is `--use-pytorch-cross-attention`; Forge's `--always-*-vram`,
`--attention-*`, `--all-in-fp32` and `--vae-in-fp32` are gone. Like Forge it loads what fits and streams the
rest by itself, starts through webui.sh with A1111's TORCH_COMMAND, and `--gpu-device-id` sets
CUDA_VISIBLE_DEVICES. `--xformers`, `--sage` and `--flash` only install packages: Neo uses the first of
SageAttention, FlashAttention, xformers, PyTorch that imports (README "Attention Functions"). `--fast-fp8`
(torch._scaled_mm) needs native fp8 matmul, compute capability 8.9 or newer (reference/vram_data.md): with it
Neo runs the Linear layers of an fp8_e4m3fn model as fp8 matmuls (backend/operations.py: ForgeOperationsFP8
where the storage dtype is float8_e4m3fn, args.fast_fp8 and supports_fp8_compute()), and ignores it elsewhere.
Its first start installs torch 2.11.0+cu130 (README; modules/launch_utils.py TORCH_COMMAND), which has no
kernels below sm_75 (core/torch_builds.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from lowvram.ui.base import CPU_TORCH_INDEX, FlagSet, Rendered, UiSettings, load_flagset
from lowvram.ui.forge import Forge

FAST_FP8_MIN_CC = (8, 9)
# Flags that need a newer card than some have: flag -> (oldest compute capability, why).
CARD_FLAGS: Mapping[str, tuple[tuple[int, int], str]] = {
    "--fast-fp8": (FAST_FP8_MIN_CC, "torch._scaled_mm needs native fp8 matmul (Ada, sm_89, or newer)"),
}


class ForgeNeo(Forge):
    key = "forge-neo"
    title = "Forge Neo"
    pinned_xformers = None  # XFORMERS_PACKAGE follows its torch; Neo never installs it unless told
    categories: ClassVar[Mapping[str, Mapping[str, str]]] = {}  # its exclusive groups say it (flag list)

    def flagset(self, version: str | None) -> FlagSet:
        return load_flagset("forge-neo.txt", "Forge Neo")

    def cpu_torch_command(self, version: str | None) -> str:
        """Neo's default TORCH_COMMAND (torch 2.11.0, torchvision 0.26.0) from the CPU index."""
        return f"pip install torch==2.11.0 torchvision==0.26.0 --extra-index-url {CPU_TORCH_INDEX}"

    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        args: list[str] = []
        notes: list[str] = []
        if settings.offload == "cpu":
            return Rendered(("--cpu", "--skip-torch-cuda-test"), ("CPU mode: --cpu",))
        if settings.offload in ("medvram", "medvram-sdxl"):
            notes.append("Forge Neo loads what fits and streams the rest by itself (ComfyUI's model management): "
                         "no flag")
        elif settings.offload in ("lowvram", "novram"):
            args.append(f"--{settings.offload}")
        if settings.attention == "xformers":
            args.append("--xformers")  # installs xformers; Neo uses it when no SageAttention/FlashAttention imports
        elif settings.attention in ("sdp", "sdp-no-mem", "sub-quad", "split"):
            args.append("--use-pytorch-cross-attention")
            if settings.attention in ("sub-quad", "split"):
                notes.append(f"Forge Neo has no {settings.attention} attention: PyTorch SDP "
                             "(--use-pytorch-cross-attention), whose memory-efficient kernel is the closest")
        if settings.unet_precision == "full":
            args.append("--force-fp32")
        elif settings.unet_precision == "upcast":
            notes.append("Forge Neo keeps GTX 16xx out of fp16 by itself: no flag")
        if settings.vae_precision == "full" and settings.unet_precision != "full":
            args.append("--fp32-vae")
        if settings.fast_fp8:
            args.append("--fast-fp8")  # decided only for an fp8_e4m3fn file on sm 8.9+ (policy/dit.py)
        if settings.device_index is not None:
            args += ["--gpu-device-id", str(settings.device_index)]
        return Rendered(tuple(args), tuple(notes))

    def card_refusals(self, args: Sequence[str], cc: tuple[int, int] | None) -> list[tuple[str, str]]:
        """(flag, why) for each flag in `args` this card cannot use; an unknown card refuses nothing."""
        out: list[tuple[str, str]] = []
        for arg in args:
            need = CARD_FLAGS.get(arg.split("=", 1)[0])
            if need is not None and cc is not None and cc < need[0]:
                out.append((arg, f"{need[1]}; this card is sm_{cc[0]}{cc[1]}"))
        return out
