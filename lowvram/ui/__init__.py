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
from lowvram.ui.forge_neo import ForgeNeo
from lowvram.ui.reforge import ReForge
from lowvram.ui.sdnext import SdNext

UIS = ("a1111", "forge", "sdnext", "comfyui", "forge-neo", "reforge")

_ADAPTERS: dict[str, UiAdapter] = {"a1111": A1111(), "forge": Forge(), "sdnext": SdNext(), "comfyui": ComfyUI(),
                                    "forge-neo": ForgeNeo(), "reforge": ReForge()}


# Forge and the UIs that fork it (Forge Neo, reForge): one webui.sh, one installer, one way of loading models.
FORGE_LINEAGE = tuple(key for key, ui in _ADAPTERS.items() if ui.lineage == "forge")


def lineage_key(ui: str) -> str:
    """The UI whose behaviour `ui` shares where lowvram has one model of it (the estimator, the VAE, the
    streaming of what does not fit): "forge" for Forge Neo and reForge, `ui` itself otherwise."""
    found = _ADAPTERS.get(ui)
    return found.lineage if found is not None and found.lineage else ui


def adapter(ui: str) -> UiAdapter:
    try:
        return _ADAPTERS[ui]
    except KeyError:
        raise FlagError(f"unknown UI {ui!r}", f"use one of: {', '.join(UIS)}") from None


def validate(ui: str, version: str | None, args: Sequence[str]) -> list[ParsedFlag]:
    """Every flag exists in that UI (version), values fit, nothing contradicts; else FlagError."""
    return adapter(ui).validate(list(args), version)


__all__ = [
    "FORGE_LINEAGE",
    "UIS",
    "Contradiction",
    "FlagSet",
    "FlagSpec",
    "ParsedFlag",
    "Rendered",
    "UiAdapter",
    "UiSettings",
    "adapter",
    "lineage_key",
    "parse_args",
    "parse_ui_version",
    "validate",
]
