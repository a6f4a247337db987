"""The user's words for lowvram's own terms, in one place so every screen says them alike.

`plan`, `doctor`, `reserve` and `tune` explain the two roads in these words; the terms that must
stay (flag names, JSON keys and values such as `road: swap`) are explained in README's "Words
lowvram uses".
"""

from __future__ import annotations

SWAP = "swap parts of the model to RAM"
RESIDENT = "keep the model in VRAM and reserve memory"
ROADS = {"swap": SWAP, "resident": RESIDENT}


def road_words(road: str) -> str:
    """What a road does, in the user's words (`swap` → "swap parts of the model to RAM")."""
    return ROADS.get(road, road)


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 warning`, `2 warnings` (`many` where adding an s is wrong)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"
