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

__all__ = ["cuda_env", "detect_flavor", "gather_facts", "locate_webui", "probe_webui", "require_webui", "resolve_webui"]


# How `locate_webui` found the tree, in the words the error lines use.
FROM_ARG = "--webui"
FROM_ENV = "LOWVRAM_WEBUI"
FROM_CWD = "the current folder"
FROM_PARENT = "a folder above the current one"
FROM_LAST = "remembered from the last apply/launch"

NO_WEBUI_HINT = "pass --webui PATH, set LOWVRAM_WEBUI, or run lowvram inside the WebUI's folder"


def _counts(path: Path, applied_ok: bool) -> bool:
    """A WebUI, or (for revert) a folder lowvram applied a plan to and still has the manifest of."""
    if detect_flavor(path) is not None:
        return True
    if not applied_ok:
        return False
    from lowvram.world import paths

    try:
        return paths.manifest_path(path).is_file()
    except OSError:
        return False


def locate_webui(arg: Path | None, *, applied_ok: bool = False) -> tuple[Path, str] | None:
    """The WebUI a command is about, and how it was found (docs/architecture.md#the-cli-contract): `arg`,
    else $LOWVRAM_WEBUI, else the current folder or the nearest folder above it that is a WebUI, else
    the last one used. Every command that works on a WebUI finds it here.

    An explicit path (argument or variable) that is not a WebUI is an error; the current folder and
    the remembered path are only used when they still are one. `applied_ok` (revert) also takes a
    folder lowvram holds a manifest for, so a tree that no longer looks like a WebUI can be reverted.
    """
    if arg is not None:
        path = Path(arg).expanduser()
        if not _counts(path, applied_ok):
            raise not_a_webui(path)
        return path.resolve(), FROM_ARG
    env = os.environ.get("LOWVRAM_WEBUI")
    if env:
        path = Path(env).expanduser()
        if not _counts(path, applied_ok):
            err = not_a_webui(path)
            raise WebuiError(f"LOWVRAM_WEBUI: {err.message}", err.hint)
        return path.resolve(), FROM_ENV
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = None
    if cwd is not None:
        for i, folder in enumerate((cwd, *cwd.parents)):
            if _counts(folder, applied_ok):
                return folder.resolve(), FROM_PARENT if i else FROM_CWD
    from lowvram.world import state

    last = state.last_webui()
    if last is not None and _counts(last, applied_ok):
        return last.resolve(), FROM_LAST
    return None


def resolve_webui(arg: Path | None, *, applied_ok: bool = False) -> Path | None:
    """The WebUI to work on (`locate_webui`'s path), or None where there is none."""
    found = locate_webui(arg, applied_ok=applied_ok)
    return found[0] if found else None


def require_webui(arg: Path | None, *, why: str, applied_ok: bool = False) -> Path:
    """`resolve_webui` for a command that cannot work without a WebUI: none found is one error line."""
    found = resolve_webui(arg, applied_ok=applied_ok)
    if found is None:
        raise WebuiError(f"no WebUI found: {why}", NO_WEBUI_HINT)
    return found


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
