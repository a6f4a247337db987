"""`lowvram doctor`: a list of checks over the facts, each ok/warn/fail/skip with a hint.

`run_checks` is pure (facts in, checks out) so every card and OS can be tested without the
hardware; the two data tables (CUDA runtime → driver, xformers → torch) are read from
lowvram/data with their sources. Any `fail` makes the report's exit code 1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from lowvram.core.facts import (
    FALLBACK_CHOOSABLE_DRIVER,
    FALLBACK_FIRST_DRIVER,
    Facts,
    GpuFacts,
    WebuiFacts,
    parse_driver,
)
from lowvram.core.gpuselect import GpuChoice
from lowvram.core.model_files import FAMILY_NAMES as MODEL_FAMILY_NAMES
from lowvram.core.words import plural
from lowvram.ui import FORGE_LINEAGE
from lowvram.world import paths

STATUSES = ("ok", "warn", "fail", "skip")
# Printed as NVIDIA writes them (str(Version("546.01")) would say 546.1).
FALLBACK_FIRST_TEXT = "536.40"
FALLBACK_CHOOSABLE_TEXT = "546.01"
CONTROL_PANEL_PATH = (
    "NVIDIA Control Panel → Manage 3D settings → Program Settings → add the WebUI's python.exe → "
    "CUDA - Sysmem Fallback Policy"
)
INSTALL_COMMANDS = {
    "libtcmalloc-minimal4": "sudo apt install libtcmalloc-minimal4",
    "libgoogle-perftools4": "sudo apt install libgoogle-perftools4",
    "gperftools-libs": "sudo dnf install gperftools-libs",
    "gperftools": "sudo pacman -S gperftools",
}
OS_NAMES = {"linux": "Linux", "windows": "Windows", "darwin": "macOS"}
FLAVOR_NAMES = {"a1111": "AUTOMATIC1111", "forge": "Forge", "sdnext": "SD.Next", "comfyui": "ComfyUI",
                "forge-neo": "Forge Neo", "reforge": "reForge"}
FAMILY_NAMES = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner"}
MODEL_NAMES = {**FAMILY_NAMES, **MODEL_FAMILY_NAMES}  # every family detection tells (core/model_files.py)


@dataclass(frozen=True)
class Check:
    id: str
    status: str  # ok | warn | fail | skip
    message: str
    hint: str = ""


@dataclass(frozen=True)
class DoctorReport:
    facts: Facts
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def to_dict(self) -> dict[str, Any]:
        return {"schema": 1, **self.facts.to_dict(), "checks": [asdict(c) for c in self.checks]}


# ---------------------------------------------------------------------------------------------
# Data tables


def _data_path(name: str) -> Path:
    return paths.data_file(name)


@cache
def load_table(name: str) -> dict[str, Any]:
    data = json.loads(_data_path(name).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{name}: not an object")
    return data


def _version(text: str | None) -> Version | None:
    if not text:
        return None
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*(?:\.?post\d+)?)", text)
    if not m:
        return None
    try:
        return Version(m.group(1))
    except InvalidVersion:
        return None


def _major_minor(text: str | None) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)\.(\d+)", text or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _os_key(facts: Facts) -> str:
    return "windows" if facts.system.os == "windows" else "linux"


def min_driver_for_cuda(cuda: str, os_key: str) -> tuple[str | None, str | None]:
    """(full-support minimum, minor-version-compatibility minimum) driver for a CUDA runtime."""
    table = load_table("cuda_driver.json")
    mm = _major_minor(cuda)
    if mm is None:
        return None, None
    full = None
    rows = sorted((_major_minor(k), v) for k, v in table["toolkit"].items())
    for key, row in rows:
        if key is not None and key[0] == mm[0] and key <= mm:
            full = row.get(os_key)
    compat = table["minor_compat"].get(str(mm[0]), {}).get(os_key)
    exact = table["toolkit"].get(f"{mm[0]}.{mm[1]}")
    if exact is not None:
        full = exact.get(os_key)
    return full, compat


def xformers_torch(xformers: str) -> str | None:
    builds: dict[str, str] = load_table("xformers_torch.json")["builds"]
    plain = xformers.split("+", 1)[0]
    return builds.get(plain)


# ---------------------------------------------------------------------------------------------
# Helpers


def mib_text(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1024:.1f} GiB" if n >= 1024 else f"{n} MiB"


def gpu_choice(facts: Facts) -> GpuChoice:
    """The GPU the UI would run on: the policy's own rule, so doctor sizes the card `plan` does."""
    if not facts.gpus:  # nothing to choose from: keep the policy (and its imports) out of a GPU-less doctor
        from lowvram.core.gpuselect import select_gpu

        return select_gpu(facts)
    from lowvram.core.policy import webui_gpu

    return webui_gpu(facts)


def chosen_gpu(facts: Facts) -> GpuFacts | None:
    return gpu_choice(facts).gpu


