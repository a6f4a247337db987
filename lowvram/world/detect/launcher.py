"""Which kind of `webui.sh` a tree has: what it reads before starting the UI, and how it starts it.

Two launchers are out there. A1111's (and Forge's, Forge Classic's, reForge's) sources `webui-user.sh`,
runs `${python_cmd} ${LAUNCH_SCRIPT}`, refuses root unless `-f` comes first, and exits with the UI's
status. Forge Neo's sources `webui.settings.sh` from the working directory (its `webui-user.sh`, where
there is one, only sets variables and runs `webui.sh`), runs `"$PYTHON" launch.py "$@"` (no
LAUNCH_SCRIPT, no root check: a `-f` would reach launch.py's parser) and ends with `read -n 1` after
"Press any key to continue...", so its exit status is that read's, not the UI's.

The tree's own webui.sh decides (read as text, never run); where it says neither (missing, unreadable,
a stand-in), the UI's flavor does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lowvram.core.errors import LowvramError
from lowvram.world.fsutil import read_regular_bytes

A1111 = "a1111"
SETTINGS = "settings"
SETTINGS_SH = "webui.settings.sh"
MAX_LAUNCHER_BYTES = 1024 * 1024  # webui.sh is a few KiB

# `source FILE` / `. FILE` at the start of a line, FILE possibly quoted or behind a folder ("$SCRIPT_DIR"/...).
_SOURCES = r"(?m)^[ \t]*(?:source|\.)[ \t]+[^\n#;&|]*?{name}\b"
_SOURCES_USER_RE = re.compile(_SOURCES.format(name=r"webui-user\.sh"))
_SOURCES_SETTINGS_RE = re.compile(_SOURCES.format(name=r"webui\.settings\.sh"))
# webui-user.sh running webui.sh at its top level (`exec ./webui.sh`, `"$(dirname "$0")/webui.sh" "$@"`, `bash webui.sh`)
_RUNS_WEBUI_RE = re.compile(
    r"""(?m)^[ \t]*(?:exec[ \t]+)?(?:bash[ \t]+)?"""
    r"""(?:"\$\(dirname "\$0"\)/webui\.sh"|"?\$\(dirname "?\$0"?\)"?/webui\.sh|["']?[^\s'"#;&|]*webui\.sh["']?)"""
    r"""(?P<rest>[^\n]*)$""")


@dataclass(frozen=True)
class Launcher:
    """How a tree's webui.sh starts the UI (module docstring)."""

    style: str  # a1111 | settings
    decided_by: str  # "webui.sh" (its text said) or "flavor" (it did not)

    @property
    def block_file(self) -> str:
        """The file webui.sh reads that lowvram's managed block goes into."""
        return SETTINGS_SH if self.style == SETTINGS else "webui-user.sh"


def style_of_text(text: str | None, flavor: str | None) -> Launcher:
    """The launcher a webui.sh's `text` is; None or a text that sources neither file: by `flavor`."""
    if text is not None:
        if _SOURCES_USER_RE.search(text):
            return Launcher(A1111, "webui.sh")
        if _SOURCES_SETTINGS_RE.search(text):
            return Launcher(SETTINGS, "webui.sh")
    return Launcher(SETTINGS if flavor == "forge-neo" else A1111, "flavor")


def read_script(path: Path) -> str | None:
    """A launcher script's text; None when missing or not a regular file lowvram can read safely (a FIFO,
    a folder: never opened, so nothing blocks)."""
    try:
        data = read_regular_bytes(Path(path), MAX_LAUNCHER_BYTES, "launcher script")
    except LowvramError:
        return None
    return None if data is None else data.decode("utf-8", "replace")


def read_launcher(webui: Path, flavor: str | None) -> Launcher:
    """The tree's launcher; a webui.sh lowvram cannot read safely counts as missing."""
    return style_of_text(read_script(Path(webui) / "webui.sh"), flavor)


def runs_webui_sh(text: str) -> tuple[bool, bool]:
    """(whether a webui-user.sh runs webui.sh at its top level, whether it passes its own "$@" on)."""
    m = _RUNS_WEBUI_RE.search(text)
    return m is not None, m is not None and "$@" in m.group("rest")
