"""Which weight format of a model fits this card, and how much slower each one runs: the question users ask
most (ComfyUI-GGUF#2, Forge#1218, ComfyUI#4461), answered before the run.

Per format: the peak VRAM of the generation with the model whole on the GPU (memory.estimate), whether that
fits, and where it does not, what the UI streams from RAM every step (Forge's GPU Weights and ComfyUI's
partial load keep what fits and move the rest over PCIe per step). The time of a step is

    compute × (1 + dequant) + streamed bytes ÷ host→device bandwidth

with compute = the step's FLOPs (dit.flops_per_step) ÷ the card's 16-bit matmul rate × MATMUL_EFFICIENCY.
The two fitted constants come from one published benchmark (diffusers benchmarks/README.md, Flux-dev
forward at 1024² on an L40): bf16 0.493 s → MATMUL_EFFICIENCY; group offload with a stream (the whole model
crosses PCIe 4 ×16 every step) 1.859 s → PCIE_EFFICIENCY. Streaming is counted as not overlapping the
compute (Forge's "Queue" swap; "Async" overlaps some of it). Relative times only are shown: the absolute
rate of a card is known to ±30 %, the ratios between formats much better.

Pure core.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from lowvram.core.errors import UsageError
from lowvram.core.estimate import dit
from lowvram.core.estimate import memory as est
from lowvram.core.estimate.formats import COMPARED, FORMATS, ui_loads

MATMUL_EFFICIENCY = 0.83  # 7.43e13 FLOP in 0.493 s on an L40 (181 TFLOPS dense bf16)
PCIE_EFFICIENCY = 0.55  # 23.8 GB streamed in 1.859 − 0.493 s over PCIe 4 ×16 (31.5 GB/s)
PAGEABLE_RATIO = 0.67
"""Copies from ordinary (pageable) RAM against pinned RAM: the two bandwidthTest logs of reference/vram_data.md §6
that give both (GTX 1050 5.73 / 10.9, RTX 3050 10.67 / 12.99 GB/s), averaged. diffusers' group offload streams
from pinned memory; Forge swaps from pageable RAM unless Swap Location is "Shared", and ComfyUI and A1111
move weights from pageable RAM."""
BF16_CAST_SHARE = 0.11
"""Cards before Ampere (compute capability < 8.0) have no bf16 math: the UIs cast bf16 weights to fp16 (fp32 on
Pascal) layer by layer, a cast like fp8's (formats.DEQUANT_WHY, +11 % measured)."""
RAM_SHARE = 0.8  # of the machine's RAM, what streamed weights and text encoders may take before swapping starts
PCIE_LANE_GBPS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
# A card of each generation where NVML does not say its cores and clock: (cores, max SM clock MHz, name).
TYPICAL_CARD = {
    (5, 2): (1664, 1216, "GTX 970"), (6, 1): (1920, 1911, "GTX 1070"), (7, 5): (1920, 2100, "RTX 2060"),
    (8, 6): (3584, 2100, "RTX 3060"), (8, 9): (3072, 3105, "RTX 4060"), (12, 0): (3840, 3090, "RTX 5060 Ti"),
}
RECOMMEND_WITHIN = 1.15  # a format that fits whole this close to the fastest is worth it: the one with more bits wins


@dataclass(frozen=True)
class CardSpeed:
    tflops: float  # 16-bit matmul rate the UI reaches (dense, fp32 accumulate)
    h2d_gbps: float  # host → device bytes per second / 1e9 the UI reaches
    cc: tuple[int, int] | None
    assumed: tuple[str, ...] = ()  # what was not known and was assumed, in the user's words


def _matmul_per_fp32(cc: tuple[int, int], name: str) -> float:
    """16-bit tensor rate (fp32 accumulate) over the fp32 FMA rate. GeForce halves fp32-accumulate tensor math;
    Pascal and older run fp16 at (or below) the fp32 rate, so the UIs compute in fp32 there; GTX 16xx has
    double-rate fp16 but no tensor cores."""
    if cc < (7, 0):
        return 1.0
    if cc == (7, 5):
        return 2.0 if "GTX 16" in name.upper() else 4.0
    if cc in ((7, 0), (8, 0)):
        return 8.0 if cc == (7, 0) else 16.0
    if cc == (9, 0):
        return 15.0
    return 2.0


def card_speed(*, cc: tuple[int, int] | None, name: str | None, cores: int | None, clock_mhz: int | None,
               pcie_gen: int | None, pcie_width: int | None) -> CardSpeed:
    """The card's compute and PCIe rates from NVML's facts, a typical card of its generation where they are missing."""
    assumed: list[str] = []
    key = cc if cc in TYPICAL_CARD else (8, 6)
    if cc is None:
        assumed.append("compute capability unknown: counted as an RTX 3060")
    if not cores or not clock_mhz:
        cores, clock_mhz, typical = TYPICAL_CARD[key]
        if cc is not None:
            assumed.append(f"cores and clock unknown: counted as a {typical}")
    fp32 = cores * 2 * clock_mhz * 1e6 / 1e12
    tflops = fp32 * _matmul_per_fp32(cc or key, name or "") * MATMUL_EFFICIENCY
    if not pcie_gen or not pcie_width:
        assumed.append("PCIe link unknown: counted as PCIe 3 ×16")
        pcie_gen, pcie_width = 3, 16
    lane = PCIE_LANE_GBPS.get(pcie_gen, PCIE_LANE_GBPS[6])
    return CardSpeed(tflops, lane * pcie_width * PCIE_EFFICIENCY, cc, tuple(assumed))