def _vendor_list(facts: Facts) -> str:
    names = [o.name or o.vendor for o in facts.other_gpus]
    return ", ".join(names)


# ---------------------------------------------------------------------------------------------
# The checks


def check_gpu(facts: Facts) -> Check:
    if not facts.gpus:
        why = facts.nvml_error or "NVML found no GPU"
        if facts.other_gpus:
            return Check("gpu.nvidia", "fail", f"no NVIDIA GPU ({why}); found {_vendor_list(facts)}",
                         "lowvram is built for NVIDIA GPUs; on this machine keep the UI's own setup "
                         "(ROCm / DirectML / Metal) — lowvram adds no device or offload flags for it")
        hint = ("install the NVIDIA driver until `nvidia-smi` works"
                + (" (under WSL: the Windows driver, not a Linux one)" if facts.system.wsl else "")
                + "; with no NVIDIA GPU at all the UI can only run on the CPU (very slow)")
        return Check("gpu.nvidia", "fail", f"no NVIDIA GPU: {why}", hint)
    choice = gpu_choice(facts)
    lost = [g for g in facts.gpus if g.lost]
    if choice.gpu is None:
        return Check("gpu.nvidia", "fail", choice.reason,
                     "check CUDA_VISIBLE_DEVICES and the UI's device flag; a lost GPU needs a reboot "
                     "(and often a look at power and the PCIe seating)")
    g = choice.gpu
    parts = [g.name or "unknown NVIDIA GPU", mib_text(g.vram_total_mb)]
    if g.vram_free_mb is not None:
        parts[-1] += f" ({mib_text(g.vram_free_mb)} free)"
    if g.driver:
        parts.append(f"driver {g.driver}")
    if g.cuda_driver:
        parts.append(f"CUDA {g.cuda_driver}")
    message = ", ".join(parts)
    if len(facts.gpus) > 1:
        message += f"; {choice.reason}"
    # No handle for a reason other than GpuIsLost (NoPermission in a container, …) is not a GPU off the bus.
    unreadable = [x for x in lost if any(e.startswith("handle:") and not e.endswith("GpuIsLost") for e in x.errors)]
    fell_off = [x for x in lost if x not in unreadable]
    if fell_off:
        return Check("gpu.nvidia", "warn", message + f"; {plural(len(fell_off), 'GPU')} lost (fell off the bus)",
                     "reboot to get the lost GPU back; lowvram plans for the one that works")
    if unreadable:
        why = ", ".join(e for x in unreadable for e in x.errors) or "no handle"
        return Check("gpu.nvidia", "warn", message + f"; {plural(len(unreadable), 'GPU')} NVML cannot open ({why})",
                     "check that this user may use every /dev/nvidia* device (container or cgroup limits); "
                     "lowvram plans for the one it can read")
    if g.errors:
        return Check("gpu.nvidia", "ok", message + f" (NVML could not read: {', '.join(e.split(':')[0] for e in g.errors)})",
                     "an older driver lacks some NVML calls; `lowvram --debug doctor --json` lists them")
    return Check("gpu.nvidia", "ok", message)


# The VRAM classes of the bundled profiles (profiles/<N>gb-*.yaml `match.vram_mb`; a test keeps them equal)
# and the offload rung each pins per family; None = `offload: auto`, the estimate picks the rung.
VRAM_CLASSES: tuple[tuple[int, str, str | None, str | None], ...] = (
    # (upper bound exclusive in MiB, label, sd15 rung, sdxl rung)
    (3072, "2 GB class", "lowvram", "lowvram"),
    (5120, "4 GB class", "medvram", "lowvram"),
    (7168, "6 GB class", None, "medvram-sdxl"),
    (9216, "8 GB class", None, None),
    (14336, "10–12 GB class", None, None),
    (1 << 62, "16 GB+ class", None, None),
)
NATIVE_SIDE = {"sd15": 512, "sdxl": 1024}


def _vram_class(mb: int) -> tuple[str, str | None, str | None]:
    return next((label, sd15, sdxl) for top, label, sd15, sdxl in VRAM_CLASSES if mb < top)


def family_rung(facts: Facts, g: GpuFacts, family: str, pinned: str | None) -> tuple[str, bool]:
    """(rung, fits) lowvram plans for `family` at its native size on this card and UI.

    A pinned class rung stands (mapped onto the UI's ladder as the policy does); otherwise the
    first rung of the ladder whose estimate fits, by the same rule as `plan` (docs/architecture.md#the-policy).
    `fits` says whether the estimate fits on that rung.
    """
    from lowvram.core import policy
    from lowvram.core.estimate import memory as est
    from lowvram.ui import adapter, lineage_key

    assert g.vram_total_mb is not None
    ui_key = facts.webui.flavor if facts.webui is not None else "a1111"
    version = facts.webui.version if facts.webui is not None else None
    rungs = adapter(ui_key).rungs(family, version)
    room = policy.headroom_mb(facts, g)
    side = NATIVE_SIDE[family]

    def fits(rung: str) -> bool:
        off = {"novram": "lowvram"}.get(rung, rung)
        e = est.estimate(est.EstimateRequest(family=family, width=side, height=side, offload=off,
                                             ui=lineage_key(ui_key)))
        return est.fits(e.peak_mb, g.vram_total_mb or 0, room)

    if pinned is not None:
        rung = policy.map_rung(pinned, rungs)
        return rung, fits(rung)
    for rung in rungs:
        if fits(rung):
            return rung, True
    return rungs[-1], False


