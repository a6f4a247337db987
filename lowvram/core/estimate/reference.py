"""The estimator against its published reference figures, calibration kept apart from validation.

lowvram/data/estimate_reference.json marks every figure the estimator is compared with as
`"set": "calibration"` or `"set": "validation"`. The one free scale of the UNet's working memory
(`memory.UNET_ACT_FIT`, on top of the architecture's derivation `memory.derived_unet_act`) is fitted on
the calibration rows only; the validation rows are what the estimator is judged on
(tests/unit/test_estimate.py; benchmarks/estimate_errors.py prints both, per family).

Pure core: the caller reads the JSON and hands the parsed value in.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lowvram.core.estimate import memory as est
from lowvram.core.estimate.memory import Coefficients, EstimateRequest

SETS = ("calibration", "validation")
CPU_ARTIFACT_MIN_MB = 250.0  # CPU rows below this are dominated by oneDNN's weight reorders (~113 MiB)
# diffusers group offload (leaf level, with a stream): the leaf that runs and the next one prefetched. SDXL's
# largest leaf is a GEGLU projection, 1280 → 10240 (13.1 M parameters, 25 MiB in bf16).
SDXL_LEAF_PAIR_MB = 2 * 1280 * 10240 * 2 / est.MIB


@dataclass(frozen=True)
class RefPoint:
    """One reference figure: what was measured, and how the model predicts it for given coefficients."""

    family: str  # sd15 | sdxl | vae (the VAE rows are shared by the SD families)
    set: str  # calibration | validation
    label: str
    measured_mb: float
    predict: Callable[[Coefficients], float]

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
