"""The plan options every planning command shares (plan, apply, launch, tune, setup).

Declared once so the commands spell them, document them and validate them the same way;
`overrides_from()` turns them into the `Overrides` the policy takes (via `world/plan_inputs.py`).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from lowvram.core.model_files import DETECTED_FAMILIES
from lowvram.core.plan import Overrides


class UiChoice(str, enum.Enum):
    a1111 = "a1111"
    forge = "forge"
    forge_neo = "forge-neo"
    reforge = "reforge"
    sdnext = "sdnext"
    comfyui = "comfyui"


# The model families `--model` names, one list for every command (estimate too): core's.
MODEL_FAMILIES: tuple[str, ...] = tuple(f for f in DETECTED_FAMILIES if f != "unknown")
MODEL_HELP = (f"Model family ({', '.join(MODEL_FAMILIES)}), or a model file (.safetensors, .gguf: a path, or a "
              "file name in the WebUI's model folders) planned for as if the UI had it selected. A family name "
              "is always the family (write ./sdxl for a file named sdxl).")


def complete_model(incomplete: str) -> list[str]:
    """Shell completion for `--model`: the families (a file path the shell completes itself)."""
    return [f for f in MODEL_FAMILIES if f.startswith(incomplete)]


class OffloadChoice(str, enum.Enum):
    auto = "auto"
    none = "none"
    medvram_sdxl = "medvram-sdxl"
    medvram = "medvram"
    lowvram = "lowvram"


class TriState(str, enum.Enum):
    auto = "auto"
    on = "on"
    off = "off"


def complete_profile_name(incomplete: str) -> list[str]:
    """Shell completion for a profile name: the bundled and user profiles (nothing is parsed)."""
    try:
        from lowvram.world.profile_files import profile_names

        names = profile_names()
    except Exception:  # completion must never print a traceback into the shell
        return []
    return [n for n in names if n.startswith(incomplete)]


def complete_profile(incomplete: str) -> list[str]:
    """Shell completion for `--profile`: `auto` and every profile name."""
    return [n for n in ("auto", *complete_profile_name(incomplete)) if n.startswith(incomplete)]


ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", metavar="NAME|auto", autocompletion=complete_profile,
                 help="Profile to plan with (see `lowvram profiles list`); `auto` picks one from the machine."),
]
WebuiOpt = Annotated[
    Path | None,
    typer.Option("--webui", metavar="PATH",
                 help="The WebUI tree (default: $LOWVRAM_WEBUI, the current directory, the last one used)."),
]
UiOpt = Annotated[
    UiChoice | None,
    typer.Option("--ui", help="The UI to plan for where no WebUI is found (default a1111); "
                              "it must match the WebUI found."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", metavar="FAMILY|FILE", autocompletion=complete_model,
                 help=MODEL_HELP + " A family counts where the WebUI's checkpoint does not say (with no WebUI "
                                   "the default is sd15, what a fresh A1111 downloads)."),
]
FactsOpt = Annotated[
    Path | None,
    typer.Option("--facts", metavar="FILE",
                 help="Use the JSON `lowvram doctor --json` printed instead of probing (or $LOWVRAM_FACTS)."),
]
OffloadOpt = Annotated[
    OffloadChoice | None,
    typer.Option("--offload", help="Offload level: how much of the model the UI moves to RAM (none … lowvram); "
                                   "overrides the profile (auto = the least that fits)."),
]
LayoutOpt = Annotated[
    TriState | None,
    typer.Option("--layout", help="on = keep the model in VRAM and reserve memory (A1111, where VRAM can spill "
                                  "into RAM); off = swap parts of the model to RAM; auto = try both, keep the faster."),
]
SysmemOpt = Annotated[
    TriState | None,
    typer.Option("--sysmem-fallback", help="Whether the driver spills into RAM when VRAM runs out (on) or fails "
                                           "(off); overrides what lowvram detected."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (schema 1) instead of a table.")]


def _value(choice: enum.Enum | None) -> str | None:
    return None if choice is None else str(choice.value)


def overrides_from(
    *,
    profile: str | None = None,
    ui: UiChoice | None = None,
    model: str | None = None,
    offload: OffloadChoice | None = None,
    layout: TriState | None = None,
    sysmem_fallback: TriState | None = None,
    no_hook: bool = False,
    extra_args: tuple[str, ...] = (),
) -> Overrides:
    """The shared options as the policy's `Overrides` (None = not asked)."""
    offload_value = _value(offload)
    return Overrides(
        profile=profile.strip() if profile else None,
        ui=_value(ui),
        model=model.strip() if model and model.strip() else None,
        offload=offload_value,
        layout=_value(layout),
        sysmem_fallback=_value(sysmem_fallback),
        no_hook=no_hook,
        extra_args=tuple(extra_args),
    )
