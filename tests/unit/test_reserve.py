"""The reserve formula (docs/architecture.md#the-policy): median free + largest overflow, clamps, rounding, learning."""

from __future__ import annotations

from lowvram.core.observations import Observation
from lowvram.core.reserve import compute_reserve

CK = "sdxl.safetensors|6938078334|1700000000"
OTHER = "v1-5.safetensors|4265380512|1690000000"


def hook(t: float, free: int | None, overflow: int | None, *, reserve: int | None = 0, ck: str = CK,
         sit: float | None = None, size: tuple[int, int] = (1024, 1024)) -> Observation:
    return Observation(time=t, source="hook", checkpoint=ck, road="resident" if reserve is not None else "swap",
                       layout=reserve is not None, reserve_mb=reserve, free_mb=free, overflow_mb=overflow, sit=sit,
                       width=size[0], height=size[1])


def manual(t: float, free: int, overflow: int, ck: str | None = None) -> Observation:
    return Observation(time=t, source="manual", checkpoint=ck, free_mb=free, overflow_mb=overflow)


def reserve(obs, **kw):
    kw.setdefault("checkpoint", CK)
    kw.setdefault("vram_total_mb", 8192)
    kw.setdefault("cuda_context_mb", 300)
    return compute_reserve(obs, **kw)


def test_no_observations_is_zero_and_says_it_is_learning() -> None:
    r = reserve([])
    assert (r.reserve_mb, r.source, r.observations_used) == (0, "none", 0)
    assert "learning" in r.reason
    assert r.free_dedicated_mb is None and r.overflow_mb is None


def test_the_issue_check_manual_600_plus_1000_is_1600_from_observations() -> None:
    r = reserve([manual(1, 600, 1000)])
    assert (r.reserve_mb, r.source, r.free_dedicated_mb, r.overflow_mb) == (1600, "observations", 600, 1000)
    assert "600" in r.reason and "1000" in r.reason and r.clamped_by is None


def test_median_free_and_largest_overflow() -> None:
    obs = [hook(1, 500, 900), hook(2, 700, 1000), hook(3, 100, 950), hook(4, 650, 400), hook(5, 600, 980)]
    r = reserve(obs)
    assert r.free_dedicated_mb == 600  # median of 100, 500, 600, 650, 700: one bad reading does not rule
    assert r.overflow_mb == 1000
    assert r.reserve_mb == 1600 and r.observations_used == 5


def test_only_the_last_five_runs_count() -> None:
    old = [hook(t, 3000, 3000) for t in range(1, 6)]
    new = [hook(t, 600, 1000) for t in range(10, 15)]
    assert reserve(old + new).reserve_mb == 1600
    assert reserve(list(reversed(new + old))).reserve_mb == 1600  # by time, not by file order


def test_which_runs_count() -> None:
    obs = [
        hook(1, 600, 1000),
        hook(2, 5000, 5000, ck=OTHER),  # another checkpoint
        hook(3, 5000, 5000, reserve=None),  # swap road: no reserve recorded
        manual(4, 600, 1200),  # WebUI-wide: counts for every checkpoint
        manual(5, 9000, 9000, ck=OTHER),  # a manual reading of another checkpoint
    ]
    r = reserve(obs)
    assert r.observations_used == 2
    assert (r.free_dedicated_mb, r.overflow_mb, r.reserve_mb) == (600, 1200, 1792)
    assert reserve(obs, checkpoint=OTHER).reserve_mb == 8192 - 300 - (8192 - 300) % 64


def test_clamped_to_the_card_less_the_cuda_context() -> None:
    r = reserve([manual(1, 7000, 4000)], vram_total_mb=8192, cuda_context_mb=300)
    assert r.clamped_by == "vram_total"
    assert r.reserve_mb == 7872  # 8192 − 300 = 7892, rounded down to 64 MiB
    assert "clamped" in r.reason


def test_an_unknown_bound_is_skipped() -> None:
    r = reserve([manual(1, 7000, 4000)], vram_total_mb=None, cuda_context_mb=None)
    assert r.reserve_mb == 10944 and r.clamped_by is None  # 11000 rounded down
    # a known total with an unknown context still clamps, to the total
    assert reserve([manual(1, 7000, 4000)], vram_total_mb=8192, cuda_context_mb=None).reserve_mb == 8192


def test_rounded_down_to_64_mib() -> None:
    r = reserve([manual(1, 650, 1000)])
    assert r.reserve_mb == 1600 and "rounded down" in r.reason
    assert reserve([manual(1, 63, 0)]).reserve_mb == 0


def test_missing_overflow_counts_as_zero_and_missing_free_too() -> None:
    assert reserve([hook(1, 640, None)]).reserve_mb == 640
    assert reserve([hook(1, None, 128)]).reserve_mb == 128


