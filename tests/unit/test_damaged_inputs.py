"""Damaged inputs through the real CLI (issue 14, class 3): one parametrized table per input kind.

Every file lowvram reads is damaged in many ways: nesting 200k deep, numbers over Python's
4300-digit limit, lengths that lie, truncation, trailing garbage, wrong types, NaN/Infinity,
byte-order marks, UTF-16, lone surrogates, control characters. The promise (docs/architecture.md#damaged-and-hostile-inputs): no
traceback and no "unexpected error", the file's path named, a hint, and never a half-done
operation. Two outcomes, decided per input (see each reader's module docstring):

- inputs the user hands lowvram to act on (a `--facts` file, a profile) stop the command: exit 1,
  one `error:` line naming the file and a `hint:` line; apply has written nothing;
- inputs lowvram only reads past (the checkpoint's safetensors header, A1111's config.json, the
  observations, VRAM Estimator's stats.json) never stop it: exit 0 with a warning naming the file
  and saying what to do; where the damage leaves a question open (the model family of a damaged
  checkpoint) and nothing else answers it, the command stops as it would without the file (exit 1,
  the file named, the hint `--model`), before any write.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import paths
from tests.conftest import run_lowvram
from tests.fixtures.git_repos import tree_snapshot
from tests.fixtures.safetensors import FAMILY_KEYS
from tests.fixtures.webui_trees import make_webui

GOOD_FACTS: dict[str, Any] = {
    "schema": 1,
    "system": {"os": "linux", "os_version": "6.1", "ram_mb": 32768, "swap_mb": 0, "glibc": "2.36", "wsl": False},
    "gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
              "vram_free_mb": 7800, "driver": "550.54.14", "cuda_driver": "12.4", "compute_capability": "6.1",
              "pcie_gen": 3, "pcie_width": 16}],
    "other_gpus": [],
    "tcmalloc": {"library": None, "usable": False, "reason": "not installed"},
    "webui": None,
}

# A user profile without extensions, so a real apply needs no network.
PLAIN_PROFILE = "description: 8gb-sdxl without extensions\nextends: 8gb-sdxl\nextensions: []\n"

DEEP = 200_000
BIG = "9" * 5000


def clean(result: Any, *, code: int, path: Path, hint: str | None = None) -> str:
    """The promise for one CLI run; returns the text that names `path` (for more asserts)."""
    text = result.out + result.err
    assert "Traceback" not in text, text[-3000:]
    assert "unexpected error" not in text, text[-3000:]
    assert result.code == code, text[-3000:]
    lines = [line for line in text.splitlines() if str(path) in line]
    assert lines, f"{path} not named in:\n{text[-3000:]}"
    if code == 1:
        assert result.err.startswith("error:") or "\nerror:" in result.err, result.err
        assert "\nhint: " in result.err, result.err
    if hint is not None:
        assert hint in text, f"hint {hint!r} missing from:\n{text[-3000:]}"
    return "\n".join(lines)


def state_snapshot(tree: Path) -> tuple[dict[str, bytes], bool]:
    return tree_snapshot(tree), paths.manifest_path(tree).exists()


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps(GOOD_FACTS))
    return path


@pytest.fixture
def tree(tmp_path: Path, lowvram_home: Path) -> Path:
    (lowvram_home / "profiles").mkdir(exist_ok=True)
    (lowvram_home / "profiles" / "plain.yaml").write_text(PLAIN_PROFILE)
    return make_webui(tmp_path / "sd")


# ---------------------------------------------------------------------------------------------
# 1. The checkpoint's safetensors header (optional: the family is unknown, --model answers it)


def _tensors(keys: list[str]) -> dict[str, Any]:
    return {k: {"dtype": "F16", "shape": [2], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)}


SDXL = _tensors(FAMILY_KEYS["sdxl"])
DATA = b"\0" * (4 * len(FAMILY_KEYS["sdxl"]))


def st_file(header: bytes, data: bytes = DATA, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def st_json(obj: Any, data: bytes = DATA) -> bytes:
    return st_file(json.dumps(obj).encode(), data)


def _with(**changes: Any) -> dict[str, Any]:
    header = json.loads(json.dumps(SDXL))
    first = next(iter(header))
    for key, value in changes.items():
        if key == "metadata":
            header["__metadata__"] = value
        else:
            header[first][key] = value
    return header


GOOD_HEADER = json.dumps(SDXL).encode()

SAFETENSORS: dict[str, Callable[[], bytes]] = {
    "nested-200k-arrays": lambda: st_file(b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    "nested-200k-objects": lambda: st_file(b'{"a": ' * DEEP + b"1" + b"}" * DEEP),
    "nested-200k-unclosed": lambda: st_file(b"[" * DEEP),
    "int-5000-digits-offset": lambda: st_file(GOOD_HEADER.replace(b"[0, 4]", b"[0, " + BIG.encode() + b"]")),
    "int-5000-digits-metadata": lambda: st_file(b'{"__metadata__": {"n": ' + BIG.encode() + b"}}"),
    "length-past-eof": lambda: st_file(GOOD_HEADER, b"", length=len(GOOD_HEADER) + 4096),
    "length-1GB-tiny-file": lambda: st_file(b"{}", b"", length=1 << 30),
    "length-2^63": lambda: st_file(GOOD_HEADER, length=1 << 63),
    "length-2^64-1": lambda: st_file(GOOD_HEADER, length=(1 << 64) - 1),
    "length-zero": lambda: st_file(GOOD_HEADER, length=0),
    "length-8-short": lambda: st_file(GOOD_HEADER, length=len(GOOD_HEADER) - 8),
    "length-counts-prefix": lambda: st_file(GOOD_HEADER, b"", length=len(GOOD_HEADER) + 8),
    "empty-file": lambda: b"",
    "five-bytes": lambda: b"\x05\0\0\0\0",
    "not-json": lambda: st_file(b"{not json at all}"),
    "not-utf8": lambda: st_file(b'{"\xff\xfe": 1}'),
    "bom": lambda: st_file(b"\xef\xbb\xbf" + GOOD_HEADER),
    "json-array": lambda: st_file(b"[1, 2, 3]"),
    "json-string": lambda: st_file(b'"conditioner.embedders.1.model.ln_final.weight"'),
    "json-null": lambda: st_file(b"null"),
    "trailing-garbage-in-header": lambda: st_file(GOOD_HEADER + b"}}garbage"),
    "nan-literal": lambda: st_file(GOOD_HEADER.replace(b"[2]", b"[NaN]", 1)),
    "control-char": lambda: st_file(GOOD_HEADER.replace(b"F16", b"F\x0116", 1)),
    "lone-surrogate-key": lambda: st_file(GOOD_HEADER.replace(b'"model.diffusion', b'"\\ud800model.diffusion')),
    "metadata-a-list": lambda: st_json(_with(metadata=["format", "pt"])),
    "metadata-an-int": lambda: st_json(_with(metadata=7)),
    "metadata-nested-values": lambda: st_json(_with(metadata={"format": {"deep": [1]}})),
    "tensor-a-string": lambda: st_json({**SDXL, next(iter(SDXL)): "F16"}),
    "dtype-a-number": lambda: st_json(_with(dtype=16)),
    "shape-a-string": lambda: st_json(_with(shape="2")),
    "shape-negative": lambda: st_json(_with(shape=[-2])),
    "shape-float": lambda: st_json(_with(shape=[2.0])),
    "offsets-negative": lambda: st_json(_with(data_offsets=[-4, 0])),
    "offsets-reversed": lambda: st_json(_with(data_offsets=[4, 0])),
    "offsets-three": lambda: st_json(_with(data_offsets=[0, 4, 8])),
    "offsets-bools": lambda: st_json(_with(data_offsets=[False, True])),
    "size-disagrees-with-shape": lambda: st_json(_with(shape=[1000, 1000])),
    "download-cut-short": lambda: st_json(SDXL, DATA[:-3]),
    "trailing-bytes-after-data": lambda: st_json(SDXL, DATA + b"junk"),
}


def _damage_checkpoint(tree: Path, data: bytes) -> Path:
    ckpt = tree / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors"
    ckpt.write_bytes(data)
    return ckpt


@pytest.mark.parametrize("member", sorted(SAFETENSORS))
def test_damaged_checkpoint_header(cli: Any, tree: Path, facts_file: Path, member: str) -> None:
    ckpt = _damage_checkpoint(tree, SAFETENSORS[member]())
    base = ("--webui", str(tree), "--facts", str(facts_file))
    # doctor: a warning naming the file, the family unknown, --model suggested.
    line = clean(cli("doctor", *base), code=0, path=ckpt, hint="--model")
    assert line.lstrip().startswith("warn"), line
    # plan/launch --dry-run/estimate with --model go on, with the warning.
    clean(cli("plan", *base, "--model", "sdxl"), code=0, path=ckpt)
    clean(cli("launch", "--dry-run", *base, "--model", "sdxl"), code=0, path=ckpt)
    clean(cli("estimate", *base, "--model", "sdxl"), code=0, path=ckpt)
    # Without --model nothing says the family: stop as for any unknown checkpoint, naming the file.
    clean(cli("plan", *base), code=1, path=ckpt, hint="--model")
    clean(cli("estimate", *base), code=1, path=ckpt, hint="--model")
    before = state_snapshot(tree)
    clean(cli("apply", *base), code=1, path=ckpt, hint="--model")
    assert state_snapshot(tree) == before


@pytest.mark.parametrize("member", ["nested-200k-arrays", "int-5000-digits-offset", "download-cut-short"])
def test_damaged_checkpoint_apply_with_model_goes_on(cli: Any, tree: Path, facts_file: Path, member: str) -> None:
    ckpt = _damage_checkpoint(tree, SAFETENSORS[member]())
    result = cli("apply", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl", "-p", "plain")
    clean(result, code=0, path=ckpt)
    assert paths.manifest_path(tree).exists()


def test_damaged_checkpoint_in_a_real_process(tree: Path, facts_file: Path) -> None:
    """The deepest member through `python -m lowvram` with a timeout: no hang, no traceback."""
    ckpt = _damage_checkpoint(tree, SAFETENSORS["nested-200k-objects"]())
    proc = run_lowvram("doctor", "--webui", str(tree), "--facts", str(facts_file), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and str(ckpt) in proc.stdout


def test_good_checkpoint_variants_are_still_read(cli: Any, tree: Path, facts_file: Path) -> None:
    """Valid files the validator must not refuse: metadata, header padding, zero-size tensors."""
    header = {**SDXL, "__metadata__": {"format": "pt"}, "empty": {"dtype": "F32", "shape": [0, 3],
                                                                  "data_offsets": [len(DATA), len(DATA)]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    _damage_checkpoint(tree, st_file(raw))
    data = json.loads(cli("doctor", "--webui", str(tree), "--facts", str(facts_file), "--json").out)
    assert data["webui"]["model_family"] == "sdxl"


# ---------------------------------------------------------------------------------------------
# 2. --facts files (the user hands them in: damage stops the command before anything is written)


def _facts_with(path: tuple[Any, ...], value: Any) -> bytes:
    doc = json.loads(json.dumps(GOOD_FACTS))
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return json.dumps(doc).encode()


def _facts_raw(path: tuple[Any, ...], raw: str) -> bytes:
    marker = "\"__RAW__\""
    return _facts_with(path, "__RAW__").replace(marker.encode(), raw.encode())


GOOD_FACTS_BYTES = json.dumps(GOOD_FACTS).encode()

FACTS: dict[str, Callable[[], bytes]] = {
    "nested-200k-arrays": lambda: b"[" * DEEP + b"]" * DEEP,
    "nested-200k-objects": lambda: b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "nested-200k-unclosed": lambda: b"[" * DEEP,
    "int-5000-digits": lambda: _facts_raw(("system", "ram_mb"), BIG),
    "int-5000-digits-top": BIG.encode,
    "int-400-digits": lambda: _facts_raw(("gpus", 0, "vram_total_mb"), "9" * 400),
    "float-1e308-vram": lambda: _facts_raw(("gpus", 0, "vram_total_mb"), "1e308"),
    "int-2^62-vram": lambda: _facts_raw(("gpus", 0, "vram_total_mb"), str(1 << 62)),
    "nan-literal": lambda: _facts_raw(("gpus", 0, "vram_total_mb"), "NaN"),
    "infinity-literal": lambda: _facts_raw(("system", "ram_mb"), "-Infinity"),
    "negative": lambda: _facts_with(("gpus", 0, "vram_free_mb"), -1),
    "driver-5000-digits": lambda: _facts_with(("gpus", 0, "driver"), BIG),
    "cuda-5000-digits": lambda: _facts_with(("gpus", 0, "cuda_driver"), "12." + BIG),
    "cc-5000-digits": lambda: _facts_with(("gpus", 0, "compute_capability"), BIG + ".1"),
    "glibc-5000-digits": lambda: _facts_with(("system", "glibc"), "2." + BIG),
    "truncated": lambda: GOOD_FACTS_BYTES[: len(GOOD_FACTS_BYTES) // 2],
    "trailing-garbage": lambda: GOOD_FACTS_BYTES + b"\nerror: something else\n",
    "two-documents": lambda: GOOD_FACTS_BYTES + GOOD_FACTS_BYTES,
    "duplicate-key": lambda: GOOD_FACTS_BYTES[:-1] + b', "gpus": []}',
    "json-array": lambda: b"[]",
    "json-null": lambda: b"null",
    "json-string": lambda: b'"facts"',
    "empty": lambda: b"",
    "whitespace": lambda: b" \n\t\n",
    "nul-bytes": lambda: b"\0" * 64,
    "not-utf8": lambda: GOOD_FACTS_BYTES.replace(b"GTX 1070", b"GTX \xe9 1070"),
    "utf16-no-bom": lambda: GOOD_FACTS_BYTES.decode().encode("utf-16-le"),
    "lone-surrogate": lambda: _facts_raw(("gpus", 0, "name"), '"NVIDIA \\ud800 GTX"'),
    "control-char-raw": lambda: GOOD_FACTS_BYTES.replace(b"GTX 1070", b"GTX\x1b[2J1070"),
    "gpus-an-object": lambda: _facts_with(("gpus",), {"0": GOOD_FACTS["gpus"][0]}),
    "gpu-a-string": lambda: _facts_with(("gpus", 0), "GTX 1070"),
    "system-a-list": lambda: _facts_with(("system",), ["linux"]),
    "os-unknown": lambda: _facts_with(("system", "os"), "plan9"),
    "webui-a-string": lambda: _facts_with(("webui",), "/sd"),
    "user-args-a-string": lambda: _facts_with(("webui",), {"path": "/sd", "flavor": "a1111", "user_args": "--api"}),
    "error-report": lambda: b'{"schema": 1, "error": {"message": "boom", "hint": "x"}}',
}


@pytest.mark.parametrize("member", sorted(FACTS))
def test_damaged_facts_file(cli: Any, tree: Path, tmp_path: Path, member: str) -> None:
    bad = tmp_path / "bad-facts.json"
    bad.write_bytes(FACTS[member]())
    base = ("--facts", str(bad))
    web = ("--webui", str(tree))
    clean(cli("doctor", *base), code=1, path=bad)
    clean(cli("plan", *base, *web, "--model", "sdxl"), code=1, path=bad)
    clean(cli("launch", "--dry-run", *base, *web), code=1, path=bad)
    clean(cli("estimate", *base, "--model", "sdxl"), code=1, path=bad)
    before = state_snapshot(tree)
    clean(cli("apply", *base, *web, "-p", "plain"), code=1, path=bad)
    assert state_snapshot(tree) == before


# Odd values of the right type and size: read, and every command runs on them without a traceback.
FACTS_READABLE: dict[str, Callable[[], bytes]] = {
    "cc-huge-parts": lambda: _facts_with(("gpus", 0, "compute_capability"), "99999999999.99999999999"),
    "cc-words": lambda: _facts_with(("gpus", 0, "compute_capability"), "six point one"),
    "driver-words": lambda: _facts_with(("gpus", 0, "driver"), "R550 beta"),
    "driver-4000-digits": lambda: _facts_with(("gpus", 0, "driver"), "9" * 4000),
    "cuda-4000-digits": lambda: _facts_with(("gpus", 0, "cuda_driver"), "12." + "9" * 4000),
    "glibc-4000-digits": lambda: _facts_with(("system", "glibc"), "2." + "9" * 4000),
    "name-empty": lambda: _facts_with(("gpus", 0, "name"), ""),
    "name-4000-chars": lambda: _facts_with(("gpus", 0, "name"), "NVIDIA " + "X" * 3990),
    "name-escapes": lambda: _facts_with(("gpus", 0, "name"), "NVIDIA\u001b[2J\n\r\u0000 GTX"),
    "vram-2^40": lambda: _facts_with(("gpus", 0, "vram_total_mb"), 1 << 40),
    "vram-zero": lambda: _facts_with(("gpus", 0, "vram_total_mb"), 0),
    "free-over-total": lambda: _facts_with(("gpus", 0, "vram_free_mb"), 1 << 40),
    "ram-zero": lambda: _facts_with(("system", "ram_mb"), 0),
    "index-2^40": lambda: _facts_with(("gpus", 0, "index"), 1 << 40),
    "pcie-2^40": lambda: _facts_with(("gpus", 0, "pcie_width"), 1 << 40),
    "float-numbers": lambda: _facts_with(("gpus", 0, "vram_total_mb"), 8191.9),
    "driver-a-number": lambda: _facts_with(("gpus", 0, "driver"), 550.54),
    "visible-devices-odd": lambda: _facts_with(("cuda",), {"visible_devices": "GPU-\u0000,-1,,99999999999999999999"}),
    "no-gpus": lambda: _facts_with(("gpus",), []),
    "eight-gpus": lambda: _facts_with(("gpus",), [dict(GOOD_FACTS["gpus"][0], index=i) for i in range(8)]),
    "webui-elsewhere": lambda: _facts_with(("webui",), {"path": "/nonexistent/sd", "flavor": "forge",
                                                         "user_args": ["--device-id", "9" * 4000]}),
}


@pytest.mark.parametrize("member", sorted(FACTS_READABLE))
def test_odd_facts_values_never_crash(cli: Any, tree: Path, tmp_path: Path, member: str) -> None:
    odd = tmp_path / "odd-facts.json"
    odd.write_bytes(FACTS_READABLE[member]().replace(b"\\\\", b"\\"))
    base = ("--facts", str(odd))
    web = ("--webui", str(tree))
    for args in (("doctor", *base), ("doctor", *base, *web, "--json"), ("plan", *base, *web, "--model", "sdxl"),
                 ("launch", "--dry-run", *base, *web), ("estimate", *base, "--model", "sdxl"),
                 ("estimate", *base, "--model", "sd15", "--sweep"), ("apply", "--dry-run", *base, *web, "-p", "plain")):
        result = cli(*args)
        text = result.out + result.err
        assert "Traceback" not in text and "unexpected error" not in text, (args, text[-3000:])
        assert result.code in (0, 1), (args, text[-3000:])
        if result.code == 1:
            assert "\nhint: " in result.err or "failed" in result.out or '"fail"' in result.out, (args, text[-3000:])


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_facts_saved_by_windows_powershell_are_read(cli: Any, tmp_path: Path, encoding: str) -> None:
    """`lowvram doctor --json > facts.json` in Windows PowerShell 5.1 writes UTF-16 with a BOM
    (`Out-File -Encoding utf8` UTF-8 with one): lowvram's own JSON, read as it was meant."""
    path = tmp_path / "facts.json"
    path.write_bytes(json.dumps(GOOD_FACTS).encode(encoding))
    result = cli("doctor", "--facts", str(path), "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["gpus"][0]["name"] == "NVIDIA GeForce GTX 1070"


def test_damaged_facts_in_a_real_process(tree: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-facts.json"
    bad.write_bytes(FACTS["int-5000-digits"]())
    before = state_snapshot(tree)
    proc = run_lowvram("apply", "--facts", str(bad), "--webui", str(tree), timeout=60)
    assert proc.returncode == 1 and str(bad) in proc.stderr and "hint:" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and state_snapshot(tree) == before


# ---------------------------------------------------------------------------------------------
# 3. A1111's config.json (optional: A1111 itself moves a file it cannot read to tmp/config.json
#    and starts with default settings, so lowvram plans for the defaults and says so)


CONFIG: dict[str, tuple[bytes, str]] = {
    # member: (bytes, expected: "warn" = damaged, the defaults are planned; "ok" = read as A1111 reads it)
    "not-json": (b'{"sd_model_checkpoint": "x",,}', "warn"),
    "truncated": (b'{"sd_model_checkpoint": "sd_xl_base_1.0.safe', "warn"),
    "trailing-garbage": (b'{"sd_model_checkpoint": "x"} {"y": 1}', "warn"),
    "empty": (b"", "warn"),
    "nested-200k": (b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}", "warn"),
    "nested-200k-objects": (b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "warn"),
    "int-5000-digits": (b'{"batch_cond_uncond": ' + BIG.encode() + b"}", "warn"),
    "bom": (b"\xef\xbb\xbf" + json.dumps({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}).encode(), "warn"),
    "utf16": (json.dumps({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}).encode("utf-16"), "warn"),
    "latin1": ('{"sd_model_checkpoint": "caf\u00e9.safetensors"}'.encode("latin-1"), "warn"),
    "control-char-raw": (b'{"sd_model_checkpoint": "a\x01b"}', "warn"),
    "nul-bytes": (b"\0" * 32, "warn"),
    "json-array": (b"[1, 2]", "warn"),
    "json-null": (b"null", "warn"),
    "json-string": (b'"sd_xl_base_1.0.safetensors"', "warn"),
    "json-number": (b"42", "warn"),
    # Valid JSON A1111 loads: odd values are its problem at start-up, never lowvram's traceback.
    "nan-infinity": (b'{"batch_cond_uncond": NaN, "sd_model_checkpoint": Infinity}', "ok"),
    "duplicate-keys": (b'{"sd_model_checkpoint": 1, "sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}', "ok"),
    "checkpoint-an-int": (b'{"sd_model_checkpoint": 7}', "ok"),
    "checkpoint-a-list": (b'{"sd_model_checkpoint": ["a.safetensors"]}', "ok"),
    "checkpoint-an-object": (b'{"sd_model_checkpoint": {"name": "a"}}', "ok"),
    "checkpoint-null": (b'{"sd_model_checkpoint": null}', "ok"),
    "checkpoint-empty": (b'{"sd_model_checkpoint": ""}', "ok"),
    "checkpoint-100k-chars": (json.dumps({"sd_model_checkpoint": "a" * 100_000}).encode(), "ok"),
    "checkpoint-long-component": (json.dumps({"sd_model_checkpoint": "b" * 300 + ".safetensors"}).encode(), "ok"),
    "checkpoint-nul": (b'{"sd_model_checkpoint": "a\\u0000b.safetensors"}', "ok"),
    "checkpoint-lone-surrogate": (b'{"sd_model_checkpoint": "\\ud800.safetensors"}', "ok"),
    "checkpoint-5000-digits-title": (json.dumps({"sd_model_checkpoint": BIG}).encode(), "ok"),
    "extensions-wrong-types": (b'{"disabled_extensions": {"a": 1}, "batch_cond_uncond": "yes"}', "ok"),
}


@pytest.mark.parametrize("member", sorted(CONFIG))
def test_damaged_config_json(cli: Any, tree: Path, facts_file: Path, member: str) -> None:
    data, expected = CONFIG[member]
    config = tree / "config.json"
    config.write_bytes(data)
    base = ("--webui", str(tree), "--facts", str(facts_file))
    results = [cli("doctor", *base), cli("plan", *base, "--model", "sdxl"),
               cli("launch", "--dry-run", *base, "--model", "sdxl"), cli("estimate", *base, "--model", "sdxl"),
               cli("apply", *base, "-p", "plain")]
    for result in results:
        text = result.out + result.err
        assert "Traceback" not in text and "unexpected error" not in text, text[-3000:]
        assert result.code == 0, text[-3000:]
        if expected == "warn":
            clean(result, code=0, path=config, hint="move it away")
    assert config.read_bytes() == data  # the user's file, never rewritten


TITLES = {
    "lone-surrogate": "\\ud800.safetensors [31e35c80fc]",
    "nul": "a\\u0000b.safetensors",
    "100k-chars": "a" * 100_000,
    "long-component": "b" * 300 + ".safetensors",
    "escapes": "\\u001b[2J\\r\\n.safetensors",
    "parent-dirs": "../../../../../../etc/passwd",
}


@pytest.mark.parametrize("member", sorted(TITLES))
def test_selected_checkpoint_title_with_no_checkpoint_on_disk(cli: Any, tree: Path, facts_file: Path,
                                                              member: str) -> None:
    """With no checkpoint to fall back on, the title itself reaches the output: never a traceback."""
    tree = make_webui(tree.parent / "bare", family=None)
    (tree / "config.json").write_text('{"sd_model_checkpoint": "' + TITLES[member] + '"}')
    base = ("--webui", str(tree), "--facts", str(facts_file))
    for args in (("doctor", *base), ("plan", *base, "--model", "sdxl"), ("apply", "--dry-run", *base, "--model", "sdxl"),
                 ("estimate", *base, "--model", "sdxl"), ("launch", "--dry-run", *base, "--model", "sdxl")):
        result = cli(*args)
        text = result.out + result.err
        assert "Traceback" not in text and "unexpected error" not in text and result.code == 0, (args, text[-2000:])
    proc = run_lowvram("doctor", *base, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_config_json_that_is_not_an_object_is_named_as_fatal_to_the_ui(cli: Any, tree: Path,
                                                                         facts_file: Path) -> None:
    (tree / "config.json").write_bytes(b"[1, 2]")
    line = clean(cli("doctor", "--webui", str(tree), "--facts", str(facts_file)), code=0, path=tree / "config.json")
    assert "not start" in line


# ---------------------------------------------------------------------------------------------
# 4. Profiles (the user's own YAML: damage stops the command, naming the file)


PROFILES: dict[str, bytes] = {
    "nested-deep-flow": b"description: x\nargs: " + b"[" * 50_000 + b"]" * 50_000 + b"\n",
    "nested-deep-block": ("description: x\nalloc_conf:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 2000))
                          + " " * 2000 + "v: 1\n").encode(),
    "int-5000-digits": b"description: x\ntarget: {width: " + BIG.encode() + b"}\n",
    "int-5000-digits-key": b"description: x\n" + BIG.encode() + b": 1\n",
    "float-overflow": b"description: x\ntarget: {hires_scale: 1e999}\n",
    "nan": b"description: x\ntarget: {hires_scale: .nan}\n",
    "alias-bomb": b"a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b]\n",
    "merge-key": b"description: x\n<<: {offload: none}\n",
    "duplicate-key": b"description: x\noffload: none\noffload: lowvram\n",
    "two-documents": b"description: x\n---\ndescription: y\n",
    "truncated-flow": b"description: x\nmatch: {gpu: [GTX 1070, ",
    "tab-indent": b"description: x\nmatch:\n\tgpu: [GTX 1070]\n",
    "trailing-garbage": b"description: x\noffload: none\n]]]\n",
    "not-a-mapping": b"- description: x\n",
    "scalar": b"just words\n",
    "empty": b"",
    "comment-only": b"# nothing here\n",
    "not-utf8": "description: caf\u00e9\n".encode("latin-1"),
    "utf16": "description: x\n".encode("utf-16"),
    "nul": b"description: a\0b\n",
    "control-char": b"description: a\x1b[2Jb\n",
    "lone-surrogate": b'description: "\\ud800"\n',
    "python-tag": b"description: !!python/object/apply:os.system ['true']\n",
    "wrong-type": b"description: x\noffload: 5\n",
    "unknown-key": b"description: x\nofload: none\n",
    "args-a-string": b"description: x\nargs: --medvram\n",
    "extends-missing": b"description: x\nextends: no-such-profile\n",
    "extends-itself": b"description: x\nextends: broken\n",
    "extends-a-list": b"description: x\nextends: [8gb-sdxl]\n",
    "vram-range-infinite": b"description: x\nmatch: {vram_mb: [0, 1e400]}\n",
    "cc-huge": b'description: x\nmatch: {compute_capability: ["9999999999999999999999.1", "6.1"]}\n',
    "alloc-conf-huge": b"description: x\nalloc_conf: {max_split_size_mb: 99999999999999999999999}\n",
    "alloc-conf-400-digits": b"description: x\nalloc_conf: {max_split_size_mb: " + b"9" * 400 + b"}\n",
    "alloc-conf-nan": b"description: x\nalloc_conf: {garbage_collection_threshold: .nan}\n",
    "args-nul-escape": b'description: x\nargs: ["--ckpt", "a\\0b"]\n',
    "width-infinite": b"description: x\ntarget: {width: .inf}\n",
    "hires-400-digits": b"description: x\ntarget: {hires_scale: " + b"9" * 400 + b"}\n",
    "cc-5000-digit-string": b'description: x\nmatch: {compute_capability: "' + BIG.encode() + b'.1"}\n',
    "vram-400-digits": b"description: x\nmatch: {vram_mb: [0, " + b"9" * 400 + b"]}\n",
    "bom-then-garbage": b"\xef\xbb\xbf{{{\n",
}


def _write_profile(home: Path, data: bytes, name: str = "broken") -> Path:
    path = home / "profiles" / f"{name}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("member", sorted(PROFILES))
def test_damaged_profile(cli: Any, tree: Path, facts_file: Path, lowvram_home: Path, member: str) -> None:
    prof = _write_profile(lowvram_home, PROFILES[member])
    base = ("--webui", str(tree), "--facts", str(facts_file))
    clean(cli("profiles", "show", "broken"), code=1, path=prof)
    clean(cli("plan", *base, "-p", "broken"), code=1, path=prof)
    clean(cli("launch", "--dry-run", *base, "-p", "broken"), code=1, path=prof)
    clean(cli("estimate", "-p", "broken", "--model", "sdxl", "--vram-mb", "8192"), code=1, path=prof)
    # auto-selection reads every profile: a damaged one of the user's stops only what uses it; it is
    # left out and named once, as a warning, never skipped silently.
    named = clean(cli("plan", *base), code=0, path=prof)
    assert len(named.splitlines()) == 1 and "warning: profile broken is skipped: " in named
    before = state_snapshot(tree)
    clean(cli("apply", *base, "-p", "broken"), code=1, path=prof)
    assert state_snapshot(tree) == before
    clean(cli("apply", "--dry-run", *base), code=0, path=prof)
    assert state_snapshot(tree) == before


def test_damaged_parent_profile_is_named(cli: Any, tree: Path, facts_file: Path, lowvram_home: Path) -> None:
    parent = _write_profile(lowvram_home, PROFILES["int-5000-digits"], "parent")
    _write_profile(lowvram_home, b"description: child\nextends: parent\n", "child")
    clean(cli("plan", "--webui", str(tree), "--facts", str(facts_file), "-p", "child"), code=1, path=parent)


# ---------------------------------------------------------------------------------------------
# 5. observations.jsonl (lowvram's own log: a bad line is skipped with a warning, the rest kept)


GOOD_OBS = b'{"schema": 1, "time": 1.0, "source": "manual", "free_mb": 600, "overflow_mb": 900}'

OBSERVATIONS: dict[str, bytes] = {
    "nested-200k": b"[" * DEEP + b"]" * DEEP,
    "nested-200k-objects": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
    "int-5000-digits": b'{"time": 1, "source": "manual", "free_mb": ' + BIG.encode() + b"}",
    "int-400-digits": b'{"time": 1, "source": "manual", "free_mb": ' + b"9" * 400 + b"}",
    "float-1e308": b'{"time": 1, "source": "manual", "free_mb": 1e308}',
    "nan": b'{"time": NaN, "source": "manual"}',
    "infinity": b'{"time": 1, "source": "manual", "sit": Infinity}',
    "truncated": GOOD_OBS[:30],
    "trailing-garbage": GOOD_OBS + b"xyz",
    "not-utf8": b'{"time": 1, "source": "manual", "reason": "\xff"}',
    "nul-bytes": b"\0" * 40,
    "lone-surrogate": b'{"time": 1, "source": "manual", "reason": "\\ud800", "checkpoint": "\\udfff"}',
    "json-array": b"[1, 2]",
    "wrong-types": b'{"time": "yesterday", "source": 5}',
    "negative": b'{"time": 1, "source": "manual", "free_mb": -5}',
}


@pytest.mark.parametrize("member", sorted(OBSERVATIONS))
def test_damaged_observation_line(cli: Any, tree: Path, facts_file: Path, member: str) -> None:
    obs = paths.observations_path(tree.resolve())
    obs.parent.mkdir(parents=True, exist_ok=True)
    obs.write_bytes(GOOD_OBS + b"\n" + OBSERVATIONS[member] + b"\n" + GOOD_OBS + b"\n")
    base = ("--webui", str(tree), "--facts", str(facts_file))
    line = clean(cli("plan", *base), code=0, path=obs, hint="other lines are used")
    assert "line 2" in line and "skipped" in line
    clean(cli("estimate", *base), code=0, path=obs)
    for args in (("doctor", *base), ("launch", "--dry-run", *base), ("reserve", *base)):
        result = cli(*args)
        text = result.out + result.err
        assert "Traceback" not in text and "unexpected error" not in text and result.code == 0, text[-3000:]


def test_many_damaged_observation_lines_are_one_summary(cli: Any, tree: Path, facts_file: Path) -> None:
    obs = paths.observations_path(tree.resolve())
    obs.parent.mkdir(parents=True, exist_ok=True)
    obs.write_bytes(GOOD_OBS + b"\n" + b"{broken\n" * 5000)
    result = cli("plan", "--webui", str(tree), "--facts", str(facts_file))
    clean(result, code=0, path=obs)
    assert result.err.count(str(obs)) <= 6, result.err[-3000:]


# ---------------------------------------------------------------------------------------------
# 6. VRAM Estimator's stats.json (optional: what parses is used, the rest named in a note)


GOOD_STATS = {"txt2img": [{"width": 512, "height": 512, "batch_size": 1, "reserved_peak": 3000.0}] * 3,
              "txt2img_hr": [], "img2img": []}
GOOD_STATS_BYTES = json.dumps(GOOD_STATS).encode()

STATS: dict[str, bytes] = {
    "nested-200k": b'{"txt2img": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "nested-200k-objects": b'{"txt2img": [' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"]}",
    "int-5000-digits": GOOD_STATS_BYTES.replace(b"3000.0", BIG.encode(), 1),
    "float-1e999": GOOD_STATS_BYTES.replace(b"3000.0", b"1e999", 1),
    "nan": GOOD_STATS_BYTES.replace(b"3000.0", b"NaN", 1),
    "truncated": GOOD_STATS_BYTES[: len(GOOD_STATS_BYTES) // 2],
    "trailing-garbage": GOOD_STATS_BYTES + b"]]",
    "bom": b"\xef\xbb\xbf" + GOOD_STATS_BYTES.replace(b"3000.0", b'"x"', 1),
    "utf16": GOOD_STATS_BYTES.replace(b"3000.0", b'"x"', 1).decode().encode("utf-16"),
    "not-utf8": GOOD_STATS_BYTES.replace(b'"txt2img_hr"', b'"txt2img_hr\xff"'),
    "lone-surrogate": GOOD_STATS_BYTES.replace(b'"txt2img_hr"', b'"\\ud800"'),
    "json-array": b"[]",
    "json-null": b"null",
    "wrong-types": b'{"txt2img": {"width": 512}, "img2img": "x", "txt2img_hr": [1, "a", null]}',
    "empty": b"",
}


@pytest.mark.parametrize("member", sorted(STATS))
def test_damaged_stats_json(cli: Any, tree: Path, facts_file: Path, member: str) -> None:
    ext = tree / "extensions" / "a1111-stable-diffusion-webui-vram-estimator"
    ext.mkdir(parents=True)
    stats = ext / "stats.json"
    stats.write_bytes(STATS[member])
    result = cli("estimate", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl")
    clean(result, code=0, path=stats, hint="benchmark")
    json_result = cli("estimate", "--webui", str(tree), "--facts", str(facts_file), "--model", "sdxl", "--json")
    assert json_result.code == 0 and any(str(stats) in n for n in json.loads(json_result.out)["notes"])
    assert stats.read_bytes() == STATS[member]
