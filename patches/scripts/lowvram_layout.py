"""lowvram's layout hook for A1111 (installed by `lowvram apply`, removed by `lowvram revert`).

A1111 imports this file with the extension's folder on sys.path; the work is in the
`lowvram_hook` package beside it. Without LOWVRAM_CONFIG (or with LOWVRAM_HOOK=off) it does
nothing; any failure is one log line, never an error in the UI.
"""

from __future__ import annotations

import os
import sys

_EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOOK = None
_scripts = None
try:
    if _EXT_DIR not in sys.path:
        sys.path.insert(0, _EXT_DIR)
    from lowvram_hook import host as _host

    HOOK, _scripts = _host.install()
except Exception as _exc:  # the UI must start whatever happens here
    sys.stderr.write(f"[lowvram-layout] hook off: {type(_exc).__name__}: {_exc}\n")
    HOOK, _scripts = None, None

if HOOK is not None and _scripts is not None:

    class LowvramLayout(_scripts.Script):  # type: ignore[name-defined,misc]
        """Runs a pending layout before each job and records the job afterwards."""

        def title(self) -> str:
            return "lowvram layout"

        def show(self, is_img2img: bool) -> object:
            return _scripts.AlwaysVisible

        def process(self, p: object, *args: object) -> None:
            HOOK.process(p)

        def postprocess(self, p: object, processed: object, *args: object) -> None:
            HOOK.postprocess(p, processed)
