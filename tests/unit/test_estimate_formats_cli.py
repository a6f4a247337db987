"""`lowvram estimate --formats` (issue 18 item 3): which weight format of a Flux.1/SD3 model fits this card, how much
each streams from RAM per step and how fast it runs; `--weight-format`/`--text-format`; the DiT families end to end
(native size, sweep, calibration). Everything through the CLI, as a user runs it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.core.estimate.formats import COMPARED
from lowvram.core.observations import Observation
from lowvram.world import paths
from lowvram.world.observation_log import append_observation
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.model_headers import write_gguf
from tests.fixtures.webui_trees import make_webui

FOUR_BIT = {"nf4", "q4_0", "q4_k_s", "q3_k_s"}
DITS = ("flux1-dev", "flux1-schnell", "sd3-medium", "sd3.5-medium", "sd3.5-large")


@pytest.fixture(autouse=True)
def _plain(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "100")


def _json(cli: Any, *args: str) -> dict[str, Any]:
    r = cli("estimate", *args, "--json")
    assert r.code == 0, r.err
    data: dict[str, Any] = json.loads(r.out)
    return data


def _rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["format"]: row for row in data["formats"]}


def _table_line(out: str, fmt: str) -> list[str]:
    """The words of the --formats table's row for `fmt`."""
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [fmt])


def _forge_with_flux(root: Path, fmt: str) -> Path:
    """A Forge tree whose selected checkpoint is a Flux.1-dev GGUF file quantised as `fmt`."""
    tree = make_webui(root, flavor="forge", family=None)
    name = f"flux1-dev-{fmt.upper()}.gguf"
    write_gguf(tree / "models" / "Stable-diffusion" / name, "flux1-dev", fmt)
    (tree / "config.json").write_text(json.dumps({"sd_model_checkpoint": name}))
    return tree


# --------------------------------------------------------------------------- the table and the JSON


@pytest.mark.parametrize("vram", [8192, 12288])
def test_formats_json_per_format(cli, vram: int) -> None:
    data = _json(cli, "--model", "flux1-dev", "--formats", "--vram-mb", str(vram))
    rows = data["formats"]
    assert [r["format"] for r in rows] == list(COMPARED)
    for r in rows:
        assert {"format", "weights_mb", "peak_mb", "fits", "offloaded_mb", "relative_sit"} <= set(r)
        assert r["peak_mb"] > r["weights_mb"] > 0
        assert (r["offloaded_mb"] == 0) == r["fits"]  # what fits whole streams nothing
    by = _rows(data)
    assert by["bf16"]["weights_mb"] > by["q8_0"]["weights_mb"] > by["q4_0"]["weights_mb"] > by["q3_k_s"]["weights_mb"]
    assert by["bf16"]["fits"] is False and by["q3_k_s"]["fits"] is True  # 22 GiB never fits, 4.8 GiB does
    assert min(r["relative_sit"] for r in rows) == 1.0
    assert data["recommended"]["format"] in by and data["recommended"]["reason"].startswith(data["recommended"]["format"])
    # everything estimate printed before is still there
    assert data["request"]["model"] == "flux1-dev" and data["request"]["weight_format"] == "bf16"
    assert data["vram_mb"] == vram and "weights_model" in data["parts"]


def test_formats_table_on_8gb(cli) -> None:
    r = cli("estimate", "--model", "flux1-dev", "--formats", "--vram-mb", "8192")
    assert r.code == 0, r.err
    head = next(line for line in r.out.splitlines() if line.startswith("format"))
    assert head.split() == ["format", "weights", "peak", "fits", "whole", "streamed/step", "relative", "s/it"]
    data = _json(cli, "--model", "flux1-dev", "--formats", "--vram-mb", "8192")
    for row in data["formats"]:  # the table says what the JSON says, in GiB
        gib = [f"{row[k] / 1024:.1f}" for k in ("weights_mb", "peak_mb", "offloaded_mb")]
        fits = "yes" if row["fits"] else "no"
        assert _table_line(r.out, row["format"]) == [row["format"], gib[0], gib[1], fits,
                                                     gib[2] if row["offloaded_mb"] else "0",
                                                     f"{row['relative_sit']:.2f}"]
    assert _table_line(r.out, "bf16")[3] == "no" and _table_line(r.out, "q3_k_s")[3:5] == ["yes", "0"]
    assert "1.00" in [_table_line(r.out, fmt)[-1] for fmt in COMPARED]
    rec = next(line for line in r.out.splitlines() if line.startswith("recommended:"))
    assert rec.split()[1].rstrip(":") in FOUR_BIT  # 8 GB: a 4-bit format
    # what was assumed about the card, and the dequantisation, are said
    assert "compute capability unknown: counted as an RTX 3060" in r.err
    assert "PCIe link unknown: counted as PCIe 3 ×16" in r.err
    assert "back into 16 bit every step" in r.err and "NF4 +4 %" in r.err


