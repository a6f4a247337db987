"""Observations: round-trip, corrupt lines skipped with their line numbers, concurrent appends."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.core.errors import ObservationError
from lowvram.core.observations import (
    Observation,
    observation_from_dict,
    observation_to_dict,
    parse_observations,
)
from lowvram.world.observation_log import append_observation, load_observations
from tests.fixtures.a1111_modules import hook_path

REPO = Path(__file__).resolve().parents[2]

FULL = Observation(time=1700000000.5, source="hook", checkpoint="a.safetensors|10|5", family="sdxl",
                   flags=("--xformers",), road="resident", offload="none", layout=True, reserve_mb=1600, free_mb=600,
                   overflow_mb=1000, peak_allocated_mb=6000, peak_reserved_mb=7400, vram_total_mb=8192, sit=2.5,
                   width=1024, height=1024, batch=1, steps=20, ooms=0, ok=True, reason="", driver="546.01",
                   overflow_source="pdh", layout_s=1.25, tag="tune-1", pid=42)


def test_round_trip_keeps_every_field() -> None:
    data = observation_to_dict(FULL)
    assert next(iter(data)) == "schema" and data["schema"] == 1
    assert observation_from_dict(json.loads(json.dumps(data))) == FULL


def test_unknown_keys_are_ignored_and_missing_ones_default() -> None:
    obs = observation_from_dict({"time": 1, "source": "manual", "free_mb": 600, "from_the_future": {"x": 1}})
    assert obs == Observation(time=1.0, source="manual", free_mb=600)


@pytest.mark.parametrize(("data", "message"), [
    ({"source": "hook"}, "`time` is missing"),
    ({"time": "yesterday"}, "`time` should be a number"),
    ({"time": 1, "source": "guess"}, "`source`"),
    ({"time": 1, "free_mb": -5}, "`free_mb` should be ≥ 0"),
    ({"time": 1, "free_mb": True}, "`free_mb` should be a number"),
    ({"time": 1, "flags": "--xformers"}, "`flags`"),
    ({"time": 1, "layout": "yes"}, "`layout`"),
    ({"time": 1, "road": "highway"}, "`road`"),
    ([1, 2], "not a JSON object"),
])
def test_wrong_types_are_named(data, message) -> None:
    with pytest.raises(ValueError, match=message):
        observation_from_dict(data)


def test_corrupt_lines_are_skipped_with_their_line_numbers(tmp_path) -> None:
    path = tmp_path / "observations.jsonl"
    good = json.dumps(observation_to_dict(FULL)).encode()
    path.write_bytes(b"\n".join([
        good,
        b'{"time": 1, "source": "hook", "free_mb": ',  # cut short
        b'{"time": 2, "free_mb": "lots"}',
        b"\xff\xfe not utf-8",
        b"",
        good,
        b'{"time": 3, "source": "manual", "free_mb": 600, "overflow_mb": 1000}',  # no final newline
    ]))
    loaded = load_observations(path)
    assert len(loaded.items) == 3
    assert loaded.items[2].free_mb == 600
    assert len(loaded.warnings) == 3
    assert "line 2" in loaded.warnings[0] and "not valid JSON" in loaded.warnings[0]
    assert "line 3" in loaded.warnings[1] and "free_mb" in loaded.warnings[1]
    assert "line 4" in loaded.warnings[2] and "UTF-8" in loaded.warnings[2]


def test_parsing_is_pure_and_names_the_file_it_is_given() -> None:
    good = json.dumps(observation_to_dict(FULL)).encode()
    loaded = parse_observations(good + b"\n{broken\n" + good, "obs.jsonl")
    assert loaded.items == (FULL, FULL)
    assert loaded.warnings == ("obs.jsonl line 2: not valid JSON (a write cut short?); skipped, the other lines are used",)
    cut = parse_observations(b'"source": "hook"}\n' + good + b"\n{broken", "obs.jsonl", cut=True)
    assert cut.items == (FULL,)  # the cut first piece is dropped silently
    assert cut.warnings == ("obs.jsonl (a recent line): not valid JSON (a write cut short?); skipped, the other "
                            "lines are used",)


def test_a_missing_file_is_no_observations(tmp_path) -> None:
    assert load_observations(tmp_path / "none.jsonl") == load_observations(tmp_path / "none.jsonl")
    assert load_observations(tmp_path / "none.jsonl").items == ()


def test_a_directory_in_its_place_is_a_warning(tmp_path) -> None:
    (tmp_path / "obs.jsonl").mkdir()
    loaded = load_observations(tmp_path / "obs.jsonl")
    assert loaded.items == () and "directory" in loaded.warnings[0]


def test_a_huge_file_is_read_from_its_tail(tmp_path) -> None:
    path = tmp_path / "obs.jsonl"
    for i in range(200):
        append_observation(path, Observation(time=float(i), source="manual", free_mb=i))
    loaded = load_observations(path, max_bytes=4096)
    assert loaded.items[-1].free_mb == 199
    assert 0 < len(loaded.items) < 200
    assert "most recent" in loaded.warnings[0]
    assert len(loaded.warnings) == 1  # the cut first line is dropped silently, not reported as corrupt


def test_append_creates_the_directories_and_writes_one_line(tmp_path) -> None:
    path = tmp_path / "deep" / "er" / "obs.jsonl"
    append_observation(path, FULL)
    append_observation(path, FULL)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 3
    assert load_observations(path).items == (FULL, FULL)


def test_append_failure_is_one_clear_error(tmp_path, monkeypatch) -> None:
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(ObservationError, match="No space left") as info:
        append_observation(tmp_path / "obs.jsonl", FULL)
    assert "LOWVRAM_HOME" in info.value.hint


def test_a_nan_is_refused_not_written(tmp_path) -> None:
    with pytest.raises(ObservationError):
        append_observation(tmp_path / "obs.jsonl", Observation(time=1, source="hook", sit=float("nan")))
    assert not (tmp_path / "obs.jsonl").exists()


_WRITER = """
import sys
sys.path[:0] = [{repo!r}, {patches!r}]
from lowvram.world.observation_log import append_observation
from lowvram.core.observations import Observation
from lowvram_hook.observe import append_record
path, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
pad = "x" * 3000  # long lines: a torn write would show
for i in range(n):
    if who == "hook":
        append_record(path, {{"schema": 1, "time": i, "source": "hook", "reason": pad, "tag": who}})
    else:
        append_observation(path, Observation(time=i, source="manual", reason=pad, tag=who))
"""


def test_two_processes_appending_at_once_leave_every_line_parseable(tmp_path) -> None:
    path = tmp_path / "obs.jsonl"
    code = _WRITER.format(repo=str(REPO), patches=str(hook_path()))
    n = 400
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), who, str(n)]) for who in ("hook", "cli")]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    loaded = load_observations(path)
    assert loaded.warnings == ()
    assert len(loaded.items) == 2 * n
    assert sorted(o.tag or "" for o in loaded.items) == ["cli"] * n + ["hook"] * n
