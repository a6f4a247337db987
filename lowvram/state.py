"""lowvram's remembered choices (last.json): the last WebUI path and explicit profiles per WebUI.

DESIGN.md §1: an explicit `--profile` given to apply/launch/setup on a WebUI that was found is
remembered for it; `--profile auto` forgets it. plan, doctor and estimate never write here, and
nothing is remembered for a run with `--facts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowvram import paths
from lowvram.fsutil import atomic_write_json


def _load() -> dict[str, Any]:
    try:
        data = json.loads(paths.last_json().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def last_webui() -> Path | None:
    value = _load().get("webui")
    return Path(value) if isinstance(value, str) and value else None


def remembered_profile(webui: Path) -> str | None:
    profiles = _load().get("profiles")
    if not isinstance(profiles, dict):
        return None
    value = profiles.get(str(Path(webui).resolve()))
    return value if isinstance(value, str) else None


def remember(webui: Path, profile: str | None = None) -> None:
    """Remember `webui` as the last one used; with a profile name, remember it for that WebUI.

    `profile="auto"` forgets a remembered profile; `None` leaves it as it is.
    """
    data = _load()
    key = str(Path(webui).resolve())
    data["schema"] = 1
    data["webui"] = key
    profiles = data.get("profiles")
    if not isinstance(profiles, dict):
        profiles = {}
    if profile == "auto":
        profiles.pop(key, None)
    elif profile is not None:
        profiles[key] = profile
    data["profiles"] = profiles
    atomic_write_json(paths.last_json(), data)