@dataclass(frozen=True)
class FormatRow:
    format: str
    weights_mb: int  # the diffusion model in this format
    peak_mb: int  # the generation's peak with the model whole on the GPU
    fits: bool | None  # whole, with the margin; None: VRAM unknown
    offloaded_mb: int  # streamed from RAM every step (0 where it fits)
    relative_sit: float | None  # step time / the fastest's; None where it cannot run here
    step_s: float | None  # the estimated step time behind relative_sit
    why_not: str | None = None  # why this UI cannot load it, or why it cannot run at all


@dataclass(frozen=True)
class Recommendation:
    format: str
    reason: str


def _model_mb(req: est.EstimateRequest, fmt: str) -> int:
    return round(dit.model_bytes(req.family, FORMATS[fmt]) / est.MIB)


def require_dit(family: str) -> None:
    """The comparison needs a step's compute, which lowvram models for the diffusion transformers only."""
    if family not in dit.DIT_FAMILIES:
        raise UsageError(f"--formats compares the weight formats of Flux.1 and SD3/SD3.5 models, not {family}",
                         "give --model flux1-dev (or flux1-schnell, sd3-medium, sd3.5-medium, sd3.5-large)")


FORGE_MIN_INFERENCE_MB = 1024  # shared.opts forge_inference_memory's default
COMFY_MIN_INFERENCE_MB = 1229  # model_management.minimum_inference_memory(): 0.8 GiB + the 0.4 GiB it keeps free


def resident_capacity(ui: str, usable_mb: float, work_mb: float) -> float:
    """MiB of weights the UI keeps on the GPU when the model does not fit, the rest streaming every step.
    Forge (backend/memory_management.py compute_model_gpu_memory_when_using_cpu_swap) keeps its inference
    memory free and then a further min(23 %, 1.25 GiB) of what is left; ComfyUI and SD.Next load what fits
    beside the step's working memory (ComfyUI at least its minimum inference memory); A1111 keeps none: it
    runs such a model with --lowvram, every block moved every step."""
    if ui == "a1111":
        return 0.0
    if ui == "forge":
        avail = usable_mb - max(FORGE_MIN_INFERENCE_MB, work_mb)
        return max(0.0, avail / 1.3, avail - 1280)
    return max(0.0, usable_mb - max(COMFY_MIN_INFERENCE_MB if ui == "comfyui" else 0, work_mb))


def format_row(req: est.EstimateRequest, fmt: str, speed: CardSpeed, *, usable_mb: int | None, margin: float,
               calibration: est.Calibrated | None = None, ram_mb: int | None = None,
               pinned: bool = False, fast_fp8: bool = False) -> FormatRow:
    """One format: peak whole, fit, what streams, and the step time (relative_sit is set by compare_formats).
    The margin (the estimator's own error) is on the working memory: the weights' bytes are exact. A model that
    does not fit whole runs while its working memory and one block fit; what the UI cannot keep streams."""
    f = FORMATS[fmt]
    e = est.estimate(replace(req, weight_format=fmt, precision="half"), calibration)
    weights = _model_mb(req, fmt)
    why_not = ui_loads(req.ui, f, req.family)
    if usable_mb is None:
        return FormatRow(fmt, weights, e.peak_mb, None, 0, None, None, why_not)
    fits = est.fits(e.peak_mb, usable_mb, 0, margin)
    work = max(0, e.peak_mb - weights) * (1 + margin)
    block = weights * dit.largest_block_share(req.family)
    if not fits and work + block > usable_mb:  # even with every other weight in RAM the step does not fit
        return FormatRow(fmt, weights, e.peak_mb, False, weights, None, None,
                         why_not or "does not run here even with the whole model streamed from RAM")
    if fits:
        over = 0
    elif req.ui == "a1111":
        over = weights
    else:  # what the UI cannot keep; where it keeps it all (only the margin was short) it streams nothing
        over = round(min(weights - block, max(0.0, weights - resident_capacity(req.ui, usable_mb, work))))
        fits = over == 0
    in_ram = over + round(dit.text_bytes(req.family, est.t5_format(replace(req, weight_format=fmt)), 2) / est.MIB)
    if over and ram_mb and in_ram > ram_mb * RAM_SHARE:
        why_not = why_not or (f"the {in_ram / 1024:.1f} GiB it streams and the text encoders need more RAM than the "
                              f"{ram_mb / 1024:.0f} GiB here can spare: Windows/Linux would swap")
    step = step_seconds(req, fmt, speed, over * est.MIB, pinned=pinned, fast_fp8=fast_fp8)
    return FormatRow(fmt, weights, e.peak_mb, fits, over, None, step, why_not)


