"""What a WebUI tree holds of lowvram's plan now, against the plan lowvram would apply next.

`lowvram tune` measures and then puts the tree back byte for byte (world/tune/snapshot.py), so after
it the tree still holds what `lowvram apply` (or `launch`) wrote last: the managed block in
webui-user and the hook's config (reserve, road) in the state dir. `applied_against` reads both,
without writing or locking anything, and says whether they are already what `apply` would write
for the given plan, so tune can tell the user whether to run `lowvram apply`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowvram.core.errors import LowvramError
from lowvram.world import paths

if TYPE_CHECKING:
    from lowvram.core.plan import Plan

MAX_HOOK_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Applied:
    """The plan lowvram's files in the tree hold. `file` is None when nothing is applied."""

    file: str | None = None  # the webui-user file holding the block, relative to the tree
    args: tuple[str, ...] = ()  # the flags the block appends
    road: str | None = None  # from the hook's config (None: no hook config)
    reserve_mb: int | None = None  # the reserve the hook keeps (None: no layout)
    current: bool = False  # the block and the hook config are what `apply` would write for the plan


def _hook_config(webui: Path) -> dict[str, Any] | None:
    from lowvram.world.fsutil import read_regular_bytes

    try:
        raw = read_regular_bytes(paths.hook_config_path(webui), MAX_HOOK_CONFIG_BYTES, "hook config")
        data = json.loads(raw) if raw is not None else None
    except (LowvramError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _block(webui: Path) -> tuple[str, str, bytes, bytes] | None:
    """(file, kind, the file's bytes, lowvram's block in it) as the manifest records it, else None."""
    from lowvram.world.apply import webui_user
    from lowvram.world.apply.manifest import Manifest

    manifest = Manifest.load(webui, read_only=True)
    if manifest.broken or not manifest.exists:
        return None
    for key, entry in sorted(manifest.files.items()):
        if "block_sha256" not in entry:
            continue
        kind = webui_user.SH if key.endswith(".sh") else webui_user.BAT
        try:
            data = webui_user.read_bytes(webui / key)
            block = webui_user.block_bytes(data, kind, recorded=str(entry["block_sha256"])) if data else None
        except LowvramError:  # damaged or copied: doctor says so; here it holds no plan
            continue
        if block is not None and data is not None:
            return key, kind, data, block
    return None


def applied_against(plan: Plan, webui: Path) -> Applied:
    """What the tree at `webui` holds of lowvram's plan, and whether that is `plan` already."""
    from lowvram.world.apply import webui_user

    webui = Path(webui).resolve()
    found = _block(webui)
    if found is None:
        return Applied()
    key, kind, data, block = found
    hook = plan.ui == "a1111" and bool(plan.hook.enabled)
    wanted = webui_user.encode_block(
        webui_user.render_block(webui_user.block_vars(plan, str(paths.hook_config_path(webui)) if hook else None),
                                kind, webui_user.newline_of(data, kind)), kind, data)
    cfg = _hook_config(webui) or {}
    road = cfg.get("road") if isinstance(cfg.get("road"), str) else None
    reserve = cfg.get("reserve_mb") if cfg.get("layout") is True and isinstance(cfg.get("reserve_mb"), int) else None
    planned_reserve = int(plan.reserve.mb) if plan.reserve.applied else None
    current = block == wanted and (not hook or (road == plan.road and reserve == planned_reserve))
    return Applied(key, webui_user.block_args(block, kind), road, reserve, current)
