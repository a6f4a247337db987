"""The hook's config: read from the JSON file named by LOWVRAM_CONFIG at every job.

Re-reading at every job is what lets `lowvram tune` change the reserve between probes without a
restart. A missing, unreadable or malformed file never breaks the UI: the hook just does nothing
(and says why once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

ORDERS = ("ascending", "descending", "original")
OFF_VALUES = ("off", "0", "false", "no", "disabled")
MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """The config file exists but cannot be used; the message says why in one line."""


@dataclass(frozen=True)
class HookConfig:
    observations: str
    layout: bool = False
    reserve_mb: int = 0
    enabled: bool = True
    road: str | None = None
    offload: str | None = None
    family: str | None = None
    flags: tuple[str, ...] = field(default_factory=tuple)
    order: str = "ascending"
    driver: str | None = None
    tag: str | None = None
    model_first: bool = True  # the UNet goes back before every other tensor (giant-kitten's default)

    @property
    def layout_key(self) -> tuple[int, str, bool]:
        """What a layout depends on: a change of any of these lays the model out again."""
        return (self.reserve_mb, self.order, self.model_first)


def hook_disabled(env: Mapping[str, str]) -> bool:
    return env.get("LOWVRAM_HOOK", "").strip().lower() in OFF_VALUES


def _opt_str(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"`{key}` should be a string")
    return value


def parse_config(data: object) -> HookConfig:
    if not isinstance(data, dict):
        raise ConfigError("not a JSON object")
    if data.get("schema") != 1:
        raise ConfigError(f"unknown schema {data.get('schema')!r} (this hook reads schema 1)")
    observations = data.get("observations")
    if not isinstance(observations, str) or not os.path.isabs(observations):
        raise ConfigError("`observations` should be an absolute path")
    layout = data.get("layout", False)
    if not isinstance(layout, bool):
        raise ConfigError("`layout` should be true or false")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError("`enabled` should be true or false")
    reserve = data.get("reserve_mb", 0)
    if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or not 0 <= reserve < 1 << 24:
        raise ConfigError("`reserve_mb` should be a number of MiB ≥ 0")
    flags = data.get("flags") or []
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise ConfigError("`flags` should be a list of strings")
    order = data.get("order") or "ascending"
    if order not in ORDERS:
        raise ConfigError(f"`order` should be one of {', '.join(ORDERS)}")
    model_first = data.get("model_first", True)
    if not isinstance(model_first, bool):
        raise ConfigError("`model_first` should be true or false")
    return HookConfig(
        observations=observations,
        layout=layout,
        reserve_mb=int(reserve),
        enabled=enabled,
        road=_opt_str(data, "road"),
        offload=_opt_str(data, "offload"),
        family=_opt_str(data, "family"),
        flags=tuple(flags),
        order=order,
        model_first=model_first,
        driver=_opt_str(data, "driver"),
        tag=_opt_str(data, "tag"),
    )


def read_config(path: str) -> HookConfig:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError as exc:
        raise ConfigError(f"config {path} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config {path} is too large")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"config {path} is not valid JSON ({exc.__class__.__name__})") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc


def load_from_env(env: Mapping[str, str]) -> tuple[HookConfig | None, str | None]:
    """(config, None) when usable; (None, why) when the hook should do nothing this job."""
    if hook_disabled(env):
        return None, "LOWVRAM_HOOK=off"
    path = env.get("LOWVRAM_CONFIG", "").strip()
    if not path:
        return None, "LOWVRAM_CONFIG is not set"
    try:
        cfg = read_config(path)
    except ConfigError as exc:
        return None, str(exc)
    if not cfg.enabled:
        return None, "the config says enabled: false"
    return cfg, None