def step_seconds(req: est.EstimateRequest, fmt: str, speed: CardSpeed, streamed_bytes: float, *,
                 pinned: bool = False, fast_fp8: bool = False) -> float:
    """One sampling step: compute × (1 + the format's dequant share) + the bytes streamed from RAM ÷ the link
    (PAGEABLE_RATIO of it unless the RAM is pinned). The UIs upcast fp8 even where the card has fp8 math
    (ComfyUI --fast, Forge Neo --fast-fp8 opt in); a card without bf16 math casts bf16 weights per layer.
    fast_fp8: the UI multiplies the fp8 weights as they are (Forge Neo's --fast-fp8 on sm 8.9+: torch._scaled_mm),
    so there is no per-layer cast; the matmul is still counted at the 16-bit rate (no published fp8 timing)."""
    compute = dit.flops_per_step(req.family, req.width, req.height, req.batch) / (speed.tflops * 1e12)
    share = 0.0 if fast_fp8 and FORMATS[fmt].kind == "fp8" else FORMATS[fmt].dequant
    if fmt == "bf16" and speed.cc is not None and speed.cc < (8, 0):
        share += BF16_CAST_SHARE
    link = speed.h2d_gbps * (1.0 if pinned else PAGEABLE_RATIO)
    return compute * (1 + share) + streamed_bytes / (link * 1e9)


def compare_formats(req: est.EstimateRequest, speed: CardSpeed, *, usable_mb: int | None, margin: float,
                    formats: Sequence[str] = COMPARED, calibration: est.Calibrated | None = None,
                    ram_mb: int | None = None) -> list[FormatRow]:
    """Every format in `formats`, relative_sit against the fastest that this UI can load (1.0 = the fastest)."""
    require_dit(req.family)
    rows = [format_row(req, f, speed, usable_mb=usable_mb, margin=margin, calibration=calibration, ram_mb=ram_mb)
            for f in formats]
    loadable = [r.step_s for r in rows if r.step_s is not None and r.why_not is None]
    best = min(loadable) if loadable else None
    return [replace(r, relative_sit=round(r.step_s / best, 2)) if r.step_s is not None and best and r.why_not is None
            else r for r in rows]


def _bandwidth_words(speed: CardSpeed, gen: int | None, width: int | None) -> str:
    link = f"PCIe {gen} ×{width}" if gen and width else "PCIe"
    return f"{link} (~{speed.h2d_gbps * PAGEABLE_RATIO:.0f} GB/s from RAM)"


def _bits(row: FormatRow) -> float:
    return FORMATS[row.format].bits


def _than(ratio: float) -> str:
    if ratio >= 1.05:
        return f"~{ratio:.1f}× slower"
    return "about as fast" if ratio > 0.95 else f"~{1 - ratio:.0%} faster"


def recommend(rows: Sequence[FormatRow], vram_mb: int | None, *, pcie_gen: int | None = None,
              pcie_width: int | None = None, speed: CardSpeed | None = None) -> Recommendation | None:
    """The fastest format this UI loads, unless one that fits whole within RECOMMEND_WITHIN of it has more bits
    (less quantisation loss; the most bits wins, a tie goes to the faster). A format that streams is chosen only
    as the fastest, never for its bits: streaming is the least certain part of the estimate (PCIE_EFFICIENCY comes
    from diffusers' pinned-memory stream; the UIs' swap is slower), and the streamed part must sit in RAM. The
    reason names the card and what the next format with more bits would cost."""
    ok = [r for r in rows if r.relative_sit is not None and r.why_not is None]
    if not ok:
        return None
    fastest = min(ok, key=lambda r: (r.relative_sit or 0.0, -_bits(r)))
    whole = [r for r in ok if r.fits and (r.relative_sit or 0.0) <= RECOMMEND_WITHIN]
    pick = max([fastest, *whole], key=lambda r: (_bits(r), -(r.relative_sit or 0.0)))
    card = f"your {vram_mb / 1024:.0f} GB card" if vram_mb else "this card"
    if not pick.fits:
        head = f"{pick.format}: streams {pick.offloaded_mb / 1024:.1f} GiB per step on {card}, the fastest that runs"
    elif pick is fastest:
        head = f"{pick.format}: fits whole on {card}, the fastest that runs"
    else:
        head = f"{pick.format}: fits whole on {card} with less quantisation than {fastest.format}, " + (
            f"~{(pick.relative_sit or 1) - 1:.0%} slower" if (pick.relative_sit or 1) >= 1.01 else "as fast")
    bigger = sorted((r for r in ok if _bits(r) > _bits(pick)), key=lambda r: (_bits(r), r.relative_sit or 0.0))
    if bigger and speed is not None and bigger[0].offloaded_mb:
        b = bigger[0]
        link = _bandwidth_words(speed, pcie_gen, pcie_width)
        head += (f"; {b.format} would stream {b.offloaded_mb / 1024:.1f} GiB per step over {link}, "
                 + _than((b.relative_sit or 1) / (pick.relative_sit or 1)))
    return Recommendation(pick.format, head)
