"""The tuning search as pure functions: candidates, confirmation, closing, reopening, swings."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lowvram.core.observations import Observation
from lowvram.core.search import (
    PASSIVE_CANDIDATES,
    TUNE_CANDIDATES,
    candidate_grid,
    candidate_range,
    like_with_like,
    make_probes,
    next_candidate,
    pick_size,
    tuning_state,
)

CK = "sdxl.safetensors|6938078334|1700000000"
OTHER = "juggernaut.safetensors|7105350536|1710000000"
DRIVER = "546.01"
SIZE = (1024, 1024)
OPTIMUM = 1216


def curve(reserve: int) -> float:
    """A stand-in UI's s/it by reserve: spilled at 0, best at OPTIMUM, worse either side."""
    if reserve == 0:
        return 3.0
    return 2.0 + 0.0005 * abs(reserve - OPTIMUM)


def probe(t: float, reserve: int | None, sit: float | None, *, road: str = "resident", ok: bool = True,
          ck: str = CK, driver: str = DRIVER, size: tuple[int, int] = SIZE, source: str = "tuning") -> Observation:
    return Observation(time=t, source=source, checkpoint=ck, road=road, layout=road == "resident",
                       reserve_mb=reserve, free_mb=600, overflow_mb=1000, sit=sit, ok=ok, driver=driver,
                       width=size[0], height=size[1], reason="" if ok else "HTTP 500: out of memory")


def search(max_candidates: int, obs: list[Observation] | None = None) -> tuple[list[int], list[Observation]]:
    obs = list(obs or [])
    tried: list[int] = []
    for _ in range(50):
        state = tuning_state(obs, CK, DRIVER, SIZE, max_candidates=max_candidates, vram_total_mb=8192,
                             cuda_context_mb=300)
        if state.closed:
            break
        nxt = state.next_candidate
        assert nxt is not None
        assert nxt not in tried, "a candidate is never measured twice"
        tried.append(nxt)
        obs.append(probe(len(obs) + 1.0, nxt, curve(nxt)))
    return tried, obs


def test_candidates_lie_between_0_8_free_and_free_plus_overflow_on_a_64_mib_grid() -> None:
    assert candidate_range(600, 1000) == (512, 1600)  # 0.8 × 600 = 480, up to the grid
    grid = candidate_grid(600, 1000)
    assert grid[0] == 512 and grid[-1] == 1600 and all(g % 64 == 0 for g in grid)
    assert candidate_range(600, 1000, vram_total_mb=1500, cuda_context_mb=300) == (512, 1152)
    assert candidate_range(0, 0) == (0, 0)


def test_reserve_zero_first_then_the_formula_then_between() -> None:
    assert tuning_state([], CK, DRIVER, SIZE).next_candidate == 0
    obs = [probe(1, 0, 3.0)]
    assert tuning_state(obs, CK, DRIVER, SIZE).next_candidate == 1600
    obs.append(probe(2, 1600, curve(1600)))
    third = tuning_state(obs, CK, DRIVER, SIZE).next_candidate
    assert third is not None and 480 <= third < 1600 and third % 64 == 0


def test_the_search_finds_the_optimum_within_64_mib() -> None:
    tried, obs = search(TUNE_CANDIDATES)
    state = tuning_state(obs, CK, DRIVER, SIZE, max_candidates=TUNE_CANDIDATES)
    assert state.closed and state.best is not None
    assert state.best.road == "resident"
    assert abs(state.best.reserve_mb - OPTIMUM) <= 64
    assert len(tried) <= TUNE_CANDIDATES
    assert "confirmed" in state.reason or "measured" in state.reason


def test_the_passive_search_closes_after_six_candidates() -> None:
    tried, obs = search(PASSIVE_CANDIDATES)
    assert len(tried) <= PASSIVE_CANDIDATES
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert state.closed and state.next_candidate is None
    assert state.best is not None and abs(state.best.reserve_mb - OPTIMUM) <= 128


def test_confirmed_twice_closes_before_the_limit() -> None:
    obs = [probe(1, 0, 3.0), probe(2, 1600, 1.5), probe(3, 1472, 1.6)]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert not state.closed and state.confirmations == 1
    obs.append(probe(4, 1536, 1.55))
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert state.closed and state.confirmations == 2
    assert state.best is not None and state.best.reserve_mb == 1600
    assert "confirmed 2" in state.reason


def test_slower_candidates_far_from_the_best_narrow_the_search_and_do_not_close_it() -> None:
    """Issue 17 §2: on a curve whose optimum lies between two measured values both are slower than
    it however close it is; a candidate 576 or 256 MiB away that did not beat the best only moves
    the bracket, and the search goes on next to the best instead of calling it confirmed."""
    obs = [probe(1, 0, 3.0), probe(2, 1600, 1.5), probe(3, 1024, 1.9), probe(4, 1344, 1.7)]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert not state.closed and state.confirmations == 0
    assert state.next_candidate is not None and 1344 < state.next_candidate < 1600


def test_repeated_runs_at_one_reserve_are_one_candidate() -> None:
    obs = [probe(t, 0, 3.0 + t / 100) for t in range(1, 8)]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert state.measured_reserves == 1 and not state.closed
    assert state.probes[0].runs == 7 and state.probes[0].sit == pytest.approx(3.04)