def test_tuning_wins_once_two_reserves_have_speed_at_the_same_size() -> None:
    obs = [hook(1, 600, 1000, reserve=0, sit=3.0)]
    one = reserve(obs)
    assert one.source == "observations" and one.reserve_mb == 1600  # one reserve measured: the formula
    obs.append(hook(2, 600, 1000, reserve=1600, sit=2.0))
    two = reserve(obs, explore=False)
    assert two.source == "tuning" and two.reserve_mb == 1600
    assert two.tuning is not None and two.tuning.best is not None
    # with the passive search open, the next candidate is proposed instead
    exploring = reserve(obs)
    assert exploring.source == "tuning" and exploring.reserve_mb not in (0, 1600)
    assert 480 <= exploring.reserve_mb <= 1600 and "next" in exploring.reason
    assert exploring.formula_mb == 1600


def test_speeds_at_different_sizes_do_not_make_a_tuning_answer() -> None:
    obs = [hook(1, 600, 1000, reserve=0, sit=3.0, size=(512, 512)),
           hook(2, 600, 1000, reserve=1600, sit=2.0, size=(1024, 1024))]
    r = reserve(obs, size=(1024, 1024))
    assert r.source == "observations"


def test_a_faster_swap_road_does_not_make_the_resident_reserve_zero() -> None:
    """The reserve is laid out on the resident road: its answer is the best *resident* probe, even
    where `tune` found the swap road faster (the plan may still take the resident road: --layout on)."""
    obs = [manual(1, 600, 1000),
           Observation(time=2, source="tuning", checkpoint=CK, road="swap", sit=1.0, width=1024, height=1024)]
    for t, res, sit in [(3, 0, 2.0), (4, 1600, 1.5), (5, 1024, 1.6), (6, 1280, 1.55), (7, 1408, 1.52),
                        (8, 1536, 1.51)]:
        obs.append(hook(t, 600, 1000, reserve=res, sit=sit))
    r = reserve(obs, size=(1024, 1024))
    assert r.tuning is not None and r.tuning.closed
    assert r.tuning.best is not None and r.tuning.best.road == "swap"  # tune's overall winner stays visible
    assert (r.source, r.reserve_mb) == ("tuning", 1600)
    assert "1600 MiB had the best measured speed with the model kept in VRAM" in r.reason


# Issue 17 §2: the reserve must not feed on itself. A run laid out at a reserve above its free VRAM
# reports the model tail the layout pushed into shared memory as overflow.


def test_overflow_is_read_at_reserve_up_to_free_not_where_the_layout_pushed_the_model_out() -> None:
    obs = [hook(1, 600, 1000, reserve=0, sit=3.0), hook(2, 600, 2100, reserve=1600, sit=2.0)]
    r = reserve(obs, explore=False)
    assert r.overflow_mb == 1000  # not 2100 = 1000 + (1600 − 600) + 100
    assert r.formula_mb == 1600  # not 2700: the next launch does not lay out above the last
    assert r.tuning is not None and r.tuning.range_mb == (512, 1600)
    first = reserve(obs[:1])
    assert first.reserve_mb == 1600
    later = reserve([*obs, hook(3, 600, 1200, reserve=1728, sit=2.1)], explore=False)
    assert later.formula_mb == 1600 and later.overflow_mb == 1000


def test_the_reading_at_reserve_zero_outlives_the_window_of_later_runs_above_free() -> None:
    obs = [hook(1, 600, 1000, reserve=0, sit=3.0)]
    obs += [hook(t, 600, 1100 + t, reserve=1600 + 64 * (t % 2), sit=2.0) for t in range(2, 10)]
    r = reserve(obs, explore=False)
    assert (r.overflow_mb, r.formula_mb) == (1000, 1600)
    assert r.tuning is not None and r.tuning.range_mb == (512, 1600)


def test_the_reason_says_which_runs_the_overflow_is_of() -> None:
    obs = [hook(1, 600, 1000, reserve=0), hook(2, 600, 2100, reserve=1600)]
    r = reserve(obs)
    assert r.source == "observations"  # no s/it: no tuning answer yet
    assert "overflow 1000 MiB (largest of 1 at reserve ≤ free; 1 run above free left out" in r.reason


def test_without_a_run_at_reserve_up_to_free_the_pushed_out_part_is_subtracted() -> None:
    """A reserve forced from the first launch: every run lies above free, so each stands in less the
    reserve − free it pushed out of VRAM."""
    obs = [hook(1, 600, 1100, reserve=1600), hook(2, 700, 1150, reserve=1600)]
    r = reserve(obs)
    assert r.overflow_mb == 250  # max(1100 − 1000, 1150 − 900)
    assert r.reserve_mb == 896  # median free 650 + 250 = 900 → 896
    assert "less the reserve − free each pushed out" in r.reason
