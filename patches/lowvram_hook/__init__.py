"""lowvram's hook inside the WebUI's own Python (docs/architecture.md#the-hook).

It imports only the standard library, torch and the host UI's modules (each guarded), and no
lowvram module: it talks to lowvram through two files, the config it reads at every job
(`LOWVRAM_CONFIG`) and the observations it appends to.
"""

from __future__ import annotations

import sys

HOOK_VERSION = "2"
PREFIX = "[lowvram-layout]"


def log(message: str) -> None:
    """One line on stderr, where the UI's console shows it; never raises."""
    try:
        sys.stderr.write(f"{PREFIX} {message}\n")
        sys.stderr.flush()
    except Exception:
        pass