def _rung_text(rung: str, ui_key: str) -> str:
    if ui_key in ("a1111", "sdnext"):
        return f"--{rung}"
    return f"the {rung} offload level"


def _family_text(name: str, side: int, rung: str, *, ok: bool, pinned: bool, ui_key: str) -> str:
    flag = _rung_text(rung, ui_key)
    lowest = rung in ("lowvram", "novram")
    if rung == "none":
        return f"{name} at {side} px fits without offloading" if ok else f"{name} at {side} px does not fit"
    if not ok and lowest:
        return f"{name} at {side} px is not practical: even {flag} is estimated not to fit"
    if not ok:
        return f"{name} at {side} px with {flag} (pinned for this class) is estimated not to fit"
    if lowest:
        return f"{name} only with {flag} (slow)"
    if pinned:
        return f"{name} with {flag} (pinned for this class)"
    return f"{name} at {side} px is too tight to run whole: {flag}"


def check_vram_class(facts: Facts) -> Check:
    """The card's VRAM class and the offload rung lowvram plans for SD 1.5 and SDXL on it: the pinned
    rung of the class profile, or the first rung whose estimate fits (the same rule as `plan`)."""
    g = chosen_gpu(facts)
    if g is None:
        return Check("gpu.vram_class", "skip", "no NVIDIA GPU to size")
    mb = g.vram_total_mb
    if mb is None:
        return Check("gpu.vram_class", "warn", "VRAM size unknown (NVML could not read the memory)",
                     "plan with `--facts` holding vram_total_mb, or trust the profile's VRAM class")
    label, sd15_pin, sdxl_pin = _vram_class(mb)
    ui_key = facts.webui.flavor if facts.webui is not None else "a1111"
    sd15, sd15_ok = family_rung(facts, g, "sd15", sd15_pin)
    sdxl, sdxl_ok = family_rung(facts, g, "sdxl", sdxl_pin)
    head = f"{mib_text(mb)} ({label}): "
    if sd15 == "none" and sdxl == "none" and sd15_ok and sdxl_ok:
        return Check("gpu.vram_class", "ok", head + "SD 1.5 and SDXL fit without offloading")
    message = head + "; ".join((_family_text("SD 1.5", 512, sd15, ok=sd15_ok, pinned=sd15_pin is not None, ui_key=ui_key),
                                _family_text("SDXL", 1024, sdxl, ok=sdxl_ok, pinned=sdxl_pin is not None, ui_key=ui_key)))
    hint = "`lowvram plan --model sd15` (or sdxl) shows the plan and why; `lowvram estimate --model sdxl --sweep` what fits"
    if sd15 in ("lowvram", "novram") or not sd15_ok:
        return Check("gpu.vram_class", "warn", message, "use SD 1.5 models at 512 px; " + hint)
    if not sdxl_ok:
        return Check("gpu.vram_class", "ok", message, "prefer SD 1.5 models; for SDXL, `lowvram estimate --model "
                     "sdxl --sweep` shows which sizes fit (add --tiled-vae for tiled decoding)")
    if sdxl in ("lowvram", "novram"):
        return Check("gpu.vram_class", "ok", message, "prefer SD 1.5 models; for SDXL expect minutes per image")
    return Check("gpu.vram_class", "ok", message, hint)


def check_ram(facts: Facts) -> Check:
    ram = facts.system.ram_mb
    if ram is None:
        return Check("system.ram", "skip", "RAM size unknown")
    swap = facts.system.swap_mb
    base = f"RAM {mib_text(ram)}" + (f", swap {mib_text(swap)}" if swap is not None else "")
    g = chosen_gpu(facts)
    if g is None or g.vram_total_mb is None:
        return Check("system.ram", "ok", base)
    need = 2 * g.vram_total_mb
    # docs/architecture.md#the-policy: two roads only where memory spills (fallback on/unknown) and RAM ≥ 2 × VRAM (policy's own test).
    spills = facts.system.wsl or facts.system.sysmem_fallback in ("on", "unknown")
    if not spills:
        return Check("system.ram", "ok", f"{base} (VRAM cannot spill into RAM here, so lowvram swaps parts of the "
                     "model to RAM and the 2 × VRAM rule for keeping the model in VRAM does not apply)")
    if ram >= need:
        return Check("system.ram", "ok", f"{base}: at least 2 × VRAM ({mib_text(need)}), enough to also try keeping "
                     "the model in VRAM with a reserve (the layout hook)")
    return Check("system.ram", "warn",
                 f"{base}: under 2 × VRAM ({mib_text(need)}), too little to keep the model in VRAM with a reserve "
                 "(the layout hook), so lowvram swaps parts of the model to RAM",
                 f"with at least {mib_text(need)} of RAM lowvram also tries keeping the model in VRAM and keeps the "
                 "faster way")


