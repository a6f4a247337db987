"""Weight formats: how many bytes a parameter takes in each, which UI loads which, and what computing with
it costs on a given card.

Bits per parameter include each format's block overhead: bitsandbytes NF4/FP4 keep one fp32 absmax per
64 weights (4 + 32/64 = 4.5 bits: diffusers' default and Forge's flux1-dev-bnb-nf4 v2; the v1 file
compressed the absmax a second time, ~4.13 bits, 0.5 GB smaller); GGUF blocks (ggml-common.h): Q8_0 34
bytes per 32 weights (8.5 bits), Q5_0 22/32 (5.5), Q5_1 24/32 (6), Q4_0 18/32 (4.5), Q4_1 20/32 (5), and
the 256-weight K-quant super-blocks Q6_K 210 bytes (6.5625 bits), Q5_K 176 (5.5), Q4_K 144 (4.5), Q3_K 110
(3.4375), Q2_K 84 (2.625). A K-quant file type (`q4_k_s`, `q4_k_m`, …) mixes block types; the `_m` types
give a few tensors one type more: counted as the base type plus the few tenths of a bit written beside it
in FORMATS. A GGUF file also keeps its one-dimensional and small tensors (biases, norms, embedders) in
F16/F32: `DitSpec.kept_high_params` in dit.py (bitsandbytes and fp8 files convert every Linear).

Pure core.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.core.errors import UsageError


@dataclass(frozen=True)
class WeightFormat:
    name: str  # lower case, as doctor --json's model_format
    bits: float  # stored bits per parameter, block scales included
    kind: str  # float | fp8 | bnb | gguf
    dequant: float  # extra time per step, as a share of the step's 16-bit compute time (see DEQUANT_WHY)


DEQUANT_WHY = (
    "a format that is not the card's native math is turned back into 16 bit layer by layer every step. "
    "Measured (diffusers' benchmark, Flux-dev forward on an L40): bnb NF4 0.512 s and layerwise fp8 0.549 s "
    "against bf16 0.493 s, i.e. +4 % and +11 %. GGUF is unpacked by PyTorch code (ComfyUI-GGUF, Forge's "
    "packages_3rdparty/gguf): no published timing was found; lowvram assumes Q8_0 a little dearer than the fp8 "
    "cast (+15 %), the legacy 4/5-bit blocks +20 % and the K-quants, with more steps per block, +30 %"
)

_FLOAT, _FP8, _NF4, _Q8, _QLEGACY, _QK = 0.0, 0.11, 0.04, 0.15, 0.20, 0.30

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat("fp32", 32.0, "float", _FLOAT),
    WeightFormat("fp16", 16.0, "float", _FLOAT),
    WeightFormat("bf16", 16.0, "float", _FLOAT),
    WeightFormat("fp8_e4m3fn", 8.0, "fp8", _FP8),
    WeightFormat("fp8_e5m2", 8.0, "fp8", _FP8),
    WeightFormat("nf4", 4.5, "bnb", _NF4),
    WeightFormat("fp4", 4.5, "bnb", _NF4),
    WeightFormat("q8_0", 8.5, "gguf", _Q8),
    WeightFormat("q6_k", 6.5625, "gguf", _QK),
    WeightFormat("q5_k_m", 5.5 + 0.2, "gguf", _QK),
    WeightFormat("q5_k_s", 5.5, "gguf", _QK),
    WeightFormat("q5_k", 5.5, "gguf", _QK),
    WeightFormat("q5_1", 6.0, "gguf", _QLEGACY),
    WeightFormat("q5_0", 5.5, "gguf", _QLEGACY),
    WeightFormat("q4_k_m", 4.5 + 0.3, "gguf", _QK),
    WeightFormat("q4_k_s", 4.5, "gguf", _QK),
    WeightFormat("q4_k", 4.5, "gguf", _QK),
    WeightFormat("q4_1", 5.0, "gguf", _QLEGACY),
    WeightFormat("q4_0", 4.5, "gguf", _QLEGACY),
    WeightFormat("q3_k_l", 3.4375 + 0.6, "gguf", _QK),
    WeightFormat("q3_k_m", 3.4375 + 0.4, "gguf", _QK),
    WeightFormat("q3_k_s", 3.4375, "gguf", _QK),
    WeightFormat("q3_k", 3.4375, "gguf", _QK),
    WeightFormat("q2_k", 2.625, "gguf", _QK),
)}

COMPARED = ("bf16", "fp8_e4m3fn", "q8_0", "q6_k", "q5_k_s", "q4_k_s", "q4_0", "nf4", "q3_k_s")
"""The formats `estimate --formats` compares: what Flux/SD3 files are published in (city96's GGUF quants,
Forge's NF4, Comfy-Org's fp8, the original bf16)."""


def weight_format(name: str) -> WeightFormat:
    """The format by its name (doctor's model_format), or one UsageError naming the known ones."""
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        raise UsageError(f"unknown weight format {name!r}", f"use one of: {', '.join(FORMATS)}")
    return fmt


def weights_bytes(params: float, fmt: WeightFormat, kept_high_params: float = 0.0) -> float:
    """Bytes of `params` parameters stored in `fmt`; `kept_high_params` of them stay 16-bit in a quantised file."""
    if fmt.kind == "float":
        return params * fmt.bits / 8
    kept = min(kept_high_params, params)
    return (params - kept) * fmt.bits / 8 + kept * 2


def ui_loads(ui: str, fmt: WeightFormat, family: str) -> str | None:
    """Why `ui` cannot load a `family` file in `fmt`, or None where it can (as shipped, or with the one
    extension every guide names)."""
    if ui == "a1111":
        if fmt.kind in ("bnb", "gguf"):
            return "A1111 loads no NF4 or GGUF files"
        if not family.startswith("sd3-") and family not in ("sd15", "sd2", "sdxl", "sdxl-refiner"):
            return "A1111 runs no Flux or SD 3.5 model (SD3 medium only, from 1.10)"
        return None
    if ui == "sdnext":
        return None
    if ui == "comfyui" and fmt.kind == "bnb":
        return "ComfyUI loads NF4 only through a custom node (ComfyUI_bitsandbytes_NF4, unmaintained)"
    return None


def native_fp8(cc: tuple[int, int] | None) -> bool:
    """fp8 matrix math exists from compute capability 8.9 (Ada); below it fp8 weights are upcast per layer."""
    return cc is not None and cc >= (8, 9)
