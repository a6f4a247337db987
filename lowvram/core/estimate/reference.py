"""The estimator against its published reference figures, calibration kept apart from validation.

lowvram/data/estimate_reference.json marks every figure the estimator is compared with as
`"set": "calibration"` or `"set": "validation"`. The one free scale of the UNet's working memory
(`memory.UNET_ACT_FIT`, on top of the architecture's derivation `memory.derived_unet_act`) is fitted on
the calibration rows only; the validation rows are what the estimator is judged on
(tests/unit/test_estimate.py; benchmarks/estimate_errors.py prints both, per family).

The diffusion transformers and the weight formats have rows of their own (`"dit"`: diffusers' Flux-dev
benchmark on an L40, city96's GGUF files, Forge's NF4 all-in-one): `dit_points` turns them into RefPoints of
family "flux1-dev", and `fit_dit_constants` refits each constant of dit.py, formats.py and format_choice.py
from the one calibration row it was fitted on (tests/unit/test_estimate_dit.py compares them).

Pure core: the caller reads the JSON and hands the parsed value in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lowvram.core.estimate import dit
from lowvram.core.estimate import format_choice as fc
from lowvram.core.estimate import memory as est
from lowvram.core.estimate.formats import FORMATS
from lowvram.core.estimate.memory import Coefficients, EstimateRequest

SETS = ("calibration", "validation")
CPU_ARTIFACT_MIN_MB = 250.0  # CPU rows below this are dominated by oneDNN's weight reorders (~113 MiB)
# diffusers group offload (leaf level, with a stream): the leaf that runs and the next one prefetched. SDXL's
# largest leaf is a GEGLU projection, 1280 → 10240 (13.1 M parameters, 25 MiB in bf16).
SDXL_LEAF_PAIR_MB = 2 * 1280 * 10240 * 2 / est.MIB


@dataclass(frozen=True)
class RefPoint:
    """One reference figure: what was measured, and how the model predicts it for given coefficients."""

    family: str  # sd15 | sdxl | vae (the VAE rows are shared by the SD families) | flux1-dev
    set: str  # calibration | validation
    label: str
    measured_mb: float  # the figure, in `unit`
    predict: Callable[[Coefficients], float]
    unit: str = "MiB"  # MiB, or s for a step time (the DiT rows)

    def error(self, co: Coefficients) -> float:
        """Relative error of the prediction, signed (positive: the model says more than was measured)."""
        return (self.predict(co) - self.measured_mb) / self.measured_mb


class _Cal:
    """A `Calibrated` for estimate(): just the coefficients."""

    def __init__(self, co: Coefficients) -> None:
        self.coefficients = co


def _torch_peak(req: EstimateRequest) -> Callable[[Coefficients], float]:
    return lambda co: float(est.estimate(req, _Cal(co)).torch_peak_mb)


def _wiki_points(rows: Iterable[Mapping[str, Any]]) -> list[RefPoint]:
    """A1111 wiki, SD1.5 512² fp16 on an RTX 3060; early-2023 A1111 unbatched cond/uncond under medvram/lowvram."""
    out = []
    for row in rows:
        if row.get("gb") is None:  # OOM on the 12 GB card: checked as "does not fit" by the tests
            continue
        req = EstimateRequest("sd15", 512, 512, int(row["batch"]), attention=str(row["attention"]),
                              offload=str(row["offload"]), batch_cond_uncond=row["offload"] == "none")
        label = f"A1111 wiki {row['backend']} {row['offload']} b{row['batch']}"
        out.append(RefPoint("sd15", str(row["set"]), label, float(row["gb"]) * 1024, _torch_peak(req)))
    return out


def _measured_point(row: Mapping[str, Any]) -> RefPoint | None:
    """benchmarks/estimate_measure.py: diffusers UNet/VAE, fp32, the CPU allocator's working peak."""
    if float(row["working_mb"]) < CPU_ARTIFACT_MIN_MB:
        return None
    naive = bool(row["naive"])
    w, h, b = int(row["width"]), int(row["height"]), int(row["batch"])
    if row["part"] == "unet":
        # ui sdnext batches cond/uncond: halve, so the measured UNet batch b is what is predicted.
        req = EstimateRequest(str(row["family"]), w, h, b, precision="full", vae_precision="full",
                              attention="none" if naive else "sdp", offload="lowvram", ui="sdnext")

        def unet(co: Coefficients) -> float:
            return sum(est.phase_terms(req, co)["sampling"].unet.values()) / est.MIB / 2

        return RefPoint(str(row["family"]), str(row["set"]), f"CPU diffusers UNet {w}² b{b}"
                        + (" naive" if naive else ""), float(row["working_mb"]), unet)
    vreq = EstimateRequest("sd15", w, h, 1, precision="full", vae_precision="full",
                           attention="none" if naive else "sdp", ui="sdnext")

    def vae(co: Coefficients) -> float:
        # oneDNN writes a convolution's output to a second buffer on CPU (reference "cpu_conv_artifact"):
        # at the decode's peak one 256-channel full-resolution tensor that CUDA does not hold.
        return sum(est.phase_terms(vreq, co)["vae_decode"].vae.values()) / est.MIB + 256 * w * h * 4 / est.MIB

    return RefPoint("vae", str(row["set"]), f"CPU diffusers VAE decode {w}²" + (" naive" if naive else ""),
                    float(row["working_mb"]), vae)