def check_driver(facts: Facts) -> Check:
    g = chosen_gpu(facts) or (facts.gpus[0] if facts.gpus else None)
    if g is None:
        return Check("gpu.driver", "skip", "no NVIDIA driver")
    version = parse_driver(g.driver)
    if version is None:
        return Check("gpu.driver", "warn", "driver version unknown", "update the NVIDIA driver")
    os_key = _os_key(facts)
    # Current WebUI torch builds are cu121 (A1111 1.8–1.10) or newer: the CUDA 12 floor.
    floor_text = min_driver_for_cuda("12.1", os_key)[1]
    floor = parse_driver(floor_text)
    where = "Windows" if os_key == "windows" else "Linux"
    if floor is not None and version < floor:
        return Check("gpu.driver", "warn",
                     f"driver {g.driver} is old: torch CUDA 12 builds (A1111 1.8+) need ≥ {floor_text} on {where}",
                     f"update the NVIDIA driver to {floor_text} or newer (a current one is best)")
    return Check("gpu.driver", "ok", f"driver {g.driver}" + (f" (CUDA {g.cuda_driver})" if g.cuda_driver else ""))


def check_sysmem_fallback(facts: Facts) -> Check:
    s = facts.system
    g = chosen_gpu(facts) or (facts.gpus[0] if facts.gpus else None)
    driver = g.driver if g else None
    if s.wsl:
        return Check("gpu.sysmem_fallback", "ok",
                     "WSL2: out-of-VRAM spills into shared memory (slow, not an out-of-memory error), whatever the "
                     "Control Panel says (microsoft/WSL #11050)",
                     "lowvram treats memory as able to spill here and measures the overflow")
    if s.os != "windows":
        return Check("gpu.sysmem_fallback", "ok",
                     f"{OS_NAMES.get(s.os, s.os)}: no sysmem fallback (VRAM never spills into RAM); running out of VRAM "
                     "is an out-of-memory error")
    version = parse_driver(driver)
    if version is None:
        return Check("gpu.sysmem_fallback", "skip", "driver version unknown: cannot tell whether VRAM spills")
    if version < FALLBACK_FIRST_DRIVER:
        return Check("gpu.sysmem_fallback", "ok",
                     f"driver {driver} predates sysmem fallback ({FALLBACK_FIRST_TEXT}): running out of VRAM is an "
                     "out-of-memory error")
    if version < FALLBACK_CHOOSABLE_DRIVER:
        return Check("gpu.sysmem_fallback", "warn",
                     f"driver {driver} always spills into shared memory when VRAM runs out (536.40–546.00): "
                     "generation slows down instead of failing",
                     f"update to ≥ {FALLBACK_CHOOSABLE_TEXT} to choose it per program: {CONTROL_PANEL_PATH}")
    return Check("gpu.sysmem_fallback", "ok",
                 f"driver {driver}: sysmem fallback is a per-program choice (default: spill); lowvram treats it as on",
                 f"to make out-of-VRAM an error instead: {CONTROL_PANEL_PATH} = Prefer No Sysmem Fallback, "
                 "then plan with `--sysmem-fallback off`")


def check_tcmalloc(facts: Facts) -> Check:
    t = facts.tcmalloc
    if facts.system.os != "linux":
        return Check("tcmalloc", "skip", t.reason or f"TCMalloc is not used on {facts.system.os}")
    if facts.webui is not None and facts.webui.flavor == "comfyui":
        pass  # ComfyUI does not preload it itself, but lowvram can.
    if t.usable and t.library:
        return Check("tcmalloc", "ok", f"{t.library} ({t.reason})" if t.reason else t.library)
    command = INSTALL_COMMANDS.get(t.package or "")
    hint = command or "install your distribution's gperftools / TCMalloc package"
    return Check("tcmalloc", "warn",
                 f"TCMalloc not usable: {t.reason or 'not found'} (it keeps RAM from bloating as checkpoints switch)",
                 hint)


