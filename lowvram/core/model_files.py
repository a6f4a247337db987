"""A diffusion model file's family, variant and format, from its header alone (never the weights).

Pure: the edge (world/detect/checkpoint.py) reads the header bytes, bounded, and hands them here.

- safetensors: the checked header (a dict of tensor name -> {dtype, shape, data_offsets}, plus
  `__metadata__`). The format is the dtype that holds most of the diffusion model's parameters
  (F16 -> fp16, BF16 -> bf16, F32 -> fp32, F8_E4M3 -> fp8_e4m3fn, F8_E5M2 -> fp8_e5m2), or nf4/fp4
  where bitsandbytes' quant-state keys (`*.quant_state.bitsandbytes__nf4`/`__fp4`) say so.
- GGUF: magic `GGUF`, version, tensor count, KV count, the KV pairs, then each tensor's name,
  dims (ggml order: innermost first), ggml type id and offset. The format is `general.file_type`
  where it is set (Q4_K_S vs Q4_K_M is told only there), else the type holding most parameters.
  Parsed here rather than with the `gguf` package: `import gguf` imports numpy (~100 ms), which
  `doctor` and `plan` must not pay (tests/integration/test_startup_imports.py).

Families come from key names and shapes as ComfyUI's comfy/model_detection.py tells them apart,
for single-file checkpoints (`model.diffusion_model.` prefix) and diffusion-model-only files (no
prefix). Nothing here raises on damaged bytes: `gguf_info` returns family "unknown" with a reason.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

DETECTED_FAMILIES = ("sd15", "sd2", "sdxl", "sdxl-refiner", "sd3-medium", "sd3.5-medium", "sd3.5-large",
                     "flux1-dev", "flux1-schnell")
FAMILY_NAMES = {"sd15": "SD 1.5", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl-refiner": "SDXL refiner",
                "sd3-medium": "SD3 Medium", "sd3.5-medium": "SD3.5 Medium", "sd3.5-large": "SD3.5 Large",
                "flux1-dev": "FLUX.1 dev", "flux1-schnell": "FLUX.1 schnell"}
DIFFUSION_PREFIX = "model.diffusion_model."

SAFETENSORS_FORMATS = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64",
                       "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
GGML_TYPES = {0: "fp32", 1: "fp16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 9: "q8_1",
              10: "q2_k", 11: "q3_k", 12: "q4_k", 13: "q5_k", 14: "q6_k", 15: "q8_k", 30: "bf16"}
# llama.cpp's LLAMA_FTYPE_* (general.file_type): the only place Q4_K_S and Q4_K_M differ.
GGUF_FILE_TYPES = {0: "fp32", 1: "fp16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
                   11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
                   17: "q5_k_m", 18: "q6_k", 32: "bf16"}
GGUF_MAGIC = b"GGUF"
MAX_GGUF_COUNT = 1_000_000  # tensors or KV pairs: more is a damaged header, not a model

SDXL_KEY = "conditioner.embedders.1.model.ln_final.weight"
SDXL_REFINER_KEY = "conditioner.embedders.0.model.ln_final.weight"
SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SD15_PREFIX = "cond_stage_model.transformer."


@dataclass(frozen=True)
class ModelInfo:
    family: str  # one of DETECTED_FAMILIES, or "unknown"
    variant: str | None = None  # "v-prediction" where the file says so
    format: str | None = None  # fp16, bf16, fp8_e4m3fn, nf4, q4_k_s, ... (None: not told)
    parameters: int = 0
    reason: str | None = None  # why the header could not be read (a damaged GGUF header)

    def describe(self) -> str:
        """'flux1-dev (nf4)', 'sdxl (v-prediction, fp16)', 'unknown (12 parameters, format fp16)'."""
        if self.family == "unknown":
            return f"unknown ({self.parameters} parameters, format {self.format or 'unknown'})"
        extra = ", ".join(x for x in (self.variant, self.format) if x)
        return f"{self.family} ({extra})" if extra else self.family


def _count(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _diffusion_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The diffusion model's tensors without the single-file prefix (or all of them, if none has it)."""
    inner = {k[len(DIFFUSION_PREFIX):]: v for k, v in shapes.items() if k.startswith(DIFFUSION_PREFIX)}
    return inner or dict(shapes)


