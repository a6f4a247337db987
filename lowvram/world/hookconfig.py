"""The hook's config file (docs/architecture.md#the-hook): what the hook inside the UI reads at every job.

The hook imports nothing from lowvram, so this JSON is the whole interface: whether to lay out,
with which reserve, where to append observations, and the plan's context the hook cannot see
(road, offload, flags, driver) so its records can be matched to plans later. `apply` writes it;
`tune` rewrites `reserve_mb` between probes (the hook re-reads it at the next job).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowvram.core.plan import Plan
from lowvram.world import paths
from lowvram.world.fsutil import atomic_write_json

SCHEMA = 1
ORDERS = ("ascending", "descending", "original")


def build_hook_config(plan: Plan, webui: Path, *, driver: str | None = None, vram_total_mb: int | None = None,
                      tag: str | None = None) -> dict[str, Any]:
    order = plan.extra.get("layout_order", "ascending") if isinstance(plan.extra, dict) else "ascending"
    if order not in ORDERS:
        order = "ascending"
    return {
        "schema": SCHEMA,
        "enabled": plan.hook.enabled,
        "layout": bool(plan.reserve.applied),
        "reserve_mb": max(0, int(plan.reserve.mb)),
        "observations": str(paths.observations_path(webui).resolve()),
        "webui": str(Path(webui).resolve()),
        "road": plan.road,
        "offload": plan.offload,
        "family": plan.model_family,
        "flags": list(plan.args),
        "order": order,
        "model_first": bool(plan.extra.get("layout_model_first", True)) if isinstance(plan.extra, dict) else True,
        "driver": driver,
        "vram_total_mb": vram_total_mb,
        "tag": tag,
    }


def with_reserve(cfg: dict[str, Any], reserve_mb: int, *, layout: bool = True, tag: str | None = None) -> dict[str, Any]:
    """A copy of `cfg` with another reserve (what `tune` writes between probes)."""
    out = dict(cfg)
    out["reserve_mb"] = max(0, int(reserve_mb))
    out["layout"] = layout
    if tag is not None:
        out["tag"] = tag
    return out


def write_hook_config(path: Path, cfg: dict[str, Any]) -> None:
    """Atomic: the hook reads it at every job, possibly while `tune` rewrites it."""
    atomic_write_json(Path(path), cfg)