def check_webui(facts: Facts) -> Check:
    w = facts.webui
    if w is None:
        return Check("webui.found", "warn", "no WebUI found (plans will target A1111)",
                     "pass --webui PATH, run lowvram inside the WebUI folder, set LOWVRAM_WEBUI, or install one "
                     "with `lowvram setup`")
    name = FLAVOR_NAMES.get(w.flavor, w.flavor)
    version = w.version or "version unknown"
    extra = []
    if w.python is None:
        extra.append("no venv yet (the UI creates it on first start)")
    message = f"{name} {version} at {w.path}" + (f"; {', '.join(extra)}" if extra else "")
    if w.config_error:  # a damaged config.json: the UI resets it to its defaults (detect/webui.py)
        return Check("webui.found", "warn", f"{message}; {w.config_error}",
                     "fix it, or move it away (the UI writes a fresh one at start-up)")
    return Check("webui.found", "ok", message)


def check_torch_driver(facts: Facts) -> Check:
    w = facts.webui
    if w is None:
        return Check("webui.torch_driver", "skip", "no WebUI")
    if w.torch is None:
        return Check("webui.torch_driver", "skip", "no torch in the WebUI's venv yet (the UI installs its own on first start)")
    g = chosen_gpu(facts) or (facts.gpus[0] if facts.gpus else None)
    if w.torch_cuda is None:
        if g is None:
            return Check("webui.torch_driver", "ok", f"torch {w.torch} is a CPU build (no NVIDIA GPU here either)")
        return Check("webui.torch_driver", "fail", f"torch {w.torch} is a CPU build: the UI will not use the GPU",
                     _cuda_torch_hint(w.flavor))
    if g is None:
        return Check("webui.torch_driver", "skip", f"torch {w.torch} (CUDA {w.torch_cuda}); no NVIDIA driver to compare")
    arch = check_torch_arch(facts, w, g)
    if arch is not None:
        return arch
    os_key = _os_key(facts)
    where = "Windows" if os_key == "windows" else "Linux"
    full, compat = min_driver_for_cuda(w.torch_cuda, os_key)
    have = parse_driver(g.driver)
    want = _major_minor(w.torch_cuda)
    driver_cuda = _major_minor(g.cuda_driver)
    label = f"torch {w.torch} (CUDA {w.torch_cuda}) on driver {g.driver or '?'}"
    source = "see NVIDIA's CUDA Toolkit Release Notes, driver table"
    if want is not None and driver_cuda is not None and driver_cuda >= want:
        return Check("webui.torch_driver", "ok", f"{label} (driver supports CUDA {g.cuda_driver})")
    if have is not None and full is not None and have >= Version(full):
        return Check("webui.torch_driver", "ok", label)
    same_major = want is not None and (driver_cuda is None or driver_cuda[0] == want[0])
    if have is not None and compat is not None and same_major and have >= Version(compat):
        return Check("webui.torch_driver", "ok",
                     f"{label}: runs through CUDA minor-version compatibility (full support from {full})",
                     f"a driver ≥ {full} on {where} removes the caveat (PTX JIT)" if full else "")
    if have is None and full is None:
        return Check("webui.torch_driver", "warn", f"{label}: cannot tell whether the driver is new enough",
                     f"update the NVIDIA driver ({source})")
    need = full or compat or "a newer one"
    return Check("webui.torch_driver", "fail", f"{label}: the driver is too old for this torch build",
                 f"update the NVIDIA driver to ≥ {need} on {where} ({source}), or install a torch built for an older CUDA")


def check_torch_arch(facts: Facts, w: WebuiFacts, g: GpuFacts) -> Check | None:
    """A failing check where the venv's torch has no kernels for this card (a cu128+ build on Maxwell or
    Pascal, a cu130 one on Volta: core/torch_builds.py), with the pip command that puts a CUDA 12.6 build in."""
    from lowvram.core import torch_builds as tb

    floor = tb.no_kernels_for(w.torch, w.torch_cuda, g.cc_tuple)
    cuda = tb.cuda_of(w.torch, w.torch_cuda)
    if floor is None or cuda is None or g.cc_tuple is None:
        return None
    card = (g.name or "this GPU").removeprefix("NVIDIA ").removeprefix("GeForce ")
    legacy, _vision = tb.legacy_build(w.torch)
    same = legacy.split("+", 1)[0] == (w.torch or "").split("+", 1)[0]
    return Check("webui.torch_driver", "fail",
                 f"torch {w.torch} has no kernels for the {card} ({tb.cc_text(g.cc_tuple)}): PyTorch's "
                 f"{tb.cuda_text(cuda)} builds of it start at {tb.cc_text(floor)}, so the UI stops with 'no kernel "
                 "image is available'",
                 f"install torch {legacy}" + (", the same release built for CUDA 12.6" if same else
                                              ", the last release with CUDA 12.6 wheels")
                 + f" (kernels from sm_50): `{tb.venv_pip_command(w.python, facts.system.os, w.torch)}`")