def _figure_point(fig: Mapping[str, Any]) -> RefPoint | None:
    """The published figures the model can state exactly (`case`); the others are kept as notes."""
    case = fig.get("case")
    if case == "sdnext_sdxl_decode":  # SD.Next, SDXL fp16 1024², models resident: the decode's active peak
        req = EstimateRequest("sdxl", 1024, 1024, ui="sdnext")
        return RefPoint("sdxl", str(fig["set"]), "SD.Next SDXL 1024² decode", fig["active_peak_bytes"] / est.MIB,
                        _torch_peak(req))
    if case in ("diffusers_sdxl_unet", "diffusers_sdxl_unet_group_offload"):
        # diffusers' benchmark: one UNet forward, latent 1×4×128×128 (1024², batch 1, no CFG), bf16, SDPA.
        req = EstimateRequest("sdxl", 1024, 1024, 1, attention="sdp", offload="medvram", batch_cond_uncond=False)
        resident = case == "diffusers_sdxl_unet"

        def unet(co: Coefficients) -> float:
            terms = est.phase_terms(req, co)["sampling"]
            weights = terms.resident.unet if resident else SDXL_LEAF_PAIR_MB * est.MIB
            return (weights + sum(terms.unet.values())) / est.MIB

        label = "diffusers SDXL UNet 1024² b1 " + ("resident" if resident else "group offload")
        return RefPoint("sdxl", str(fig["set"]), label, float(fig["mem_gb"]) * 1024, unet)
    return None


def reference_points(data: Mapping[str, Any]) -> list[RefPoint]:
    """Every figure of estimate_reference.json the model predicts, each marked calibration or validation."""
    points = _wiki_points(data["a1111_wiki"])
    for row in data["measured"]["rows"]:
        pt = _measured_point(row)
        if pt is not None:
            points.append(pt)
    for fig in data["figures"]:
        pt = _figure_point(fig)
        if pt is not None:
            points.append(pt)
    bad = [p.label for p in points if p.set not in SETS]
    if bad:
        raise ValueError(f"reference rows without a calibration/validation set: {bad}")
    return points


def with_act_fit(fit: float, base: Coefficients = est.DEFAULT_COEFFICIENTS) -> Coefficients:
    """`base` with the UNet's working memory = the architecture's derivation × `fit`, for every family."""
    return base.with_(unet_act=est.default_unet_act(fit))


def fit_act_scale(points: Sequence[RefPoint], base: Coefficients = est.DEFAULT_COEFFICIENTS) -> float:
    """The scale that minimises the calibration rows' summed absolute log errors (robust to the few cells the
    model does not describe, e.g. Doggettx slicing to the free memory at --lowvram batch 16), on a 0.5 %-step
    grid from 0.5 to 3."""
    cal = [p for p in points if p.set == "calibration"]

    def loss(fit: float) -> float:
        co = with_act_fit(fit, base)
        return sum(abs(math.log(p.predict(co) / p.measured_mb)) for p in cal)

    grid = [round(0.5 * 1.005**i, 4) for i in range(int(math.log(6) / math.log(1.005)) + 1)]
    return min(grid, key=loss)


@dataclass(frozen=True)
class ErrorSummary:
    family: str
    set: str
    rows: int
    median: float  # of the absolute relative errors
    worst: float
    worst_label: str


