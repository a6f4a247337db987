"""Stable Diffusion WebUI Forge: no `--medvram*` (accepted and ignored), `--always-*-vram` instead.

Facts: reference/a1111_integration.md §7, peers.md (Forge). Forge swaps by itself; only the
lowvram rung and below need a flag, and at most one flag per exclusive group may be given
(backend/args.py exits 2 otherwise, before anything installs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from lowvram.ui.base import CPU_TORCH_INDEX, FlagSet, Rendered, UiAdapter, UiSettings, load_flagset

FORGE_ATTENTION = {"sdp": "--attention-pytorch", "sub-quad": "--attention-quad", "split": "--attention-split"}


class Forge(UiAdapter):
    key = "forge"
    title = "Forge"
    lineage = "forge"  # Forge Neo and reForge inherit it (ui/forge_neo.py, ui/reforge.py)
    device_flag = "--gpu-device-id"
    device_flag_sets_visible = True  # it sets CUDA_VISIBLE_DEVICES=<id> before torch starts
    supports_tcmalloc = True  # same webui.sh as A1111 1.10
    pinned_xformers: tuple[str, str] | None = ("0.0.27", "2.3.1")
    torch_command_env = "TORCH_COMMAND"  # A1111's launch_utils mechanism, with Forge's torch pin
    categories: ClassVar[Mapping[str, Mapping[str, str]]] = {
        # xformers is used whenever it imports, unless disabled; a chosen backend contradicts it.
        "attention": {
            "--attention-split": "split",
            "--attention-quad": "sub-quad",
            "--attention-pytorch": "sdp",
        },
    }

    def flagset(self, version: str | None) -> FlagSet:
        return load_flagset("forge.txt", "Forge")

    def cpu_torch_command(self, version: str | None) -> str:
        """Forge's default TORCH_COMMAND (torch 2.3.1, torchvision 0.18.1 from cu121) from the CPU index."""
        return f"pip install torch==2.3.1 torchvision==0.18.1 --extra-index-url {CPU_TORCH_INDEX}"

    def rungs(self, family: str | None, version: str | None) -> tuple[str, ...]:
        return ("none", "lowvram", "novram")

    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        args: list[str] = []
        notes: list[str] = []
        if settings.offload == "cpu":
            return Rendered(("--always-cpu", "--skip-torch-cuda-test"), ("CPU mode: --always-cpu",))
        if settings.offload in ("medvram", "medvram-sdxl"):
            notes.append("Forge swaps models by itself (its GPU Weights slider follows the VRAM kept free): no flag")
        elif settings.offload == "lowvram":
            args.append("--always-low-vram")
        elif settings.offload == "novram":
            args.append("--always-no-vram")
        if settings.attention == "xformers":
            args.append("--xformers")  # installs Forge's pinned xformers; the backend uses it once it imports
        elif settings.attention in ("sdp", "sdp-no-mem"):
            # --attention-pytorch alone: it sets XFORMERS_IS_AVAILABLE False (backend/memory_management.py), so
            # --disable-xformers beside it changes nothing. The policy plans it only where a working xformers
            # is in the venv (policy/attention.py); elsewhere Forge picks PyTorch SDP by itself.
            args.append("--attention-pytorch")
        elif settings.attention in FORGE_ATTENTION:  # split/quad rank below xformers: xformers must be off
            args += ["--disable-xformers", FORGE_ATTENTION[settings.attention]]
        if settings.unet_precision == "full":
            args.append("--all-in-fp32")
        elif settings.unet_precision == "upcast":
            notes.append("Forge keeps GTX 16xx out of fp16 by itself: no flag")
        if settings.vae_precision == "full" and settings.unet_precision != "full":
            args.append("--vae-in-fp32")  # "auto" where Forge runs it in fp32 by itself (policy/precision.py)
        if settings.device_index is not None:
            args += ["--gpu-device-id", str(settings.device_index)]
        return Rendered(tuple(args), tuple(notes))