def _cuda_torch_hint(flavor: str) -> str:
    """How this UI gets a CUDA build of torch back: each UI has its own way (flags in lowvram/ui/flags)."""
    if flavor == "a1111" or flavor in FORGE_LINEAGE:
        return ("start the UI once with --reinstall-torch (and check that TORCH_COMMAND in webui-user does not "
                "name a CPU build)")
    if flavor == "sdnext":
        return "start SD.Next once with --reinstall (or delete its venv folder: it reinstalls torch)"
    return "install a CUDA build of torch into the Python that runs ComfyUI (the pip command is in ComfyUI's README)"


def _uninstall_xformers_hint(w: WebuiFacts) -> str:
    """A mismatched xformers: take it out, and say what the UI (and lowvram's plan) then does."""
    from lowvram.ui import adapter

    python = w.python or "the UI's python"
    cmd = f"`{python} -m pip uninstall -y xformers`"
    if w.flavor == "comfyui":
        return f"uninstall it ({cmd}) or start ComfyUI with --disable-xformers: it then uses PyTorch attention"
    ui = adapter(w.flavor)
    if ui.pinned_xformers is None:
        return f"uninstall it ({cmd}); {ui.title} then uses PyTorch SDP attention"
    xf, torch_for = ui.pinned_xformers
    return (f"uninstall it ({cmd}); lowvram then plans --xformers where the venv's torch is {torch_for} "
            f"({ui.title} installs xformers {xf}, built for it), else SDP attention")


def check_xformers(facts: Facts) -> Check:
    w = facts.webui
    if w is None:
        return Check("webui.xformers", "skip", "no WebUI")
    if w.xformers is None:
        from lowvram.ui import adapter

        ui = adapter(w.flavor)
        if ui.pinned_xformers is not None and w.torch is not None:
            xf, pin_torch = ui.pinned_xformers
            tv = _version(w.torch)
            if tv is not None and tv != Version(pin_torch):
                return Check("webui.xformers", "ok",
                             f"xformers not installed; {ui.title}'s --xformers would install {xf}, built for torch "
                             f"{pin_torch}, not this venv's {w.torch}", "lowvram plans SDP attention instead")
        if ui.pinned_xformers is not None:
            return Check("webui.xformers", "ok", f"xformers not installed yet ({ui.title} installs its pinned build "
                         "when --xformers is given; lowvram plans it where the venv's torch matches)")
        return Check("webui.xformers", "ok", f"xformers not installed ({ui.title} uses PyTorch attention)")
    if w.torch is None:
        return Check("webui.xformers", "warn", f"xformers {w.xformers} installed but no torch in the venv")
    built_for = xformers_torch(w.xformers)
    if built_for is None:
        return Check("webui.xformers", "warn",
                     f"xformers {w.xformers}: not in lowvram's table, cannot check it against torch {w.torch}",
                     "if the UI logs 'xFormers was built for …': " + _uninstall_xformers_hint(w))
    tv = _version(w.torch)
    if tv is not None and tv == Version(built_for):
        return Check("webui.xformers", "ok", f"xformers {w.xformers} matches torch {w.torch}")
    return Check("webui.xformers", "warn",
                 f"xformers {w.xformers} was built for torch {built_for}, the venv has torch {w.torch}: it will not load",
                 _uninstall_xformers_hint(w))


def check_quirks(facts: Facts) -> Check:
    g = chosen_gpu(facts)
    if g is None:
        return Check("gpu.quirks", "skip", "no NVIDIA GPU")
    name = g.name or ""
    cc = g.cc_tuple
    if re.search(r"GTX 16\d\d", name):
        return Check("gpu.quirks", "warn",
                     f"{name}: fp16 gives NaN / black images on GTX 16xx cards",
                     "run with --upcast-sampling (lowvram's GTX 16xx profile does; if images stay black: --no-half)")
    if cc == (6, 1):  # consumer Pascal (GP102–GP108); P100 (6.0) and Jetson TX2 (6.2) have fast fp16
        return Check("gpu.quirks", "warn",
                     f"{name or 'this GPU'} (Pascal, sm {g.compute_capability}): fp16 math runs at a fraction of "
                     "fp32 speed on this card",
                     "if sampling is slow, compare s/it with --upcast-sampling (fp16 weights, fp32 math; "
                     "A1111 PR #8782)")
    if cc is not None and cc < (6, 0):
        return Check("gpu.quirks", "warn",
                     f"{name or 'this GPU'} (sm {g.compute_capability}) predates Pascal: xformers needs sm 6.0+",
                     "lowvram never plans xformers on this card; recent torch builds may drop it, so keep the "
                     "torch the UI installs")
    return Check("gpu.quirks", "ok", f"no known quirk for {name or 'this GPU'}")


def check_other_gpus(facts: Facts) -> Check:
    if not facts.other_gpus:
        return Check("gpu.other", "skip", "no AMD, Intel or Apple GPU")
    found = _vendor_list(facts)
    if facts.gpus:
        return Check("gpu.other", "warn", f"also found {found}; lowvram plans for the NVIDIA GPU",
                     "make sure the monitor is on the integrated GPU to free VRAM on the NVIDIA one")
    return Check("gpu.other", "warn", f"found {found}: lowvram is built for NVIDIA GPUs",
                 "lowvram adds no device or offload flags here; the UI's own setup (ROCm, DirectML, "
                 "webui-macos-env.sh) stands")