def error_summary(points: Sequence[RefPoint], co: Coefficients = est.DEFAULT_COEFFICIENTS) -> list[ErrorSummary]:
    """Median and worst absolute relative error per family and set."""
    out = []
    for fam in sorted({p.family for p in points}):
        for s in SETS:
            errs = [(abs(p.error(co)), p.label) for p in points if p.family == fam and p.set == s]
            if errs:
                worst = max(errs)
                out.append(ErrorSummary(fam, s, len(errs), statistics.median(e for e, _ in errs), worst[0], worst[1]))
    return out


# --- The diffusion transformers and the weight formats (estimate_reference.json "dit") ---------------------------

GIB = 1024.0**3
# diffusers' benchmark CI card (benchmarks/README.md): an L40, AD102 with 142 SMs × 128 = 18176 CUDA cores at a
# 2490 MHz boost (181 TFLOPS dense bf16), PCIe 4 ×16.
L40 = {"cc": (8, 9), "name": "NVIDIA L40", "cores": 18176, "clock_mhz": 2490, "pcie_gen": 4, "pcie_width": 16}
# diffusers' Flux layout: the largest leaf is a double block's adaLN linear (3072 → 18432, with its bias), and
# norm1 and norm1_context run one after the other: the largest pair group offload holds (the running leaf and
# the prefetched one). BFL's single-block linear1 (3072 → 21504) + linear2 (15360 → 3072) is the same 113 M.
FLUX_LARGEST_LEAF_PARAMS = 3072 * 18432 + 18432
FLUX_LEAF_PAIR_PARAMS = 2 * FLUX_LARGEST_LEAF_PARAMS
_FAMILY = "flux1-dev"


def l40_speed() -> fc.CardSpeed:
    return fc.card_speed(cc=(8, 9), name=str(L40["name"]), cores=18176, clock_mhz=2490, pcie_gen=4, pcie_width=16)


def _flux_forward(fmt: str) -> EstimateRequest:
    """diffusers' benchmark: one transformer forward at 1024² (4096 image + 512 text tokens), batch 1, SDPA; the
    sampling phase of a UI that swaps whole models holds the transformer alone (ui comfyui)."""
    return EstimateRequest(_FAMILY, 1024, 1024, 1, attention="sdp", ui="comfyui", weight_format=fmt)


def _sampling(fmt: str, co: Coefficients = est.DEFAULT_COEFFICIENTS) -> tuple[float, float]:
    """(weights, working memory) bytes of the forward's sampling phase."""
    terms = est.phase_terms(_flux_forward(fmt), co)["sampling"]
    return terms.resident.unet, sum(terms.unet.values())


def _dit_memory(case: str) -> Callable[[Coefficients], float] | None:
    """The predicted peak (MiB) of a diffusers Flux-dev forward row."""
    bf16 = FORMATS["bf16"]

    def resident(fmt: str) -> Callable[[Coefficients], float]:
        return lambda co: sum(_sampling(fmt, co)) / est.MIB

    def group_offload(co: Coefficients) -> float:
        return (FLUX_LEAF_PAIR_PARAMS * bf16.bits / 8 + _sampling("bf16", co)[1]) / est.MIB

    def layerwise_fp8(co: Coefficients) -> float:
        # The load (bf16 model on the GPU, one leaf's fp8 copy beside it) or the fp8 forward with one leaf upcast.
        load = dit.model_bytes(_FAMILY, bf16) + FLUX_LARGEST_LEAF_PARAMS
        weights, working = _sampling("fp8_e4m3fn", co)
        return max(load, weights + working + FLUX_LARGEST_LEAF_PARAMS * 2) / est.MIB

    return {"diffusers_flux_bf16_peak": resident("bf16"), "diffusers_flux_nf4_peak": resident("nf4"),
            "diffusers_flux_group_offload_peak": group_offload, "diffusers_flux_fp8_peak": layerwise_fp8}.get(case)


def _dit_time(case: str) -> Callable[[Coefficients], float] | None:
    """The predicted forward time (s) on the L40: format_choice's step time."""
    streamed = {"diffusers_flux_group_offload_time": dit.model_bytes(_FAMILY, FORMATS["bf16"])}
    fmt = {"diffusers_flux_bf16_time": "bf16", "diffusers_flux_nf4_time": "nf4", "diffusers_flux_fp8_time": "fp8_e4m3fn",
           "diffusers_flux_group_offload_time": "bf16"}.get(case)
    if fmt is None:
        return None
    return lambda co: fc.step_seconds(_flux_forward(fmt), fmt, l40_speed(), streamed.get(case, 0.0), pinned=True)


