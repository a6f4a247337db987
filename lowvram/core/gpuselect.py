"""Which NVIDIA GPU a UI would use, worked out as CUDA does it (docs/architecture.md#detection, "Several GPUs").

Pure: facts in, choice out. NVML lists GPUs in PCI order; CUDA numbers them fastest first unless
CUDA_DEVICE_ORDER=PCI_BUS_ID; CUDA_VISIBLE_DEVICES (indices in CUDA's order, or UUIDs) narrows and
reorders that list, stopping at the first entry it cannot match; the UI's device flag indexes
into what is left. An explicit choice stands; otherwise lowvram picks the largest GPU. With more
than one NVIDIA GPU the plan pins the choice by UUID so every process agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.core.facts import Facts, GpuFacts
from lowvram.core.words import plural


@dataclass(frozen=True)
class GpuChoice:
    gpu: GpuFacts | None
    reason: str
    pin_uuid: str | None = None  # CUDA_VISIBLE_DEVICES value that pins the choice (several GPUs)
    index_in_visible: int | None = None  # the choice's CUDA index among the visible devices


def _speed_key(gpu: GpuFacts) -> tuple[int, int, int, int]:
    """CUDA's "fastest first", approximated: more VRAM, then newer compute capability, then PCI order."""
    cc = gpu.cc_tuple or (0, 0)
    return (-(gpu.vram_total_mb or 0), -cc[0], -cc[1], gpu.index)


def cuda_order(gpus: tuple[GpuFacts, ...], device_order: str | None) -> list[GpuFacts]:
    by_pci = sorted(gpus, key=lambda g: g.index)
    if (device_order or "").strip().upper() == "PCI_BUS_ID":
        return by_pci
    return sorted(by_pci, key=_speed_key)


def _match_uuid(entry: str, gpus: list[GpuFacts]) -> GpuFacts | None:
    """CUDA accepts a unique prefix of the UUID, with or without the `GPU-` prefix."""
    want = entry.lower()
    if not want.startswith("gpu-"):
        want = "gpu-" + want
    hits = [g for g in gpus if g.uuid and g.uuid.lower().startswith(want)]
    return hits[0] if len(hits) == 1 else None


def visible_gpus(gpus: tuple[GpuFacts, ...], visible: str | None, device_order: str | None) -> list[GpuFacts]:
    ordered = cuda_order(gpus, device_order)
    if visible is None:
        return ordered
    out: list[GpuFacts] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if not entry:
            break
        gpu: GpuFacts | None
        if entry.lstrip("-").isdigit():
            n = int(entry)
            gpu = ordered[n] if 0 <= n < len(ordered) else None
        else:
            gpu = _match_uuid(entry, ordered)
        if gpu is None or gpu in out:
            break  # CUDA ignores everything from the first invalid entry on
        out.append(gpu)
    return out


def _describe(gpu: GpuFacts) -> str:
    size = f", {gpu.vram_total_mb} MiB" if gpu.vram_total_mb else ""
    return f"GPU {gpu.index} ({gpu.name or 'unknown NVIDIA GPU'}{size})"


def select_gpu(facts: Facts, device_flag: str | None = None, *, flag_sets_visible: bool = False) -> GpuChoice:
    """The GPU the UI would run on, why, and how to pin it.

    flag_sets_visible: the UI's device flag replaces CUDA_VISIBLE_DEVICES before CUDA starts (Forge
    `--gpu-device-id`, ComfyUI `--cuda-device`), so it indexes CUDA's whole list, not the visible one.
    """
    if not facts.gpus:
        why = facts.nvml_error or "no NVIDIA GPU found"
        return GpuChoice(None, f"no NVIDIA GPU: {why}")
    visible_setting = facts.cuda.visible_devices
    env_note = f"CUDA_VISIBLE_DEVICES={visible_setting}" if visible_setting is not None else ""
    if flag_sets_visible and device_flag is not None and device_flag.strip() != "":
        visible_setting = device_flag.strip()
        env_note = f"the UI's device flag {visible_setting} (it sets CUDA_VISIBLE_DEVICES={visible_setting})"
        device_flag = None
    visible = visible_gpus(facts.gpus, visible_setting, facts.cuda.device_order)
    if not visible:
        return GpuChoice(None, f"{env_note} hides every NVIDIA GPU".strip())
    usable = [g for g in facts.gpus if not g.lost]
    several = len(usable) > 1

    def pin(gpu: GpuFacts) -> str | None:
        return gpu.uuid if several and gpu.uuid else None

    if device_flag is not None and device_flag.strip() != "":
        try:
            n = int(device_flag.strip())
        except ValueError:
            return GpuChoice(None, f"device flag value {device_flag!r} is not a number")
        if not 0 <= n < len(visible):
            return GpuChoice(None, f"device {n} asked for, but CUDA sees {plural(len(visible), 'GPU')}")
        gpu = visible[n]
        if gpu.lost:
            return GpuChoice(None, f"device {n} is {_describe(gpu)}, which is lost (fell off the bus)")
        where = f" with {env_note}" if env_note else ""
        return GpuChoice(gpu, f"the UI's device flag picks CUDA device {n}{where}: {_describe(gpu)}", pin(gpu), n)

    if visible_setting is not None:
        gpu = visible[0]
        if gpu.lost:
            return GpuChoice(None, f"{env_note} puts {_describe(gpu)} first, and it is lost")
        return GpuChoice(gpu, f"{env_note} makes it CUDA device 0: {_describe(gpu)}", pin(gpu), 0)

    candidates = [g for g in visible if not g.lost]
    if not candidates:
        return GpuChoice(None, "every NVIDIA GPU is lost (fell off the bus)")
    best = min(candidates, key=_speed_key)
    position = visible.index(best)
    if not several:
        return GpuChoice(best, f"the only NVIDIA GPU: {_describe(best)}", None, position)
    return GpuChoice(best, f"the largest of {len(usable)} NVIDIA GPUs: {_describe(best)}", pin(best), position)
