"""A checkpoint's model family from its safetensors header, read without loading the weights.

The header is 8 bytes of little-endian length, then that much JSON naming every tensor. The
family comes from the key names A1111 itself tests (DESIGN.md §3). `.ckpt`/`.pt` files are pickles:
never unpickled, their family is "unknown" and the user says it with `--model`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from lowvram.errors import WebuiError

MAX_HEADER_BYTES = 100 * 1024 * 1024

SDXL_KEY = "conditioner.embedders.1.model.ln_final.weight"
SDXL_REFINER_KEY = "conditioner.embedders.0.model.ln_final.weight"
SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
SD15_PREFIX = "cond_stage_model.transformer."

_HINT = "re-download the checkpoint (the file is damaged or was cut short), or select another one"


def read_safetensors_header(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WebuiError(f"checkpoint {path.name} is truncated ({size} bytes, no safetensors header)", _HINT)
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise WebuiError(f"checkpoint {path.name} claims a {length}-byte header; not a safetensors file", _HINT)
            if 8 + length > size:
                raise WebuiError(
                    f"checkpoint {path.name} is truncated: its header needs {8 + length} bytes, the file has {size}",
                    _HINT,
                )
            raw = fh.read(length)
    except FileNotFoundError as exc:
        raise WebuiError(f"checkpoint {path} does not exist", "select an existing checkpoint in the UI") from exc
    except OSError as exc:
        raise WebuiError(f"cannot read checkpoint {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WebuiError(f"checkpoint {path.name} has a corrupt safetensors header", _HINT) from exc
    if not isinstance(header, dict):
        raise WebuiError(f"checkpoint {path.name} has a corrupt safetensors header", _HINT)
    return header


def family_from_keys(keys: set[str] | list[str]) -> str:
    keyset = set(keys)
    if SDXL_KEY in keyset:
        return "sdxl"
    if SDXL_REFINER_KEY in keyset:
        return "sdxl-refiner"
    if SD2_KEY in keyset:
        return "sd2"
    if any(k.startswith(SD15_PREFIX) for k in keyset):
        return "sd15"
    return "unknown"


def checkpoint_family(path: Path) -> str:
    """sd15 | sd2 | sdxl | sdxl-refiner | unknown; raises WebuiError for a damaged safetensors file."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return "unknown"
    header = read_safetensors_header(path)
    return family_from_keys([k for k in header if k != "__metadata__"])
