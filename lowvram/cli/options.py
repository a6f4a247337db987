"""The plan options every planning command shares (plan, apply, launch, tune, setup).

Declared once so the commands spell them, document them and validate them the same way;
`overrides_from()` turns them into the `Overrides` the policy takes (via `world/plan_inputs.py`).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from lowvram.core.plan import Overrides


class UiChoice(str, enum.Enum):
    a1111 = "a1111"
    forge = "forge"
    sdnext = "sdnext"
    comfyui = "comfyui"


class ModelChoice(str, enum.Enum):
    sd15 = "sd15"
    sd2 = "sd2"
    sdxl = "sdxl"


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


ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", metavar="NAME|auto",
                 help="Profile to plan with (see `lowvram profiles list`); `auto` picks one from the machine."),
]
WebuiOpt = Annotated[
    Path | None,
    typer.Option("--webui", metavar="PATH",
                 help="The WebUI tree (default: $LOWVRAM_WEBUI, the current directory, the last one used)."),
]
UiOpt = Annotated[
    UiChoice | None,
    typer.Option("--ui", help="Target UI when no WebUI tree is found (default a1111)."),
]
ModelOpt = Annotated[
    ModelChoice | None,
    typer.Option("--model", help="Model family, when the WebUI's selected checkpoint does not say."),
]
FactsOpt = Annotated[
    Path | None,
    typer.Option("--facts", metavar="FILE",
                 help="Use the JSON `lowvram doctor --json` printed instead of probing (or $LOWVRAM_FACTS)."),
]
OffloadOpt = Annotated[
    OffloadChoice | None,
    typer.Option("--offload", help="Offload rung; overrides the profile (auto = the first rung that fits)."),
]
LayoutOpt = Annotated[
    TriState | None,
    typer.Option("--layout", help="on = resident road (layout + reserve), off = swap road, auto = explore."),
]
SysmemOpt = Annotated[
    TriState | None,
    typer.Option("--sysmem-fallback", help="Override what lowvram believes the driver does when VRAM runs out."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (schema 1) instead of a table.")]


def _value(choice: enum.Enum | None) -> str | None:
    return None if choice is None else str(choice.value)


def overrides_from(
    *,
    profile: str | None = None,
    ui: UiChoice | None = None,
    model: ModelChoice | None = None,
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
        model=_value(model),
        offload=offload_value,
        layout=_value(layout),
        sysmem_fallback=_value(sysmem_fallback),
        no_hook=no_hook,
        extra_args=tuple(extra_args),
    )
