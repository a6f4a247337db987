"""SD.Next (vladmandic/sdnext): `--medvram`/`--lowvram` pick its balanced/sequential offload.

Facts: reference/a1111_integration.md §8. SD.Next has no `--medvram-sdxl`, no TCMalloc in its
`webui.sh`, and chooses attention in Settings → Compute (only `--use-xformers` forces xformers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from lowvram.ui.base import CPU_TORCH_INDEX, FlagSet, Rendered, UiAdapter, UiSettings, load_flagset


class SdNext(UiAdapter):
    key = "sdnext"
    title = "SD.Next"
    device_flag = "--device-id"
    # installer.py's check_torch: `pip install $TORCH_COMMAND` (the pip arguments only). With no
    # nvidia-smi, ROCm or oneAPI it installs plain `torch torchvision`: PyPI's CUDA build on Linux.
    torch_command_env = "TORCH_COMMAND"
    categories: ClassVar[Mapping[str, Mapping[str, str]]] = {
        "offload": {"--medvram": "medvram", "--lowvram": "lowvram"},
        "attention": {"--xformers": "xformers", "--use-xformers": "xformers"},
    }

    def flagset(self, version: str | None) -> FlagSet:
        return load_flagset("sdnext.txt", "SD.Next")

    def cpu_torch_command(self, version: str | None) -> str:
        """What SD.Next installs on a machine without a GPU (`torch torchvision`), from the CPU index."""
        return f"torch torchvision --index-url {CPU_TORCH_INDEX}"

    def rungs(self, family: str | None, version: str | None) -> tuple[str, ...]:
        return ("none", "medvram", "lowvram")

    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        args: list[str] = []
        notes: list[str] = []
        if settings.offload == "cpu":
            return Rendered(("--use-cpu", "all"), ("CPU mode: --use-cpu all",))
        rung = settings.offload
        if rung == "medvram-sdxl":
            rung = "medvram"
            notes.append("SD.Next has no --medvram-sdxl: --medvram")
        if rung == "novram":
            rung = "lowvram"
            notes.append("SD.Next has no offload level beyond --lowvram (sequential offload)")
        if rung == "medvram":
            args.append("--medvram")
        elif rung == "lowvram":
            args.append("--lowvram")
        if settings.attention == "xformers":
            args.append("--use-xformers")
        elif settings.attention not in ("auto",):
            notes.append(f"SD.Next chooses attention in Settings → Compute; pick {settings.attention} there")
        if settings.unet_precision == "full":
            args.append("--no-half")
        elif settings.unet_precision == "upcast":
            notes.append("SD.Next upcasts in Settings → Compute (upcast sampling)")
        if settings.vae_precision == "full" and settings.unet_precision != "full":
            args.append("--no-half-vae")
        if settings.device_index is not None:
            args += ["--device-id", str(settings.device_index)]
        return Rendered(tuple(args), tuple(notes))
