"""Stable Diffusion WebUI reForge (Panchovix): Forge 1's backend (ldm_patched) kept alive, A1111 1.10 on top.

Facts (its repository, branch main at 3b56b268; flag list in ui/flags/reforge.txt): the same `--always-*-vram`,
`--attention-*`, `--all-in-fp32` and `--vae-in-fp32` flags as Forge (ldm_patched/modules/args_parser.py, read by
model_management.py), the same webui.sh and TORCH_COMMAND; the device flag is ComfyUI's `--cuda-device`, which
sets CUDA_VISIBLE_DEVICES (modules_forge/initialization.py). Its first start installs torch 2.9.0 from the cu128
index (modules/launch_utils.py): no kernels below sm_70 (core/torch_builds.py).
"""

from __future__ import annotations

from lowvram.ui.base import CPU_TORCH_INDEX, FlagSet, Rendered, UiSettings, load_flagset
from lowvram.ui.forge import Forge


class ReForge(Forge):
    key = "reforge"
    title = "reForge"
    device_flag = "--cuda-device"
    pinned_xformers = None  # XFORMERS_PACKAGE is the cu128 index's newest xformers: no pin lowvram can match

    def flagset(self, version: str | None) -> FlagSet:
        return load_flagset("reforge.txt", "reForge")

    def cpu_torch_command(self, version: str | None) -> str:
        """reForge's default TORCH_COMMAND (torch 2.9.0, its torchvision) from the CPU index."""
        return f"pip install torch==2.9.0 torchvision --extra-index-url {CPU_TORCH_INDEX}"

    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        """Forge's spelling, with reForge's device flag."""
        out = super().render(settings, version)
        args = tuple(self.device_flag if a == Forge.device_flag else a for a in out.args)
        return Rendered(args, out.notes)
