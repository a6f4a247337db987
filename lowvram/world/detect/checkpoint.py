"""A checkpoint's model family from its safetensors header, read without loading the weights.

The header is 8 bytes of little-endian length, then that much JSON naming every tensor. A `.gguf`
file's header is read up to MAX_GGUF_HEADER_BYTES (16 MiB). Family, variant and format come from
core/model_files.py; the SD 1.5/2/XL family comes from the key names A1111 itself tests (docs/architecture.md#detection). `.ckpt`/`.pt` files are pickles:
never unpickled, their family is "unknown" and the user says it with `--model`.

Only the 8-byte length and the header are read: the file's type is checked before it is opened
(a FIFO would block the open), it is opened with O_NONBLOCK, and the header is at most 100 MB
(safetensors' own limit). The header is checked as the safetensors loader A1111 uses checks it:
UTF-8 JSON object, no NaN/Infinity, no lone surrogate, `__metadata__` a map of strings, every
tensor with a dtype, a shape of sizes and `[begin, end]` offsets that agree with each other and
tile the data exactly up to the end of the file. A download cut short or a header that lies about
its length is caught here, where the UI would only fail when it loads the model.

Damage is never fatal to a command: `checkpoint_family` raises one WebuiError line naming the file
with a hint, and `probe_webui` turns it into family "unknown" plus `WebuiFacts.checkpoint_error`.
doctor shows it as a warning, plan/apply/launch go on with `--model` (with the warning) and without
it stop as for any checkpoint of unknown family, naming the file, before anything is written.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from lowvram.core.errors import WebuiError
from lowvram.core.model_files import ModelInfo, gguf_info, safetensors_info

MAX_HEADER_BYTES = 100 * 1024 * 1024
# A GGUF header (KV pairs and tensor infos) is read up to this many bytes, never the weights after it:
# a diffusion model's is a few hundred KiB; one larger is refused with that reason.
MAX_GGUF_HEADER_BYTES = 16 * 1024 * 1024


_HINT = "re-download the checkpoint (the file is damaged or was cut short), or select another one"

# Bytes per element of the dtypes safetensors knows; a dtype not listed (a newer one) is not sized.
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}


class _DamagedError(Exception):
    """What is wrong with the header, in words (turned into one WebuiError naming the file)."""


def _show(value: Any) -> str:
    """A value from the file, short and on one line (escaped: never a control character)."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """(open binary file, size), refusing what is not a regular file before opening it."""
    from lowvram.world.fsutil import special_kind

    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise WebuiError(f"checkpoint {path} does not exist", "select an existing checkpoint in the UI") from exc
    except (OSError, ValueError) as exc:
        raise WebuiError(f"cannot read checkpoint {path}: {getattr(exc, 'strerror', None) or exc}",
                         "check the file's permissions") from exc
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise WebuiError(f"checkpoint {path} is {kind}, not a file", "select a checkpoint file in the UI")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise WebuiError(f"cannot read checkpoint {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    fh = os.fdopen(fd, "rb")
    if special_kind(os.fstat(fh.fileno()).st_mode) is not None:
        fh.close()
        raise WebuiError(f"checkpoint {path} changed into a special file while being read",
                         "run again when nothing else is changing it")
    return fh, st.st_size


def _read_header_bytes(path: Path) -> tuple[bytes, int]:
    """(header bytes, size of the data after the header)."""
    fh, size = _open_regular(path)
    try:
        with fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WebuiError(f"checkpoint {path} is truncated ({size} bytes, no safetensors header)", _HINT)
            (length,) = struct.unpack("<Q", head)
            if length == 0:
                raise WebuiError(f"checkpoint {path} has a safetensors header of length 0", _HINT)
            if length > MAX_HEADER_BYTES:
                raise WebuiError(f"checkpoint {path} claims a {length}-byte header; not a safetensors file", _HINT)
            if 8 + length > size:
                raise WebuiError(
                    f"checkpoint {path} is truncated: its header needs {8 + length} bytes, the file has {size}",
                    _HINT,
                )
            raw = fh.read(length)
    except OSError as exc:
        raise WebuiError(f"cannot read checkpoint {path}: {exc.strerror or exc}", "check the file's permissions") from exc
    if len(raw) < length:
        raise WebuiError(f"checkpoint {path} is truncated: it ended inside its header", _HINT)
    return raw, size - 8 - length


def _refuse_constant(name: str) -> Any:
    raise _DamagedError(f"holds {name}, which JSON does not allow")


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _DamagedError(f"is not UTF-8 text (byte {exc.start})") from exc
    try:
        header = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise _DamagedError(f"is not valid JSON ({exc.msg} at byte {exc.pos})") from exc
    except RecursionError as exc:
        raise _DamagedError("is nested too deeply") from exc
    except ValueError as exc:  # an integer over Python's 4300-digit limit
        raise _DamagedError("holds a number too large to be a size or an offset") from exc
    if not isinstance(header, dict):
        kinds = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false"}
        raise _DamagedError(f"is {kinds.get(type(header), 'null')}, not an object of tensors")
    return header


def _is_text(value: Any) -> bool:
    """A string that is valid Unicode (a lone surrogate such as "\\ud800" is not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tensor_span(name: str, info: Any, data_size: int) -> tuple[int, int]:
    """Check one tensor entry; returns its [begin, end) in the data."""
    where = f"gives tensor {_show(name)}"
    if not isinstance(info, dict):
        raise _DamagedError(f"{where} the entry {_show(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not _is_text(dtype):
        raise _DamagedError(f"{where} the dtype {_show(dtype)}, not a name")
    if not isinstance(shape, list) or not all(_size(d) for d in shape):
        raise _DamagedError(f"{where} the shape {_show(shape)}, not a list of sizes")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_size(o) for o in offsets):
        raise _DamagedError(f"{where} the data_offsets {_show(offsets)}, not [begin, end]")
    begin, end = offsets
    if begin > end:
        raise _DamagedError(f"{where} an end (byte {end}) before its beginning (byte {begin})")
    itemsize = DTYPE_BYTES.get(str(dtype))
    if itemsize is not None:
        count = 0 if 0 in shape else 1
        for dim in shape if count else ():
            count *= dim
            if count * itemsize > end - begin:  # already more than its span: no need to multiply on
                break
        if count * itemsize != end - begin:
            raise _DamagedError(f"{where} {end - begin} bytes, not what its shape {_show(shape)} of {dtype} needs")
    return begin, end


def validate_header(header: dict[str, Any], data_size: int) -> None:
    """Check the header as the safetensors loader does; raises _DamagedError."""
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if not _is_text(name):
            raise _DamagedError(f"has a tensor name that is not valid text ({_show(name)})")
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(_is_text(k) and _is_text(v) for k, v in info.items()):
                raise _DamagedError(f"has __metadata__ {_show(info)}, not a map of strings")
            continue
        spans.append(_tensor_span(name, info, data_size))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _DamagedError(f"has tensors that overlap or leave a gap (one begins at byte {begin}, not {position})")
        position = end
    if position > data_size:
        raise _DamagedError(f"names {position} bytes of tensor data, the file holds {data_size} (a download cut short?)")
    if position < data_size:
        raise _DamagedError(f"ends with {data_size - position} bytes that belong to no tensor")


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The checked header of a .safetensors file; one WebuiError naming the file when it is damaged."""
    path = Path(path)
    raw, data_size = _read_header_bytes(path)
    try:
        header = _parse(raw)
        validate_header(header, data_size)
    except _DamagedError as exc:
        raise WebuiError(f"checkpoint {path} is damaged: its safetensors header {exc}", _HINT) from None
    return header


def read_gguf_head(path: Path) -> tuple[bytes, bool]:
    """(the first MAX_GGUF_HEADER_BYTES of a .gguf file, whether that is the whole file)."""
    data, size = _read_head(path, MAX_GGUF_HEADER_BYTES)
    return data, size <= MAX_GGUF_HEADER_BYTES


def _read_head(path: Path, limit: int) -> tuple[bytes, int]:
    """(the first `limit` bytes of a regular file, its size); WebuiError naming the file where it cannot be read."""
    fh, size = _open_regular(path)
    try:
        with fh:
            return fh.read(limit), size
    except OSError as exc:
        raise WebuiError(f"cannot read checkpoint {path}: {exc.strerror or exc}", "check the file's permissions") from exc


def checkpoint_info(path: Path) -> ModelInfo:
    """Family, variant and format of a checkpoint from its header (core/model_files.py); a `.ckpt`/`.pt`
    pickle is never opened (family "unknown"). Raises WebuiError for a damaged safetensors or GGUF header."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        data, complete = read_gguf_head(path)
        info = gguf_info(data, complete=complete, bound=MAX_GGUF_HEADER_BYTES)
        if info.reason is not None:
            raise WebuiError(f"checkpoint {path} is damaged: {info.reason}", _HINT)
        return info
    if suffix not in (".safetensors", ".sft"):  # .sft: ComfyUI's short name for a safetensors file
        return ModelInfo("unknown")
    return safetensors_info(read_safetensors_header(path))


# The model's content key hashes this many bytes from the start of the file: a safetensors or GGUF header
# (every tensor's name, dtype, shape and offset, and the metadata) and, in most files, the first weights
# after it. Bounded: a key costs one read of 1 MiB, however large the model.
CONTENT_KEY_BYTES = 1024 * 1024


def content_key(path: Path) -> str:
    """markers.content_key of a model file: its size and the sha256 of its first CONTENT_KEY_BYTES, the same
    for a copy in another tree (another name, another mtime). Raises WebuiError where it cannot be read."""
    import hashlib

    from lowvram.core.markers import content_key as make_key

    head, size = _read_head(Path(path), CONTENT_KEY_BYTES)
    return make_key(size, hashlib.sha256(head).hexdigest())


def checkpoint_family(path: Path) -> str:
    """The family alone (`checkpoint_info`); raises WebuiError for a damaged header."""
    return checkpoint_info(path).family
