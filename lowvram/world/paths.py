"""Where lowvram keeps its own files (docs/architecture.md#lowvrams-own-files).

`LOWVRAM_HOME` moves everything (tests use it); otherwise user profiles live in the platformdirs
user config dir and the rest in its user state dir. Nothing here creates directories: writers do
that when they first write.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

APP = "lowvram"


def home_override() -> Path | None:
    value = os.environ.get("LOWVRAM_HOME")
    return Path(value).expanduser() if value else None


def config_dir() -> Path:
    home = home_override()
    if home is not None:
        return home
    import platformdirs

    return Path(platformdirs.user_config_dir(APP, appauthor=False))


def state_dir() -> Path:
    home = home_override()
    if home is not None:
        return home
    import platformdirs

    return Path(platformdirs.user_state_dir(APP, appauthor=False))


def data_dir() -> Path:
    """Where `lowvram setup` puts a WebUI by default (the user's data dir)."""
    home = home_override()
    if home is not None:
        return home / "data"
    import platformdirs

    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def user_profiles_dir() -> Path:
    return config_dir() / "profiles"


def last_json() -> Path:
    return state_dir() / "last.json"


def webui_id(webui: Path) -> str:
    """A short, stable id for one WebUI install: a hash of its resolved path."""
    resolved = str(Path(webui).expanduser().resolve())
    return hashlib.sha256(resolved.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def webui_state_dir(webui: Path) -> Path:
    return state_dir() / "webuis" / webui_id(webui)


def manifest_path(webui: Path) -> Path:
    return webui_state_dir(webui) / "manifest.json"


def backups_dir(webui: Path) -> Path:
    return webui_state_dir(webui) / "backups"


def hook_config_path(webui: Path) -> Path:
    return webui_state_dir(webui) / "hook.json"


def observations_path(webui: Path) -> Path:
    return webui_state_dir(webui) / "observations.jsonl"


def lock_path(webui: Path) -> Path:
    return webui_state_dir(webui) / "lock"


def package_root() -> Path:
    return Path(__file__).resolve().parents[1]  # lowvram/, above world/


def _bundled(name: str) -> Path:
    """profiles/ and patches/ sit at the repo top level and are force-included in the wheel."""
    inside = package_root() / "_bundled" / name
    if inside.is_dir():
        return inside
    return package_root().parent / name


def bundled_profiles_dir() -> Path:
    return _bundled("profiles")


def bundled_patches_dir() -> Path:
    return _bundled("patches")


def data_file(name: str) -> Path:
    return package_root() / "data" / name