def test_the_recommendation_follows_the_card(cli, tmp_path: Path) -> None:
    """A facts file's GPU gives the size and the speed, with nothing assumed: an 8 GB card gets a 4-bit format, a
    24 GB one a format with more bits."""
    small = write_facts(MACHINES["rtx4060-8gb-win"], tmp_path / "4060.json")
    big = write_facts(MACHINES["rtx4090-24gb"], tmp_path / "4090.json")
    on8 = _json(cli, "--model", "flux1-dev", "--formats", "--facts", str(small))
    on24 = _json(cli, "--model", "flux1-dev", "--formats", "--facts", str(big))
    assert on8["gpu"] == "NVIDIA GeForce RTX 4060" and on24["gpu"] == "NVIDIA GeForce RTX 4090"
    assert on8["recommended"]["format"] in FOUR_BIT
    assert on24["recommended"]["format"] != on8["recommended"]["format"]
    rec8, rec24 = _rows(on8)[on8["recommended"]["format"]], _rows(on24)[on24["recommended"]["format"]]
    assert rec24["weights_mb"] > rec8["weights_mb"]
    assert not any("counted as" in n for n in on8["notes"] + on24["notes"])
    r = cli("estimate", "--model", "flux1-dev", "--formats", "--facts", str(small))
    assert r.code == 0, r.err
    assert f"recommended: {on8['recommended']['format']}:" in r.out


def test_the_pcie_link_is_its_maximum(cli, tmp_path: Path) -> None:
    """The facts say Gen 3 now (an idle card drops its link) and Gen 4 ×16 at most: streaming is counted at the
    maximum, so a format that streams is relatively faster than where only the current link is known (12 GB card)."""
    machine = MACHINES["rtx3060-12gb"]
    gen4 = write_facts(machine, tmp_path / "gen4.json")
    now_only = replace(machine, gpus=(replace(machine.gpus[0], pcie_gen_max=None, pcie_width_max=None),))
    gen3 = write_facts(now_only, tmp_path / "gen3.json")
    fast = _rows(_json(cli, "--model", "flux1-dev", "--formats", "--facts", str(gen4)))
    slow = _rows(_json(cli, "--model", "flux1-dev", "--formats", "--facts", str(gen3)))
    assert fast["bf16"]["offloaded_mb"] == slow["bf16"]["offloaded_mb"] > 0
    assert fast["bf16"]["relative_sit"] < slow["bf16"]["relative_sit"]
    assert fast["q6_k"]["fits"] is True and fast["q6_k"]["relative_sit"] == slow["q6_k"]["relative_sit"]


def test_the_vram_size_changes_fits_and_streaming(cli) -> None:
    on8 = _rows(_json(cli, "--model", "flux1-dev", "--formats", "--vram-mb", "8192"))
    on12 = _rows(_json(cli, "--model", "flux1-dev", "--formats", "--vram-mb", "12288"))
    assert on8["q8_0"]["offloaded_mb"] - on12["q8_0"]["offloaded_mb"] == 4096  # 4 GiB more card, 4 GiB less streamed
    assert on8["q4_k_s"]["fits"] is False and on12["q4_k_s"]["fits"] is True


# --------------------------------------------------------------------------- the user's own file