def _comfy_checkpoint(w: WebuiFacts) -> Check:
    """ComfyUI selects no checkpoint: what its model folders hold, and which file plans assume (the
    newest), in the plan's words (core/policy/family.py)."""
    from lowvram.core.policy.family import comfy_models_line

    if w.checkpoint is None:
        return Check("webui.checkpoint", "warn", "ComfyUI: no model file in models/checkpoints, models/unet or "
                     "models/diffusion_models (nor extra_model_paths.yaml's folders)",
                     "put one there, or give --model FAMILY|FILE")
    line = comfy_models_line(w)
    if w.checkpoint_error:
        return Check("webui.checkpoint", "warn", f"{line}; {w.checkpoint_error}",
                     "re-download it, or give --model FAMILY|FILE")
    if w.model_family in (None, "unknown"):
        return Check("webui.checkpoint", "warn", f"{line}; its model family is unknown",
                     "give --model FAMILY|FILE")
    if w.model_family not in FAMILY_NAMES:
        return Check("webui.checkpoint", "warn", f"{line}; lowvram has no memory model for it yet",
                     "plan and estimate stop here; --model sdxl plans as SDXL")
    return Check("webui.checkpoint", "ok", line)


def check_checkpoint(facts: Facts) -> Check:
    w = facts.webui
    if w is None:
        return Check("webui.checkpoint", "skip", "no WebUI")
    if w.flavor == "comfyui":
        return _comfy_checkpoint(w)
    if w.checkpoint is None and w.flavor == "a1111" and "--no-download-sd-model" not in (w.user_args or ()):
        # modules/sd_models.py: with no checkpoint at all, A1111 downloads v1-5-pruned-emaonly and loads it.
        return Check("webui.checkpoint", "warn",
                     "no checkpoint yet: A1111's first start downloads SD 1.5 (v1-5-pruned-emaonly, ~4 GB) and "
                     "lowvram plans for it",
                     "for SDXL, put its .safetensors in models/Stable-diffusion (or give --model sdxl) before "
                     "the first start")
    if w.checkpoint is None:
        return Check("webui.checkpoint", "warn", "no checkpoint found (models/Stable-diffusion, --ckpt-dir)",
                     "put a .safetensors checkpoint in models/Stable-diffusion, or give --model sd15|sd2|sdxl")
    if w.checkpoint_path is None:
        return Check("webui.checkpoint", "warn", f"selected checkpoint {w.checkpoint} is not on disk",
                     "select another in the UI, or give --model sd15|sd2|sdxl")
    family = w.model_family
    if w.checkpoint_error:  # a damaged safetensors header (detect/checkpoint.py)
        return Check("webui.checkpoint", "warn", f"{w.checkpoint_error}; model family unknown",
                     "re-download it or select another in the UI; until then say the family with "
                     "--model sd15|sd2|sdxl")
    if family is None or family == "unknown":
        why = "a pickle (.ckpt), never opened" if not w.checkpoint.lower().endswith((".safetensors", ".gguf")) else \
            f"not SD 1.5/2/XL, SD3/3.5 or FLUX.1 keys, format {w.model_format or 'unknown'}"
        return Check("webui.checkpoint", "warn", f"{w.checkpoint}: model family unknown ({why})",
                     "say it with --model sd15|sd2|sdxl")
    extra = ", ".join(x for x in (w.model_variant, w.model_format) if x)
    name = MODEL_NAMES.get(family, family)
    named = f"{name} ({extra})" if extra else name
    if family not in FAMILY_NAMES:  # detected, but no memory model yet (core/policy/family.py)
        return Check("webui.checkpoint", "warn", f"{w.checkpoint}: {named}: lowvram has no memory model for it yet",
                     "plan and estimate stop here; --model sdxl plans as SDXL")
    return Check("webui.checkpoint", "ok", f"{w.checkpoint}: {named}")


CHECKS = (
    check_gpu,
    check_vram_class,
    check_quirks,
    check_driver,
    check_sysmem_fallback,
    check_other_gpus,
    check_ram,
    check_tcmalloc,
    check_webui,
    check_torch_driver,
    check_xformers,
    check_checkpoint,
)