def _unet_family(unet: Mapping[str, tuple[int, ...]]) -> str:
    """An SD UNet without its text encoders: by label_emb and model channels (SDXL, refiner), then the
    cross-attention width (768 SD 1.5, 1024 SD 2). bitsandbytes packs Linear weights into [n, 1]
    shapes, so a packed file is told by what it leaves whole: the first conv's channels, and proj_in
    (a 1x1 conv in SD 1.5, a Linear in SD 2)."""
    label = unet.get("label_emb.0.0.weight")
    first = unet.get("input_blocks.0.0.weight") or (0,)
    if label is not None and len(label) == 2:
        if label[1] == 1:  # packed
            return {320: "sdxl", 384: "sdxl-refiner"}.get(first[0], "unknown")
        return {2816: "sdxl", 2560: "sdxl-refiner"}.get(label[1], "unknown")
    to_k = unet.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None and len(to_k) == 2 and to_k[1] in (768, 1024):
        return "sd15" if to_k[1] == 768 else "sd2"
    proj_in = unet.get("input_blocks.1.1.proj_in.weight")
    if proj_in is not None and first[0] == 320:
        return "sd15" if len(proj_in) == 4 else "sd2"
    return "unknown"


def _dit_family(unet: Mapping[str, tuple[int, ...]]) -> str | None:
    if "double_blocks.0.img_attn.qkv.weight" in unet or any(k.startswith("double_blocks.") for k in unet):
        return "flux1-dev" if any(k.startswith("guidance_in.") for k in unet) else "flux1-schnell"
    depth = len({k.split(".")[1] for k in unet if k.startswith("joint_blocks.")})
    if not depth:
        return None
    embed = unet.get("x_embedder.proj.weight")
    hidden = embed[0] if embed else 0
    if depth == 38 or hidden == 2432:
        return "sd3.5-large"
    if depth == 24 and hidden == 1536:
        mmdit_x = any(".x_block.attn2." in k for k in unet)
        return "sd3.5-medium" if mmdit_x else "sd3-medium"
    return "unknown"


def family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The family from tensor names and shapes (a full checkpoint or the diffusion model alone)."""
    if SDXL_KEY in shapes:
        return "sdxl"
    if SDXL_REFINER_KEY in shapes:
        return "sdxl-refiner"
    if SD2_KEY in shapes:
        return "sd2"
    if any(k.startswith(SD15_PREFIX) for k in shapes):
        return "sd15"
    unet = _diffusion_shapes(shapes)
    return _dit_family(unet) or _unet_family(unet)


def _dominant(counts: Mapping[str, int]) -> str | None:
    return max(sorted(counts), key=lambda k: counts[k]) if counts else None


def safetensors_info(header: Mapping[str, Any]) -> ModelInfo:
    """Family, variant and format of a checked safetensors header (checkpoint.validate_header)."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        shapes[name] = tuple(d for d in entry.get("shape", ()) if isinstance(d, int))
        dtypes[name] = str(entry.get("dtype"))
    family = family_from_shapes(shapes)
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    prediction = str(meta.get("modelspec.prediction_type", "")).lower()
    v_pred = "v_pred" in shapes or prediction in ("v", "v_prediction", "v-prediction")
    keys = [k.lower() for k in shapes]
    fmt: str | None
    if any(k.endswith("bitsandbytes__nf4") for k in keys):
        fmt = "nf4"
    elif any(k.endswith("bitsandbytes__fp4") for k in keys):
        fmt = "fp4"
    else:
        inner = {k for k in shapes if k.startswith(DIFFUSION_PREFIX)} or set(shapes)
        counts: dict[str, int] = {}
        for k in inner:
            counts[dtypes[k]] = counts.get(dtypes[k], 0) + _count(shapes[k])
        dom = _dominant(counts)
        fmt = SAFETENSORS_FORMATS.get(dom, dom.lower()) if dom else None
    return ModelInfo(family, "v-prediction" if v_pred and family != "unknown" else None, fmt,
                     sum(_count(s) for s in shapes.values()))