def test_your_file_is_marked_and_estimated(cli, tmp_path: Path) -> None:
    tree = _forge_with_flux(tmp_path / "forge", "q4_k_s")
    r = cli("estimate", "--webui", str(tree), "--formats", "--vram-mb", "12288")
    assert r.code == 0, r.err
    assert "flux1-dev 1024x1024, batch 1, q4_k_s (T5 fp8_e4m3fn), sdp attention, forge" in r.out
    assert "q4_k_s ← your file" in r.out and r.out.count("← your file") == 1
    data = _json(cli, "--webui", str(tree), "--formats", "--vram-mb", "12288")
    assert [row["format"] for row in data["formats"] if row.get("current")] == ["q4_k_s"]
    assert data["request"]["weight_format"] == "q4_k_s" and data["request"]["text_format"] == "fp8_e4m3fn"
    assert data["peak_mb"] == _rows(data)["q4_k_s"]["peak_mb"]  # the estimate is the file's format
    assert data["request"]["ui"] == "forge"


def test_a_file_format_not_compared_gets_its_own_row(cli, tmp_path: Path) -> None:
    tree = _forge_with_flux(tmp_path / "forge", "q5_k_m")
    data = _json(cli, "--webui", str(tree), "--formats", "--vram-mb", "12288")
    assert [row["format"] for row in data["formats"]] == [*COMPARED, "q5_k_m"]
    assert _rows(data)["q5_k_m"].get("current") is True


def test_model_file_without_a_webui(cli, tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", "flux1-dev", "q8_0")
    data = _json(cli, "--model", str(path), "--formats", "--vram-mb", "16384")
    assert data["request"]["weight_format"] == "q8_0"
    assert [row["format"] for row in data["formats"] if row.get("current")] == ["q8_0"]


def test_weight_format_overrides_the_file(cli, tmp_path: Path) -> None:
    tree = _forge_with_flux(tmp_path / "forge", "q4_k_s")
    data = _json(cli, "--webui", str(tree), "--weight-format", "Q8_0", "--text-format", "fp16", "--vram-mb", "12288")
    assert data["request"]["weight_format"] == "q8_0" and data["request"]["text_format"] == "fp16"
    assert data["parts"]["weights_model"] > 11000


def test_weight_format_for_a_dit_shows_in_the_heading(cli) -> None:
    r = cli("estimate", "--model", "flux1-dev", "--weight-format", "nf4", "--vram-mb", "8192")
    assert r.code == 0, r.err
    assert r.out.splitlines()[0] == "flux1-dev 1024x1024, batch 1, nf4 (T5 fp8_e4m3fn), sdp attention, forge"
    assert "weights_model" in r.out and "weights_unet" not in r.out


# --------------------------------------------------------------------------- bad input, unknown VRAM


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "flux1-dev", "--weight-format", "q9"], "--weight-format q9: not a weight format lowvram knows"),
    (["--model", "flux1-dev", "--text-format", "int3"], "--text-format int3: not a weight format lowvram knows"),
    (["--model", "sdxl", "--text-format", "fp8_e4m3fn"], "--text-format fp8_e4m3fn: sdxl has no T5 text encoder"),
    (["--model", "sdxl", "--formats", "--vram-mb", "8192"], "--formats compares the weight formats of Flux.1"),
])
def test_bad_input_is_one_usage_line(cli, args: list[str], words: str) -> None:
    r = cli("estimate", *args)
    assert r.code == 2
    lines = r.err.splitlines()
    assert [line.split(":")[0] for line in lines] == ["error", "hint"], r.err
    assert words in lines[0] and "Traceback" not in r.err and r.out == ""


def test_formats_on_sdxl_hints_the_families(cli) -> None:
    r = cli("estimate", "--model", "sdxl", "--formats")
    assert r.code == 2
    assert "--model flux1-dev" in r.err.splitlines()[1]


