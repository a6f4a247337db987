"""lowvram's remembered choices (last.json): the last WebUI path and explicit profiles per WebUI.

docs/architecture.md#from-facts-to-a-launch (step 2): an explicit `--profile` given to apply/launch/setup on a WebUI that was found is
remembered for it; `--profile auto` forgets it. plan, doctor and estimate never write here, and
nothing is remembered for a run with `--facts`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowvram.world import paths
from lowvram.world.fsutil import UnsafeFileError, atomic_write_json, read_regular_bytes

MAX_BYTES = 1024 * 1024


def _load() -> dict[str, Any]:
    """last.json, or {} when it is missing, damaged, huge or not a file (a FIFO there never blocks:
    the type is checked before opening); `remember` then replaces it."""
    try:
        raw = read_regular_bytes(paths.last_json(), MAX_BYTES, "remembered-choices file")
        data = json.loads(raw.decode("utf-8")) if raw is not None else {}
    except (UnsafeFileError, ValueError, RecursionError):
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
    if paths.last_json().is_dir() and not paths.last_json().is_symlink():
        return  # a folder in its place: nothing to remember into (and nothing worth failing over)
    atomic_write_json(paths.last_json(), data)