def test_a_new_checkpoint_or_driver_reopens_the_search() -> None:
    _, obs = search(PASSIVE_CANDIDATES)
    assert tuning_state(obs, CK, DRIVER, SIZE).closed
    other = tuning_state(obs, OTHER, DRIVER, SIZE)
    assert not other.closed and other.next_candidate == 0 and other.best is None
    new_driver = tuning_state(obs, CK, "551.23", SIZE)
    assert not new_driver.closed and new_driver.next_candidate == 0
    assert tuning_state(obs, CK, None, SIZE).closed  # an unknown driver does not throw the results away


def test_a_value_whose_neighbour_swings_the_speed_is_avoided() -> None:
    obs = [probe(1, 0, 3.0), probe(2, 1088, 2.05), probe(3, 1152, 2.0), probe(4, 1216, 2.6)]
    probes = {p.reserve_mb: p for p in make_probes(obs)}
    assert probes[1152].unstable and not probes[1088].unstable
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert state.best is not None and state.best.reserve_mb == 1088


def test_a_failed_probe_is_measured_but_never_best() -> None:
    obs = [probe(1, 0, 3.0), probe(2, 1600, None, ok=False)]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    failed = next(p for p in state.probes if p.reserve_mb == 1600)
    assert not failed.ok and "out of memory" in failed.reason
    assert state.best is not None and state.best.reserve_mb == 0
    assert state.measured_reserves == 2 and state.next_candidate not in (0, 1600)


def test_the_swap_road_competes_for_best() -> None:
    obs = [probe(1, None, 1.2, road="swap"), probe(2, 0, 3.0), probe(3, 1600, 2.2)]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert state.best is not None and state.best.road == "swap" and state.best.sit == 1.2
    assert state.measured_reserves == 2  # the swap road does not use up resident candidates


def test_hook_runs_count_and_manual_readings_do_not() -> None:
    obs = [probe(1, 0, 3.0, source="hook"),
           Observation(time=2, source="manual", free_mb=600, overflow_mb=1000, sit=1.0)]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert state.measured_reserves == 1 and state.next_candidate == 1600


def test_the_size_with_most_reserves_is_picked_when_none_is_given() -> None:
    obs = [probe(1, 0, 3.0, size=(512, 512)), probe(2, 0, 3.0), probe(3, 1600, 2.0), probe(4, 1024, 2.1)]
    assert pick_size(obs) == SIZE
    assert tuning_state(obs, CK, DRIVER, None).size == SIZE
    assert tuning_state(obs, CK, DRIVER, (512, 512)).measured_reserves == 1


def test_next_candidate_converges_when_the_best_has_measured_neighbours() -> None:
    grid = [960, 1024, 1088]
    assert next_candidate([0, 960, 1024, 1088], 1024, grid, 1088) is None
    assert next_candidate([0, 1088], 1088, grid, 1088) == 1024 - 64 or next_candidate([0, 1088], 1088, grid, 1088) == 1024


def test_the_state_serialises_for_reserve_json() -> None:
    _, obs = search(PASSIVE_CANDIDATES)
    data = tuning_state(obs, CK, DRIVER, SIZE).to_dict()
    assert set(data) >= {"best", "probes", "closed", "next_candidate", "reason", "size"}
    assert set(data["best"]) == {"road", "reserve_mb", "sit"}
    assert set(data["probes"][0]) >= {"road", "reserve_mb", "sit", "ok", "reason"}


# A probe counts only for what the hook really did (issue 13 §3).


def test_a_resident_run_whose_layout_did_not_happen_measured_nothing() -> None:
    """`layout: false` on the resident road (the hook refused it, an older hook wrote no reason):
    the model was not laid out, so its s/it says nothing about that reserve, however fast."""
    refused = replace(probe(2, 1216, 0.5, source="hook"), layout=False)
    obs = [probe(1, 0, 3.0), refused]
    state = tuning_state(obs, CK, DRIVER, SIZE)
    assert [p.reserve_mb for p in state.probes] == [0]
    assert state.best is not None and state.best.reserve_mb == 0 and state.measured_reserves == 1


def test_a_failed_or_refused_layout_is_a_failed_resident_run_at_its_reserve() -> None:
    failed = replace(probe(2, 1216, 0.5), layout=False, layout_error="layout failed and was rolled back: OOM")
    state = tuning_state([probe(1, 0, 3.0), failed], CK, DRIVER, SIZE)
    at = {p.reserve_mb: p for p in state.probes}
    assert not at[1216].ok and at[1216].sit is None and "rolled back" in at[1216].reason
    assert state.best is not None and state.best.reserve_mb == 0
    assert state.measured_reserves == 2  # tried (and failed): not proposed again
    assert state.next_candidate not in (0, 1216)


def test_runs_on_another_device_are_not_compared() -> None:
    """Like with like (`comparable_key`): the CPU runs of a test UI are never the GPU's best."""
    gpu = [replace(probe(t, r, curve(r)), device="cuda") for t, r in ((1, 0), (2, 1600), (3, 1216))]
    cpu = [replace(probe(4, 1024, 0.5), device="cpu")]
    state = tuning_state(gpu + cpu, CK, DRIVER, SIZE)
    assert {p.reserve_mb for p in state.probes} == {0, 1600, 1216}
    assert state.best is not None and state.best.reserve_mb == 1216
    assert like_with_like(gpu + cpu, SIZE) == gpu
    assert like_with_like([*cpu, replace(probe(0.5, 0, 1.0), batch=4, device="cpu")], SIZE) == cpu  # the latest