def check_lowvram_applied(problems: Sequence[str] | None, conflicts: Sequence[str] = ()) -> Check:
    """Is what `lowvram apply` put into the tree still there, and does it still fit the user's own
    COMMANDLINE_ARGS? (A1111 #12915, Forge #1566; issue 14: the user's line stays live, so a flag
    they add after apply can contradict the block.)

    `problems` comes from lowvram.world.apply.check_applied(); None means nothing was ever applied.
    `conflicts` from `applied_conflicts`: the user's current flags against the block's.
    """
    if problems is None:
        return Check("lowvram.applied", "skip", "lowvram has not applied a plan to this WebUI",
                     "run `lowvram apply` (or `lowvram launch`) to write the plan into it")
    if problems:
        return Check("lowvram.applied", "warn", "; ".join([*problems, *conflicts]),
                     "a UI update or `git reset` dropped lowvram's changes: run `lowvram apply` again")
    if conflicts:
        return Check("lowvram.applied", "warn",
                     "lowvram's managed block is in place, but your COMMANDLINE_ARGS now disagree with it: "
                     + "; ".join(conflicts),
                     "run `lowvram apply` again (it plans around your flags), or take the flag out of your line")
    return Check("lowvram.applied", "ok", "lowvram's managed block, hook and extensions are in place", "")


def flag_conflicts(user_args: Sequence[str], block_args: Sequence[str], ui_key: str,
                   version: str | None, *, pinned: bool = False) -> list[str]:
    """Where the user's flags and the ones lowvram's block appends after them disagree.

    An on/off flag of another kind (`--lowvram` vs the block's `--medvram-sdxl`, `--xformers` vs
    `--opt-sdp-attention`): both are in effect, and the UI picks one by its own rules. A valued flag
    (`--port 7000` vs `--port 7861`): the block's comes later, so the user's is ignored. `pinned`:
    the block pins the GPU with CUDA_VISIBLE_DEVICES, so its device flag is the user's GPU renumbered.
    """
    from lowvram import ui
    from lowvram.core.errors import FlagError

    try:
        adapter = ui.adapter(ui_key)
    except FlagError:
        return []
    flagset = adapter.flagset(version)
    mine = ui.parse_args(list(user_args), flagset, strict=False)
    theirs = ui.parse_args(list(block_args), flagset, strict=False)
    out: list[str] = []
    for c in adapter.cross_contradictions(mine, theirs, flagset):
        yours, block = " ".join(c.first), " ".join(c.second)
        if pinned and c.category == f"{adapter.device_flag} value":
            continue
        if c.category.endswith(" value"):
            out.append(f"your {yours} is overridden by the block's {block}, which comes after it")
        else:
            out.append(f"your {yours} contradicts the block's {block} ({c.category}): both are in effect")
    return out


def applied_conflicts(tree: Path, facts: Facts) -> list[str]:
    """`flag_conflicts` between each webui-user file's live COMMANDLINE_ARGS (outside the block) and
    the flags lowvram's block in it appends, re-read now: the user may have edited their line since
    apply. A value that is not literal ($VAR, %VAR%) cannot be checked."""
    from lowvram.core.errors import LowvramError
    from lowvram.world.apply import webui_user
    from lowvram.world.apply.manifest import Manifest
    from lowvram.world.detect.webui import parse_bat_args, parse_sh_args, read_user_args

    manifest = Manifest.load(tree, read_only=True)
    if not manifest.exists or manifest.broken:
        return []
    ui_key = facts.webui.flavor if facts.webui is not None and facts.webui.flavor else "a1111"
    version = facts.webui.version if facts.webui is not None else None
    out: list[str] = []
    for key, entry in sorted(manifest.files.items()):
        if "block_sha256" not in entry or key not in ("webui-user.sh", "webui-user.bat", "webui.settings.sh"):
            continue  # webui.settings.bat: the user's value comes from wherever they start webui.bat
        kind = webui_user.SH if key.endswith(".sh") else webui_user.BAT
        try:
            data = webui_user.read_bytes(tree / key)
            block = webui_user.block_bytes(data, kind, recorded=str(entry["block_sha256"])) if data else None
        except LowvramError:
            continue  # check_applied says what is wrong with the file
        if data is None or block is None:
            continue
        text = data.decode("utf-8", "replace")
        if key == "webui.settings.sh":  # Forge Neo's: after webui-user.sh's value, its own lines
            try:
                user, literal = read_user_args(tree, "linux", ui_key)
            except LowvramError:
                continue
        else:
            user, literal = parse_sh_args(text) if kind == webui_user.SH else parse_bat_args(text)
        if literal and user:
            pinned = bool(webui_user.parse_block_vars(block, kind).get("CUDA_VISIBLE_DEVICES"))
            out += flag_conflicts(user, webui_user.block_args(block, kind), ui_key, version, pinned=pinned)
    return out


def run_checks(facts: Facts, extra_checks: Sequence[Check] = ()) -> tuple[Check, ...]:
    """Every check over `facts`, then `extra_checks` (e.g. lowvram's own block still applied)."""
    return tuple(fn(facts) for fn in CHECKS) + tuple(extra_checks)


def build_report(facts: Facts, extra_checks: Sequence[Check] = ()) -> DoctorReport:
    return DoctorReport(facts, run_checks(facts, extra_checks))