def test_no_vram_known_still_shows_weights_and_peaks(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowvram.cli import cmd_estimate

    monkeypatch.setattr(cmd_estimate, "_vram_from_facts", lambda facts, notes: (None, None, None))
    data = _json(cli, "--model", "flux1-dev", "--formats")
    assert all(r["fits"] is None and r["relative_sit"] is None and r["weights_mb"] > 0 for r in data["formats"])
    assert data["recommended"] is None
    assert any("give --vram-mb" in n for n in data["notes"] if n.startswith("formats:"))
    r = cli("estimate", "--model", "flux1-dev", "--formats")
    assert r.code == 0
    assert _table_line(r.out, "bf16")[1:] == [f"{_rows(data)['bf16'][k] / 1024:.1f}" for k in ("weights_mb", "peak_mb")] \
        + ["?", "?", "?"]
    assert "recommended:" not in r.out


def test_a_ui_that_cannot_load_the_format_gets_a_dash_and_a_reason(cli) -> None:
    data = _json(cli, "--model", "sd3-medium", "--ui", "a1111", "--formats", "--vram-mb", "8192")
    by = _rows(data)
    assert by["q4_0"]["relative_sit"] is None and "A1111 loads no NF4 or GGUF" in by["q4_0"]["why_not"]
    assert by["fp8_e4m3fn"]["relative_sit"] is not None
    assert data["request"]["text_format"] is None  # A1111 runs SD3 without T5 unless told
    r = cli("estimate", "--model", "flux1-dev", "--ui", "a1111", "--formats", "--vram-mb", "8192")
    assert r.code == 0, r.err
    assert _table_line(r.out, "nf4")[-1] == "—"
    assert "A1111 loads no NF4 or GGUF" in " ".join(r.out.split())
    assert "recommended: none" in r.out
    assert json.loads(cli("estimate", "--model", "flux1-dev", "--ui", "a1111", "--formats", "--vram-mb", "8192",
                          "--json").out)["recommended"] is None


# --------------------------------------------------------------------------- the DiT families end to end


@pytest.mark.parametrize("family", DITS)
def test_every_dit_family_estimates_at_1024_and_sweeps_two_modes(cli, family: str) -> None:
    data = _json(cli, "--model", family, "--vram-mb", "12288", "--sweep")
    assert (data["request"]["width"], data["request"]["height"]) == (1024, 1024)
    assert data["parts"]["weights_model"] > 0 and "weights_unet" not in data["parts"]
    assert list(dict.fromkeys(row["offload"] for row in data["sweep"])) == ["none", "lowvram"]
    assert data["request"]["ui"] == "forge"
    assert any(n.startswith("UI: estimated for Forge") for n in data["notes"])


def test_a_dit_in_a_webui_with_sd_measurements_uses_the_reference_calibration(cli, tmp_path: Path) -> None:
    tree = _forge_with_flux(tmp_path / "forge", "q4_k_s")
    log = paths.observations_path(tree)
    for t, (side, peak) in enumerate(((768, 5200), (1024, 5600), (1152, 6100))):  # an older hook: no family
        append_observation(log, Observation(time=1.7e9 + t, source="hook", checkpoint="sdxl.safetensors|1|1",
                                            peak_allocated_mb=peak, vram_total_mb=8192, width=side, height=side,
                                            batch=1))
    data = _json(cli, "--webui", str(tree), "--formats", "--vram-mb", "8192")
    assert data["calibration"]["source"] == "reference"
    assert any("reference calibration" in n for n in data["notes"])


def test_a_format_that_would_stream_more_than_the_ram_holds_is_not_offered(cli, tmp_path: Path) -> None:
    """What streams sits in RAM beside the text encoders: on a 16 GiB machine bf16 Flux (18 GiB streamed) would
    swap, so it gets a dash and the reason; with 64 GiB it runs, slowly."""
    machine = MACHINES["rtx4060-8gb-win"]
    small = write_facts(replace(machine, system=replace(machine.system, ram_mb=16384)), tmp_path / "16.json")
    big = write_facts(replace(machine, system=replace(machine.system, ram_mb=65536)), tmp_path / "64.json")
    tight = _rows(_json(cli, "--model", "flux1-dev", "--formats", "--facts", str(small)))
    roomy = _rows(_json(cli, "--model", "flux1-dev", "--formats", "--facts", str(big)))
    assert tight["bf16"]["relative_sit"] is None and "RAM" in tight["bf16"]["why_not"]
    assert roomy["bf16"]["relative_sit"] is not None and roomy["bf16"]["why_not"] is None
    assert tight["nf4"]["relative_sit"] == 1.0