def _dit_size(row: Mapping[str, Any]) -> Callable[[Coefficients], float]:
    """A file's size (MiB): the transformer in its format, or Forge's all-in-one (NF4 transformer, T5-XXL fp8,
    CLIP-L fp16, VAE bf16)."""
    if row["case"] == "forge_flux_nf4_aio_size":
        total = (dit.model_bytes(_FAMILY, FORMATS["nf4"]) + dit.text_bytes(_FAMILY, FORMATS["fp8_e4m3fn"], 2)
                 + dit.VAE16_PARAMS * 2)
    else:
        total = dit.model_bytes(_FAMILY, FORMATS[str(row["format"])])
    return lambda co: total / est.MIB


def dit_points(data: Mapping[str, Any]) -> list[RefPoint]:
    """The DiT and weight-format rows of estimate_reference.json ("dit"), family flux1-dev."""
    points = []
    for row in data["dit"]:
        case = label = str(row["case"])
        if "seconds" in row:
            predict, measured, unit = _dit_time(case), float(row["seconds"]), "s"
        elif "gib" in row:
            predict, measured, unit = _dit_memory(case), float(row["gib"]) * GIB / est.MIB, "MiB"
        else:
            predict, measured, unit = _dit_size(row), float(row["gb"]) * 1e9 / est.MIB, "MiB"
        if predict is None:
            raise ValueError(f"reference row {case!r}: the model predicts no such case")
        if row["set"] not in SETS:
            raise ValueError(f"reference row {case!r} without a calibration/validation set")
        points.append(RefPoint(_FAMILY, str(row["set"]), label, measured, predict, unit))
    return points


@dataclass(frozen=True)
class DitFit:
    """The DiT constants as their calibration rows give them (each from one row; no validation row is read)."""

    act_fit: float  # dit.DIT_ACT_FIT ← the bf16 peak
    matmul_efficiency: float  # format_choice.MATMUL_EFFICIENCY ← the bf16 time
    pcie_efficiency: float  # format_choice.PCIE_EFFICIENCY ← the group-offload time
    nf4_dequant: float  # formats.FORMATS["nf4"].dequant ← the NF4 time
    fp8_dequant: float  # formats.FORMATS["fp8_e4m3fn"].dequant ← the fp8 time
    kept_high_params: float  # dit.SPECS["flux1-dev"].kept_high_params ← the Q4_0 file


def _calibration_row(rows: Sequence[Mapping[str, Any]], case: str) -> Mapping[str, Any]:
    found = [r for r in rows if r["case"] == case]
    if len(found) != 1 or found[0]["set"] != "calibration":
        raise ValueError(f"{case}: a constant is fitted on it, so it must be one row marked calibration")
    return found[0]


def fit_dit_constants(data: Mapping[str, Any]) -> DitFit:
    """Invert the model on each calibration row: the value of the constant that makes it predict the row exactly."""
    rows = data["dit"]

    def cal(case: str, key: str) -> float:
        return float(_calibration_row(rows, case)[key])

    weights, working = _sampling("bf16")
    act_fit = dit.DIT_ACT_FIT * (cal("diffusers_flux_bf16_peak", "gib") * GIB - weights) / working
    speed, req = l40_speed(), _flux_forward("bf16")
    t_bf16 = cal("diffusers_flux_bf16_time", "seconds")
    compute = fc.step_seconds(req, "bf16", speed, 0.0, pinned=True)  # ∝ 1 / MATMUL_EFFICIENCY
    stream = fc.step_seconds(req, "bf16", speed, dit.model_bytes(_FAMILY, FORMATS["bf16"]), pinned=True) - compute
    q4 = FORMATS["q4_0"]
    size = cal("city96_flux_q4_0_size", "gb") * 1e9
    return DitFit(
        act_fit=act_fit,
        matmul_efficiency=fc.MATMUL_EFFICIENCY * compute / t_bf16,
        pcie_efficiency=fc.PCIE_EFFICIENCY * stream / (cal("diffusers_flux_group_offload_time", "seconds") - t_bf16),
        nf4_dequant=cal("diffusers_flux_nf4_time", "seconds") / t_bf16 - 1,
        fp8_dequant=cal("diffusers_flux_fp8_time", "seconds") / t_bf16 - 1,
        kept_high_params=(size - dit.SPECS[_FAMILY].params * q4.bits / 8) / (2 - q4.bits / 8),
    )
