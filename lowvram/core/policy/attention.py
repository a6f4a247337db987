"""The attention backend: xformers where the card and the venv's torch allow it, else SDP, or the UI's own
pick (docs/architecture.md#the-policy, "Attention")."""

from __future__ import annotations

from collections.abc import Mapping

from lowvram.core.facts import Facts, GpuFacts
from lowvram.core.policy.builder import Builder, GpuStep, Inputs, UiStep
from lowvram.ui import lineage_key
from lowvram.ui.base import UiAdapter


def _torch_base(version: str | None) -> str | None:
    return version.split("+", 1)[0].strip() if version else None


def xformers_usable(ui: UiAdapter, gpu: GpuFacts | None, facts: Facts, *,
                    assume_gpu: bool = False, xformers_builds: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """docs/architecture.md#the-policy: sm 6.0–9.0, and the xformers the UI installs matches the venv's torch (or no torch yet).

    An xformers already in the venv is the one that loads (A1111 installs its pin only when xformers
    is missing), so when `xformers_builds` (xformers version → the torch it was built for, data)
    knows it, that build must match the venv's torch instead.
    assume_gpu: no GPU is visible but an explicit profile is planned as written for one.
    """
    sm = "the profile's GPU"
    if gpu is None and not assume_gpu:
        return False, "no NVIDIA GPU"
    if gpu is not None:
        cc = gpu.cc_tuple
        if cc is None:
            return False, "the GPU's compute capability is unknown"
        if not (6, 0) <= cc <= (9, 0):
            return False, f"xformers needs compute capability 6.0–9.0 (this GPU is {gpu.compute_capability})"
        sm = f"sm {gpu.compute_capability}"
    if ui.pinned_xformers is None:
        return False, f"{ui.title} does not install xformers through a flag"
    xf, torch_for = ui.pinned_xformers
    torch_now = _torch_base(facts.webui.torch) if facts.webui else None
    installed = _torch_base(facts.webui.xformers) if facts.webui else None
    built_for = (xformers_builds or {}).get(installed or "")
    if installed and built_for and torch_now:
        if built_for == torch_now:
            return True, f"{sm}; the venv's xformers {installed} is built for its torch {torch_now}"
        return False, (f"the venv's xformers {installed} is built for torch {built_for}, not its torch {torch_now} "
                       f"({ui.title} keeps an installed xformers, so it would fail to load)")
    if torch_now is None:
        return True, f"{sm}; the UI installs its pinned torch {torch_for} + xformers {xf}"
    if torch_now == torch_for:
        return True, f"{sm}; xformers {xf} (what {ui.title} installs) is built for torch {torch_now}"
    return False, f"{ui.title} installs xformers {xf}, built for torch {torch_for}, but the venv has torch {torch_now}"


def decide_attention(b: Builder, inp: Inputs, u: UiStep, g: GpuStep) -> str:
    facts, prof, ui_key = inp.facts, inp.prof, u.key
    if g.no_nvidia:
        b.add("attention", "auto", "auto", "no NVIDIA GPU: the UI's default")
        return "auto"
    ok, why = xformers_usable(u.ui, g.gpu, facts, assume_gpu=g.as_written, xformers_builds=inp.xformers_builds)
    wanted = prof.attention
    if ui_key == "comfyui" and wanted in ("auto", "xformers"):
        # ComfyUI installs no xformers and uses it whenever it imports, else PyTorch SDP: forcing
        # --use-pytorch-cross-attention would only turn off an xformers the user installed.
        installed = facts.webui.xformers if facts.webui and facts.webui.flavor == "comfyui" else None
        attention, src = "auto", "auto"
        why2 = ("ComfyUI picks by itself: xformers when it imports"
                + (f" (xformers {installed} is in its venv)" if installed else "") + ", else PyTorch SDP")
        if wanted == "xformers":
            src, why2 = "profile", f"profile {prof.name} prefers xformers; {why2}"
    elif wanted == "auto":
        if lineage_key(ui_key) == "forge":
            attention, src, why2 = "auto", "auto", f"{u.ui.title} picks by itself (xformers when it imports, else PyTorch SDP)"
        elif ok and ui_key == "a1111":
            attention, src, why2 = "xformers", "auto", why
        else:
            attention, src, why2 = "sdp", "auto", f"PyTorch SDP ({why})" if not ok else "PyTorch SDP: torch ≥ 2 has it built in"
    elif wanted == "xformers" and not ok:
        attention, src, why2 = "sdp", "auto", f"profile asks for xformers, but {why}: PyTorch SDP instead"
        b.warn(f"xformers is not usable here ({why}); planned SDP attention instead")
    else:
        attention, src, why2 = wanted, "profile", f"profile {prof.name}" + (f": {why}" if wanted == "xformers" else "")
    if attention in ("sdp", "sdp-no-mem") and lineage_key(ui_key) == "forge":
        attention, why2 = _forge_sdp(u.ui, facts, attention, why2, xformers_builds=inp.xformers_builds)
    b.add("attention", attention, src, why2)
    return attention


def _forge_sdp(ui: UiAdapter, facts: Facts, attention: str, why: str, *,
               xformers_builds: Mapping[str, str] | None) -> tuple[str, str]:
    """PyTorch SDP on the Forge lineage: their backends turn PyTorch attention on by themselves with torch >= 2
    unless a working xformers imports (Forge's backend/memory_management.py: ENABLE_PYTORCH_ATTENTION; an
    xformers without its C++ library sets XFORMERS_IS_AVAILABLE False). A flag changes something only
    where the venv holds an xformers that loads; elsewhere no flag ("auto"), and the reason says so."""
    installed = _torch_base(facts.webui.xformers) if facts.webui else None
    torch_now = _torch_base(facts.webui.torch) if facts.webui else None
    built_for = (xformers_builds or {}).get(installed or "")
    if installed and not (built_for and torch_now and built_for != torch_now):
        return attention, why  # a working xformers would win: the flag is what turns it off
    had = (f"its venv's xformers {installed} is built for torch {built_for}, not {torch_now}, so it does not load"
           if installed else "no xformers is in its venv")
    return "auto", (f"{why}; {ui.title} uses PyTorch SDP by itself here ({had}; with torch >= 2 its backend turns "
                    "PyTorch attention on unless xformers loads): no flag")
