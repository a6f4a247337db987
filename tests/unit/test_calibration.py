"""Calibration: stats.json parsing (incl. partial and corrupt files) and fitting to an install's data."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lowvram.core.estimate import memory as est
from lowvram.core.estimate.calibration import (
    DEFAULT_CALIBRATION,
    StatsData,
    StatsRecord,
    calibrate,
    parse_stats,
    request_for_flags,
)
from lowvram.core.estimate.memory import EstimateRequest
from lowvram.core.observations import Observation


def _rec(width: int, batch: int, reserved: float) -> dict[str, object]:
    return {"width": width, "pixels": width * width, "batch_size": batch, "active_peak": reserved * 0.9,
            "reserved_peak": reserved, "sys_peak": reserved + 900, "sys_total": 12288, "its": 3.1}


def _stats_text() -> str:
    return json.dumps({
        "txt2img": [_rec(256, 1, 300), _rec(512, 1, 900), _rec(512, 2, 1100)],
        "txt2img_hr": [_rec(512, 1, 1000)],
        "txt2img_hr_latent": [_rec(512, 1, 950)],
        "img2img": [_rec(512, 1, 920)],
    })


def test_parse_stats_reads_every_record() -> None:
    data = parse_stats(_stats_text())
    assert data.skipped == ()
    assert len(data.records) == 6
    first = data.records[0]
    assert (first.op, first.width, first.batch, first.reserved_peak_mb) == ("txt2img", 256, 1, 300.0)
    assert {r.op for r in data.records} == {"txt2img", "txt2img_hr", "txt2img_hr_latent", "img2img"}


def test_parse_stats_truncated_file_keeps_what_was_written() -> None:
    text = _stats_text()
    cut = text[: text.index('"batch_size": 2') + 5]  # the extension died while rewriting the file
    data = parse_stats(cut)
    assert [(r.width, r.batch) for r in data.records] == [(256, 1), (512, 1)]
    assert any("not valid JSON" in s for s in data.skipped)
    assert any(s.startswith("txt2img: cut off after 2 records") for s in data.skipped)
    assert any(s.startswith("img2img") for s in data.skipped)


def test_parse_stats_skips_bad_records_and_names_them() -> None:
    raw = json.loads(_stats_text())
    raw["txt2img"][1]["width"] = "wide"
    raw["txt2img"][2] = "garbage"
    raw["img2img"] = {"not": "a list"}
    del raw["txt2img_hr_latent"]
    raw["txt2img_hr"][0]["reserved_peak"] = -5
    data = parse_stats(json.dumps(raw))
    assert [r.width for r in data.records] == [256]
    joined = "\n".join(data.skipped)
    assert "txt2img[1]: bad width 'wide'" in joined
    assert "txt2img[2]: not an object" in joined
    assert "txt2img_hr[0]: bad reserved_peak -5" in joined
    assert "img2img: not a list" in joined
    assert "txt2img_hr_latent: missing" in joined


@pytest.mark.parametrize("text", ["", "[1, 2]", "\x00\x01binary", "{\"txt2img\": [{\"width\": 512,"])
def test_parse_stats_never_raises_on_garbage(text: str) -> None:
    data = parse_stats(text)
    assert data.records == ()
    assert data.skipped


@pytest.mark.parametrize("tail", ["[" * 50_000, '{"width": 5' + "1" * 5000 + "}"])
def test_parse_stats_survives_absurd_nesting_and_huge_numbers(tail: str) -> None:
    """json raises RecursionError / a digit-limit ValueError (not JSONDecodeError) on these: a corrupt
    stats.json must still give the records before the damage, never a traceback."""
    good = json.dumps(_rec(256, 1, 300))
    for text in (f'{{"txt2img": [{good}, {tail}]}}', f'\ufeff{{"txt2img": [{good}, {tail}'):
        data = parse_stats(text)
        assert [(r.width, r.reserved_peak_mb) for r in data.records] == [(256, 300.0)]
        assert any(s.startswith("txt2img: cut off after 1 records") for s in data.skipped)


def test_request_for_flags() -> None:
    t = EstimateRequest("sdxl", 1024, 1024)
    assert request_for_flags(t, ("--xformers", "--medvram-sdxl")).attention == "xformers"
    assert request_for_flags(t, ("--xformers", "--medvram-sdxl")).offload == "medvram-sdxl"
    assert request_for_flags(t, ()).attention == "split"  # A1111 without a flag: Doggettx
    r = request_for_flags(t, ("--no-half-vae", "--opt-sdp-attention"))
    assert (r.precision, r.vae_precision, r.attention) == ("half", "full", "sdp")
    assert request_for_flags(t, ("--precision", "full", "--no-half")).precision == "full"
    assert request_for_flags(t, ("--lowvram",), offload="medvram").offload == "medvram"  # recorded offload wins
    assert request_for_flags(replace(t, ui="forge", attention="xformers"), ()).attention == "xformers"


def _truth(act: float, vae: float, extra_mb: float = 0.0) -> est.Coefficients:
    return est.DEFAULT_COEFFICIENTS.with_(act_scale=act, vae_scale=vae, extra_mb=extra_mb)


def _observations(truth: est.Coefficients, family: str = "sd15") -> list[Observation]:
    from lowvram.core.estimate.calibration import Calibration

    cal = Calibration(coefficients=truth)
    out = []
    for side in (512, 640, 768, 896, 1024):
        for batch in (1, 2, 4):
            req = EstimateRequest(family, side, side, batch, attention="xformers")
            e = est.estimate(req, cal)
            out.append(Observation(time=1.0, source="hook", family=family, flags=("--xformers",), width=side,
                                   height=side, batch=batch, peak_allocated_mb=e.torch_peak_mb,
                                   peak_reserved_mb=e.torch_peak_mb + e.parts["allocator_slack"]))
    return out


def test_calibration_recovers_the_scales_of_an_install() -> None:
    truth = _truth(1.4, 0.8, extra_mb=300)
    template = EstimateRequest("sd15", 512, 512)
    cal = calibrate(template, _observations(truth))
    co = cal.coefficients
    assert co.act_scale == pytest.approx(1.4, rel=0.12)
    assert co.vae_scale == pytest.approx(0.8, rel=0.12)
    assert co.extra_mb == pytest.approx(300, abs=120)
    assert cal.points == cal.observations == 15 and cal.source == "observations"
    assert cal.median_error is not None and cal.median_error < 0.03
    assert cal.default_median_error is not None and cal.default_median_error > 3 * cal.median_error
    assert cal.error == pytest.approx(0.05)  # the floor: a fit this good still keeps a 5 % margin
    # The calibrated estimate lands on the install's figures at a size it never saw.
    target = EstimateRequest("sd15", 1152, 1152, 3, attention="xformers")
    want = est.estimate(target, replace(cal, coefficients=truth))
    got = est.estimate(target, cal)
    assert abs(got.torch_peak_mb - want.torch_peak_mb) / want.torch_peak_mb < 0.05


def test_calibration_from_stats_json_fits_the_working_memory() -> None:
    """stats.json points made from a model whose working memory is 1.3× the default."""
    truth = est.DEFAULT_COEFFICIENTS.with_(act_scale=1.3, vae_scale=1.3)
    template = EstimateRequest("sd15", 512, 512, attention="split")
    records = []
    from lowvram.core.estimate.calibration import Calibration

    for side in range(256, 1025, 128):
        for batch in (1, 2, 4):
            e = est.estimate(replace(template, width=side, height=side, batch=batch), Calibration(coefficients=truth))
            weights = e.parts["weights_unet"] + e.parts["weights_text"] + e.parts["weights_vae"]
            records.append(StatsRecord("txt2img", side, batch, float(e.torch_peak_mb + e.parts["allocator_slack"]
                                                                        - weights - 2)))
    cal = calibrate(template, stats=StatsData(tuple(records), ("img2img: missing",)))
    assert cal.source == "stats.json" and cal.stats_points == len(records)
    assert cal.coefficients.act_scale == pytest.approx(1.3, rel=0.1)
    assert cal.median_error is not None and cal.median_error < 0.05
    assert "img2img: missing" in cal.skipped


def test_calibration_skips_what_it_cannot_use_and_says_why() -> None:
    good = _observations(est.DEFAULT_COEFFICIENTS)[:3]
    bad = [
        Observation(time=1.0, source="hook", family="sdxl", width=1024, height=1024, batch=1, peak_allocated_mb=9000),
        Observation(time=1.0, source="hook", family="sd15", width=512, height=512, batch=1, peak_allocated_mb=9000,
                    ooms=1, ok=False),
        Observation(time=1.0, source="manual", free_mb=600, overflow_mb=1000),
        Observation(time=1.0, source="hook", family="sd15", peak_allocated_mb=3000),
    ]
    cal = calibrate(EstimateRequest("sd15", 512, 512), good + bad)
    assert cal.observations == 3
    reasons = "\n".join(cal.skipped)
    assert "another model family (sdxl)" in reasons
    assert "an OOM or failed run" in reasons
    assert "not a hook measurement" in reasons
    assert "no size or batch recorded" in reasons
    assert cal.error >= est.DEFAULT_MARGIN  # three points say little: the margin stays at the default


def test_no_data_is_the_reference_calibration() -> None:
    cal = calibrate(EstimateRequest("sdxl", 1024, 1024))
    assert cal.coefficients == DEFAULT_CALIBRATION.coefficients
    assert cal.points == 0 and cal.error == est.DEFAULT_MARGIN
    assert est.estimate(EstimateRequest("sdxl", 1024, 1024), cal) == est.estimate(EstimateRequest("sdxl", 1024, 1024))


def test_slack_is_fitted_from_reserved_minus_allocated() -> None:
    obs = [replace(o, peak_reserved_mb=o.peak_allocated_mb + 400) for o in _observations(est.DEFAULT_COEFFICIENTS)]
    cal = calibrate(EstimateRequest("sd15", 512, 512), obs)
    assert cal.coefficients.slack_working > est.DEFAULT_COEFFICIENTS.slack_working
    summary = cal.summary()
    assert set(summary) >= {"source", "points", "margin", "median_error", "max_error", "act_scale", "vae_scale",
                            "extra_mb", "slack_working", "skipped"}