class _ShortError(Exception):
    """The bytes ended inside the GGUF header."""


class _DamagedError(Exception):
    """The GGUF header says something no GGUF file says."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _ShortError
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int, depth: int = 0) -> Any:
        scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
        if vtype in scalar:
            return self.unpack(scalar[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9 and depth < 4:
            etype, n = self.unpack("I"), self.unpack("Q")
            if n > len(self.data):  # every element takes at least a byte
                raise _ShortError
            return [self.value(etype, depth + 1) for _ in range(n)]
        raise _DamagedError(f"a KV value of unknown type {vtype}")


def _read_gguf(data: bytes) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int]]]:
    """(KV pairs, tensor name -> (torch-order shape, ggml type id)); raises _ShortError or _DamagedError."""
    r = _Reader(data)
    if r.take(4) != GGUF_MAGIC:
        raise _DamagedError("does not begin with the GGUF magic")
    version = r.unpack("I")
    if version not in (2, 3):
        raise _DamagedError(f"is GGUF version {version}, not 2 or 3")
    n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_tensors > MAX_GGUF_COUNT or n_kv > MAX_GGUF_COUNT:
        raise _DamagedError(f"claims {n_tensors} tensors and {n_kv} KV pairs")
    kv: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        kv[key] = r.value(r.unpack("I"))
    tensors: dict[str, tuple[tuple[int, ...], int]] = {}
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.unpack("I")
        if n_dims > 8:
            raise _DamagedError(f"gives tensor {json.dumps(name)[:60]} {n_dims} dimensions")
        dims = tuple(r.unpack("Q") for _ in range(n_dims))
        ggml_type = r.unpack("I")
        r.unpack("Q")  # its offset in the data
        tensors[name] = (tuple(reversed(dims)), ggml_type)
    return kv, tensors


def gguf_info(data: bytes, *, complete: bool, bound: int) -> ModelInfo:
    """Family, variant and format from a GGUF file's first bytes (`complete`: the whole file is in
    `data`; else only its first `bound` bytes). A damaged header: family "unknown" with a reason."""
    try:
        kv, tensors = _read_gguf(data)
    except _ShortError:
        why = ("its GGUF header is truncated" if complete
               else f"its GGUF header is larger than the {bound // (1024 * 1024)} MiB lowvram reads")
        return ModelInfo("unknown", format="gguf", reason=why)
    except _DamagedError as exc:
        return ModelInfo("unknown", format="gguf", reason=f"its GGUF header {exc}")
    except (struct.error, UnicodeError, RecursionError, MemoryError, OverflowError) as exc:
        return ModelInfo("unknown", format="gguf", reason=f"its GGUF header cannot be read ({type(exc).__name__})")
    shapes = {name: shape for name, (shape, _t) in tensors.items()}
    family = family_from_shapes(shapes)
    file_type = kv.get("general.file_type")
    fmt = GGUF_FILE_TYPES.get(file_type) if isinstance(file_type, int) else None
    if fmt is None:
        counts: dict[str, int] = {}
        for shape, ggml_type in tensors.values():
            name = GGML_TYPES.get(ggml_type, f"ggml type {ggml_type}")
            counts[name] = counts.get(name, 0) + _count(shape)
        fmt = _dominant(counts) or "gguf"
    return ModelInfo(family, None, fmt, sum(_count(s) for s in shapes.values()))
