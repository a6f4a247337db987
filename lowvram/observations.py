"""Observations: what the hook (inside the UI), `reserve --add` and `tune` recorded, one JSON line each.

The file is append-only JSON lines in the WebUI's state dir. Reading skips a corrupt line with a
warning and keeps the rest (DESIGN.md §8).
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("hook", "manual", "tuning")


@dataclass(frozen=True)
class Observation:
    """One generation (hook), one manual Task Manager reading, or one tuning probe."""

    time: float
    source: str  # hook | manual | tuning
    checkpoint: str | None = None  # markers.checkpoint_key(); None = WebUI-wide (manual)
    family: str | None = None
    flags: tuple[str, ...] = ()
    road: str | None = None  # swap | resident
    offload: str | None = None  # none | medvram-sdxl | medvram | lowvram | ...
    layout: bool = False  # the layout ran with this reserve
    reserve_mb: int | None = None
    free_mb: int | None = None  # free dedicated VRAM after the load, before any reserve
    overflow_mb: int | None = None  # shared memory used during generation
    peak_allocated_mb: int | None = None
    peak_reserved_mb: int | None = None
    vram_total_mb: int | None = None
    sit: float | None = None  # seconds per iteration
    width: int | None = None
    height: int | None = None
    batch: int | None = None
    steps: int | None = None
    ooms: int = 0
    ok: bool = True
    reason: str = ""
    driver: str | None = None
