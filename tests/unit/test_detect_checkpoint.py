"""Safetensors header reading: families from A1111's keys, and damaged files as one clear error."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from lowvram.core.errors import WebuiError
from lowvram.world.detect.checkpoint import checkpoint_family, read_safetensors_header
from tests.fixtures.safetensors import FAMILY_KEYS, write_checkpoint, write_safetensors


@pytest.mark.parametrize("family", sorted(FAMILY_KEYS))
def test_family_from_header(tmp_path: Path, family: str) -> None:
    path = write_checkpoint(tmp_path / f"{family}.safetensors", family)
    assert checkpoint_family(path) == family


def test_metadata_is_not_a_tensor(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "m.safetensors", FAMILY_KEYS["sd15"], metadata={"format": "pt"})
    assert "__metadata__" in read_safetensors_header(path)
    assert checkpoint_family(path) == "sd15"


def test_ckpt_is_never_opened(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    path.write_bytes(b"\x80\x04 pickle that must never be loaded")
    assert checkpoint_family(path) == "unknown"


def test_truncated_header(tmp_path: Path) -> None:
    good = write_checkpoint(tmp_path / "good.safetensors", "sdxl").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:40])
    with pytest.raises(WebuiError) as err:
        checkpoint_family(cut)
    assert "truncated" in err.value.message and "cut.safetensors" in err.value.message
    assert "\n" not in err.value.message and err.value.hint


def test_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(WebuiError, match="truncated"):
        checkpoint_family(path)


def test_absurd_header_length_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}")
    with pytest.raises(WebuiError, match="not a safetensors file"):
        checkpoint_family(path)


def test_corrupt_json_header(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    raw = b"{not json"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(WebuiError, match="is damaged: its safetensors header is not valid JSON"):
        checkpoint_family(path)
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    with pytest.raises(WebuiError, match="header is an array, not an object of tensors"):
        checkpoint_family(path)
