"""UI adapters: one per WebUI, turning the plan's semantic settings into that UI's real flags.

`validate(ui, version, args)` checks flags against the UI's flag list (data in ui/flags/);
`adapter(ui)` gives the adapter for rendering and contradiction checks.
"""

from __future__ import annotations

from collections.abc import Sequence

from lowvram.core.errors import FlagError
from lowvram.ui.a1111 import A1111, parse_ui_version
from lowvram.ui.base import (
    Contradiction,
    FlagSet,
    FlagSpec,
    ParsedFlag,
    Rendered,
    UiAdapter,
    UiSettings,
    parse_args,
)
from lowvram.ui.comfyui import ComfyUI
from lowvram.ui.forge import Forge
from lowvram.ui.sdnext import SdNext

UIS = ("a1111", "forge", "sdnext", "comfyui")

_ADAPTERS: dict[str, UiAdapter] = {"a1111": A1111(), "forge": Forge(), "sdnext": SdNext(), "comfyui": ComfyUI()}


def adapter(ui: str) -> UiAdapter:
    try:
        return _ADAPTERS[ui]
    except KeyError:
        raise FlagError(f"unknown UI {ui!r}", f"use one of: {', '.join(UIS)}") from None


def validate(ui: str, version: str | None, args: Sequence[str]) -> list[ParsedFlag]:
    """Every flag exists in that UI (version), values fit, nothing contradicts; else FlagError."""
    return adapter(ui).validate(list(args), version)


__all__ = [
    "UIS",
    "Contradiction",
    "FlagSet",
    "FlagSpec",
    "ParsedFlag",
    "Rendered",
    "UiAdapter",
    "UiSettings",
    "adapter",
    "parse_args",
    "parse_ui_version",
    "validate",
]
