"""AUTOMATIC1111 stable-diffusion-webui: `--medvram-sdxl`/`--medvram`/`--lowvram`, `--xformers` …

Facts: reference/a1111_integration.md §1 (flags, 1.8 vs 1.10), §2 (webui.sh TCMalloc), §10.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from packaging.version import InvalidVersion, Version

from lowvram.ui.base import CPU_TORCH_INDEX, FlagSet, Rendered, UiAdapter, UiSettings, load_flagset

_VERSION_RE = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")

A1111_ATTENTION = {
    "xformers": "--xformers",
    "sdp": "--opt-sdp-attention",
    "sdp-no-mem": "--opt-sdp-no-mem-attention",
    "sub-quad": "--opt-sub-quad-attention",
    "split": "--opt-split-attention",
    "none": "--disable-opt-split-attention",
}
A1111_OFFLOAD = {"medvram-sdxl": "--medvram-sdxl", "medvram": "--medvram", "lowvram": "--lowvram", "novram": "--lowvram"}


def parse_ui_version(version: str | None) -> Version | None:
    """`v1.10.1`, `1.8.0-RC`, `1.8.0-123-gabcdef` → 1.10.1 / 1.8.0; anything else → None."""
    if not version:
        return None
    m = _VERSION_RE.search(version)
    if not m:
        return None
    try:
        return Version(".".join(g for g in m.groups() if g is not None))
    except InvalidVersion:
        return None


class A1111(UiAdapter):
    key = "a1111"
    title = "A1111"
    device_flag = "--device-id"
    supports_tcmalloc = True
    supports_hook = True
    pinned_xformers = ("0.0.23.post1", "2.1.2")
    torch_command_env = "TORCH_COMMAND"  # launch_utils.prepare_environment: `python -m $TORCH_COMMAND`
    categories: ClassVar[Mapping[str, Mapping[str, str]]] = {
        "offload": {"--medvram": "medvram", "--medvram-sdxl": "medvram-sdxl", "--lowvram": "lowvram"},
        "attention": {
            "--xformers": "xformers",
            "--force-enable-xformers": "xformers",
            "--opt-sdp-attention": "sdp",
            "--opt-sdp-no-mem-attention": "sdp-no-mem",
            "--opt-sub-quad-attention": "sub-quad",
            "--opt-split-attention": "split",
            "--opt-split-attention-v1": "split-v1",
            "--opt-split-attention-invokeai": "invokeai",
            "--disable-opt-split-attention": "none",
        },
        "precision": {"--no-half": "full", "--upcast-sampling": "upcast"},
    }

    def cpu_torch_command(self, version: str | None) -> str:
        """The default TORCH_COMMAND with PyTorch's CPU index instead of cu121 (1.8–1.10: torch 2.1.2,
        torchvision 0.16.2; 1.6–1.7: 2.0.1, 0.15.2 from cu118). pip takes `2.1.2+cpu` over PyPI's 2.1.2
        (a local version sorts after the release), so nothing of CUDA is downloaded."""
        v = parse_ui_version(version)
        torch, vision = ("2.0.1", "0.15.2") if v is not None and v < Version("1.8") else ("2.1.2", "0.16.2")
        return f"pip install torch=={torch} torchvision=={vision} --extra-index-url {CPU_TORCH_INDEX}"

    def flagset(self, version: str | None) -> FlagSet:
        v = parse_ui_version(version)
        old = load_flagset("a1111-1.8.txt", "A1111 1.8")
        new = load_flagset("a1111-1.10.txt", "A1111 1.10")
        if v is None:
            return _common(old, new)
        return new if v >= Version("1.9") else old

    def describe(self, version: str | None) -> str:
        v = parse_ui_version(version)
        if v is None:
            return "A1111 (version unknown)"
        return f"A1111 {v}"

    def medvram_sdxl(self, version: str | None) -> bool:
        """`--medvram-sdxl` arrived in 1.6; an unknown version is taken to be recent (1.8 list)."""
        v = parse_ui_version(version)
        return v is None or v >= Version("1.6")

    def rungs(self, family: str | None, version: str | None) -> tuple[str, ...]:
        if family in ("sdxl", "sdxl-refiner") and self.medvram_sdxl(version):
            return ("none", "medvram-sdxl", "lowvram")
        return ("none", "medvram", "lowvram")

    def render(self, settings: UiSettings, version: str | None) -> Rendered:
        args: list[str] = []
        notes: list[str] = []
        if settings.offload == "cpu":
            # A1111's documented CPU mode: every module on the CPU, no CUDA check, fp32 throughout.
            precision = ["--precision", "full"]
            return Rendered(("--use-cpu", "all", "--skip-torch-cuda-test", "--no-half", *precision),
                            ("CPU mode: --use-cpu all --skip-torch-cuda-test --no-half --precision full",))
        rung = settings.offload
        if rung == "medvram-sdxl" and not self.medvram_sdxl(version):
            rung = "medvram"
            notes.append("this A1111 predates --medvram-sdxl (1.6): --medvram instead")
        if rung == "novram":
            notes.append("A1111 has no offload level beyond --lowvram")
        flag = A1111_OFFLOAD.get(rung)
        if flag:
            args.append(flag)
        att = A1111_ATTENTION.get(settings.attention)
        if att:
            args.append(att)
        if settings.unet_precision == "full":
            args += ["--no-half", "--precision", "full"]
        elif settings.unet_precision == "upcast":
            args.append("--upcast-sampling")
        if settings.vae_precision == "full" and settings.unet_precision != "full":
            args.append("--no-half-vae")
        if settings.device_index is not None:
            args += [self.device_flag or "--device-id", str(settings.device_index)]
        return Rendered(tuple(args), tuple(notes))


def _common(old: FlagSet, new: FlagSet) -> FlagSet:
    return old.intersect(new, "A1111 (version unknown: flags common to 1.8 and 1.10)")
