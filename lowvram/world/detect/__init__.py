"""Detection: the edges that build `Facts` (docs/architecture.md#detection). The core never imports this package.

`resolve_webui` finds the WebUI a command is about; `gather_facts` probes the machine (or reads a
facts file) and that WebUI. The probing modules are imported lazily so a command that only
resolves a path does not pay for NVML or psutil.
"""

from __future__ import annotations

import os
from pathlib import Path

from lowvram.core.errors import WebuiError
from lowvram.core.facts import CudaEnv, Facts
from lowvram.world.detect.facts_file import load_facts_file
from lowvram.world.detect.webui import detect_flavor, not_a_webui, probe_webui

__all__ = ["cuda_env", "detect_flavor", "gather_facts", "probe_webui", "resolve_webui"]


def resolve_webui(arg: Path | None) -> Path | None:
    """The WebUI to work on: `arg`, else $LOWVRAM_WEBUI, else the cwd, else the last one used.

    An explicit path (argument or variable) that is not a WebUI is an error; the cwd and the
    remembered path are only used when they still are one.
    """
    if arg is not None:
        path = Path(arg).expanduser()
        if detect_flavor(path) is None:
            raise not_a_webui(path)
        return path.resolve()
    env = os.environ.get("LOWVRAM_WEBUI")
    if env:
        path = Path(env).expanduser()
        if detect_flavor(path) is None:
            err = not_a_webui(path)
            raise WebuiError(f"LOWVRAM_WEBUI: {err.message}", err.hint)
        return path.resolve()
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = None
    if cwd is not None and detect_flavor(cwd) is not None:
        return cwd.resolve()
    from lowvram.world import state

    last = state.last_webui()
    if last is not None and detect_flavor(last) is not None:
        return last.resolve()
    return None


def cuda_env() -> CudaEnv:
    return CudaEnv(
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        device_order=os.environ.get("CUDA_DEVICE_ORDER") or None,
    )


def gather_facts(webui: Path | None = None, facts_file: Path | None = None) -> Facts:
    """Facts from `facts_file` (or $LOWVRAM_FACTS) or from probing; the tree at `webui` read from disk."""
    if facts_file is None and os.environ.get("LOWVRAM_FACTS"):
        facts_file = Path(os.environ["LOWVRAM_FACTS"]).expanduser()
    if facts_file is not None:
        facts = load_facts_file(facts_file)
        if facts.cuda == CudaEnv():
            from dataclasses import replace

            facts = replace(facts, cuda=cuda_env())
        if webui is not None:
            facts = facts.with_webui(probe_webui(webui, os_name=facts.system.os))
        return facts

    from lowvram.world.detect import nvml
    from lowvram.world.detect.system import probe_other_gpus, probe_system
    from lowvram.world.detect.tcmalloc import probe_tcmalloc

    gpus, why_none = nvml.probe_gpus()
    driver = next((g.driver for g in gpus if g.driver), None)
    system = probe_system(driver)
    return Facts(
        system=system,
        gpus=gpus,
        other_gpus=probe_other_gpus(os_name=system.os, arch=system.arch),
        tcmalloc=probe_tcmalloc(system),
        webui=probe_webui(webui, os_name=system.os) if webui is not None else None,
        cuda=cuda_env(),
        nvml_error=why_none,
    )
