"""Forge's memory settings in its config.json, as managed keys (docs/architecture.md#safety-on-the-users-tree).

Forge keeps GPU Weights, Swap Method and Swap Location as `shared.opts` keys in the tree's config.json:
`forge_inference_memory` (MiB kept free for the computation; GPU Weights = total − this),
`forge_async_loading` (Queue | Async) and `forge_pin_shared_memory` (CPU | Shared). A browser page load
sets the slider from the UI preset (modules_forge/main_entry.py `on_preset_change`): `xl_GPU_MB` /
`flux_GPU_MB` for the 'xl' and 'flux' presets, total − 1024 for 'sd' and 'all', and Swap Method and
Swap Location back to Queue and CPU in every preset. So apply writes the plan's values for the three keys
and, for SDXL or a diffusion transformer, the preset's GPU Weights. With `--api --nowebui` Forge does not
apply the stored values at start (no page load): only a POST to /sdapi/v1/options makes them live there.

The manifest records, per key, whether the user had it and its value, and what lowvram wrote
(`config_keys["config.json"]["forge_settings"]`): `revert` puts the file back byte for byte when nobody
touched it since (the manifest's backup), else only lowvram's keys that still hold what it wrote; the
user's other settings, and a key the user changed since, stay.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowvram.core.errors import ApplyError, LowvramError
from lowvram.core.estimate.dit import DIT_FAMILIES
from lowvram.core.plan import Plan
from lowvram.core.policy.forge_tuned import FORGE_SLIDER_UIS, SWAP_LOCATIONS, SWAP_METHODS
from lowvram.world import fsutil
from lowvram.world.apply.manifest import Manifest, rel

CONFIG = "config.json"
ENTRY = "forge_settings"
MAX_CONFIG_BYTES = 64 * 1024 * 1024
WHAT = "Forge's settings file"


def preset_key(family: str | None) -> str | None:
    """The per-preset GPU Weights a page load resets the slider to, for the preset Forge has for `family`."""
    if family in ("sdxl", "sdxl-refiner"):
        return "xl_GPU_MB"
    if family in DIT_FAMILIES:
        return "flux_GPU_MB"
    return None


def wanted(plan: Plan) -> dict[str, Any]:
    """The config.json keys the plan decides (empty where the UI has no GPU Weights slider or nothing was decided)."""
    inference = plan.decision("forge_inference_memory")
    if plan.ui not in FORGE_SLIDER_UIS or inference is None or not isinstance(inference.value, int):
        return {}
    keys: dict[str, Any] = {"forge_inference_memory": inference.value}
    weights = plan.decision("forge.gpu_weights_mb")
    key = preset_key(plan.model_family)
    if key is not None and weights is not None and isinstance(weights.value, int) and weights.value > 0:
        keys[key] = weights.value
    for setting, allowed in (("forge_async_loading", SWAP_METHODS), ("forge_pin_shared_memory", SWAP_LOCATIONS)):
        d = plan.decision(setting)
        if d is not None and d.value in allowed:  # values Forge does not validate: checked here
            keys[setting] = d.value
    return keys


@dataclass(frozen=True)
class ConfigChange:
    """config.json before and after writing the plan's keys; `real` is where the write goes (a link's target)."""

    path: Path
    real: Path
    old: bytes | None
    new: bytes
    before: dict[str, Any]
    keys: dict[str, Any]

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def describe(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.keys.items())


def _indent(text: str) -> int | None:
    m = re.search(r"^\{\s*\n([ \t]+)\"", text)
    return len(m.group(1).expandtabs(4)) if m else (None if text.strip() else 4)


def _damaged(path: Path, why: str) -> ApplyError:
    return ApplyError(f"{WHAT} {path} {why}, so lowvram cannot add Forge's memory settings to it",
                      "fix it or move it aside (Forge writes a fresh one at its next start), then run apply again; "
                      "nothing was changed")


def read_config(path: Path) -> tuple[bytes | None, str, dict[str, Any]]:
    """(bytes, text, parsed) of config.json; ApplyError for one that is damaged or not a JSON object."""
    try:
        raw = fsutil.read_regular_bytes(path, MAX_CONFIG_BYTES, WHAT)
    except LowvramError as exc:
        raise ApplyError(exc.message, "move it aside (Forge writes a fresh one at its next start); nothing was "
                                      "changed") from exc
    if raw is None:
        return None, "", {}
    try:
        text = raw.decode("utf-8")
        data = json.loads(text)
    except UnicodeDecodeError:
        raise _damaged(path, "is not UTF-8 text") from None
    except (ValueError, RecursionError):
        raise _damaged(path, "is not valid JSON") from None
    if not isinstance(data, dict):
        raise _damaged(path, f"holds a JSON {type(data).__name__}, not an object of settings")
    return raw, text, data


def _encode(text: str, data: dict[str, Any]) -> bytes:
    new_text = json.dumps(data, indent=_indent(text), ensure_ascii=text.isascii() if text else False)
    if text.endswith("\n"):
        new_text += "\n"
    return new_text.encode("utf-8")


def plan_change(webui: Path, plan: Plan) -> ConfigChange | None:
    """What apply would write into config.json for `plan` (None: nothing), checked before any write:
    a link out of the tree, a damaged file or one that is not a JSON object is refused with one line."""
    keys = wanted(plan)
    if not keys:
        return None
    path = Path(webui) / CONFIG
    real = fsutil.write_target(path, webui, WHAT)  # a link inside the tree stays a link; out of it: refused
    raw, text, data = read_config(path)
    new = raw if raw is not None and all(k in data and data[k] == v and type(data[k]) is type(v)
                                         for k, v in keys.items()) else _encode(text, {**data, **keys})
    return ConfigChange(path=path, real=real, old=raw, new=new, before=data, keys=keys)


def commit(change: ConfigChange, manifest: Manifest) -> None:
    """Record the keys (the user's values, kept from the first apply while they still hold lowvram's) and the
    file's bytes in the manifest, save it, then write config.json atomically."""
    key = rel(manifest.webui, change.path)
    entry = manifest.config_keys.setdefault(key, {})
    found = entry.get(ENTRY)
    recorded: dict[str, Any] = found if isinstance(found, dict) else {}
    keys: dict[str, Any] = {}
    for name, value in change.keys.items():
        earlier = recorded.get(name)
        if isinstance(earlier, dict) and name in change.before and change.before[name] == earlier.get("wrote"):
            keys[name] = {**earlier, "wrote": value}  # still lowvram's: the user's value stays the one recorded
        else:
            keys[name] = {"had": name in change.before, "old": change.before.get(name), "wrote": value}
    entry[ENTRY] = {**recorded, **keys}
    if change.changed or key not in manifest.files:
        manifest.record_file(change.path, change.old, change.new)
    manifest.save()
    if change.changed:
        fsutil.atomic_write_bytes(change.real, change.new)


def put_back(webui: Path, key: str, changes: dict[str, Any]) -> bool:
    """After the user or Forge changed config.json: each of lowvram's keys that still holds what lowvram wrote
    gets the user's value back (or goes, where the user had none). Returns whether the file was written."""
    recorded = changes.get(ENTRY)
    if not isinstance(recorded, dict) or not recorded:
        return False
    path = Path(webui) / key
    try:
        raw, text, data = read_config(path)
    except ApplyError:
        return False  # damaged since: nothing of it is touched
    if raw is None:
        return False
    touched = False
    for name, entry in recorded.items():
        if not isinstance(entry, dict) or name not in data or data[name] != entry.get("wrote"):
            continue  # changed since (the user's slider, a page load): the value there now stays
        if entry.get("had"):
            data[name] = entry.get("old")
        else:
            del data[name]
        touched = True
    if not touched:
        return False
    fsutil.atomic_write_bytes(path, _encode(text, data), within=Path(webui))
    return True
