"""`lowvram tune` on Forge, against a fake Forge options API with Forge's quirks (tests/fixtures/forge_api.py):
GPU Weights, Swap Method and Swap Location swept live, config.json put back byte for byte (also on Ctrl-C),
the probes kept as observations, and the next plan using the fastest."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import paths
from lowvram.world.observation_log import load_observations
from lowvram.world.tune.forge import Knobs, check_knobs, inference_candidates
from lowvram.world.tune.results import TuneError
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.forge_api import ForgeApiUi, make_forge_api_webui

# The user's own settings, with forge_inference_memory stored at the value tune will want live (a POST of it
# alone would be skipped, and --nowebui Forge starts at its default 1024 whatever is stored).
USER = {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]", "forge_inference_memory": 1536,
        "samples_format": "png", "ünïcode": "kept"}


@pytest.fixture
def forge(tmp_path: Path) -> Iterator[ForgeApiUi]:
    ui = make_forge_api_webui(tmp_path / "forge", config=USER)
    yield ui
    ui.kill_all()


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    return write_facts(MACHINES["gtx1070-8gb"], tmp_path / "gtx1070.json")


def _state(ui: ForgeApiUi) -> dict[str, Any]:
    return {name: (ui.root / name).read_bytes() if (ui.root / name).exists() else None
            for name in ("config.json", "webui-user.sh")} | {
        "manifest": paths.manifest_path(ui.root).read_bytes() if paths.manifest_path(ui.root).exists() else None}


def _tune(cli: Any, ui: ForgeApiUi, facts: Path, *extra: str) -> Any:
    return cli("tune", "--webui", str(ui.root), "--facts", str(facts), "--steps", "2", "--repeats", "1", *extra)


def test_forge_tune_sweeps_live_keeps_observations_and_puts_config_back(cli: Any, forge: ForgeApiUi,
                                                                         facts: Path) -> None:
    before = _state(forge)
    res = _tune(cli, forge, facts, "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["roads"] == ["forge"] and data["closed"] is True
    best = data["best"]
    assert (best["forge_inference_memory"], best["forge_async_loading"], best["forge_pin_shared_memory"]) == (
        1536, "Async", "CPU")
    tried = [(p["forge_inference_memory"], p["forge_async_loading"], p["forge_pin_shared_memory"])
             for p in data["probes"]]
    # The plan's 1024 first; below it 768 is > 10 % slower, so 512 is never tried; above, 1536 then 2048
    # (slower: the direction stops); then Async at the best, then Shared at the best method.
    assert tried == [(1024, "Queue", "CPU"), (768, "Queue", "CPU"), (1536, "Queue", "CPU"), (2048, "Queue", "CPU"),
                     (1536, "Async", "CPU"), (1536, "Async", "Shared")]
    # Every job ran with the candidate's settings LIVE (the stored 1536 was posted after a different value).
    jobs = forge.requests()
    assert len(jobs) == 2 * len(tried)
    assert [(j["forge_inference_memory"], j["forge_async_loading"], j["forge_pin_shared_memory"])
            for j in jobs[::2]] == tried
    assert not any(p["skipped"] and p["key"] == "forge_inference_memory" and p["value"] == 1536
                   for p in forge.options_posted()[:1])
    # Loopback only; nothing left running; the tree byte for byte as before (Forge saved every POST).
    assert [b["bound"] for b in forge.binds()] == [["127.0.0.1"]]
    assert forge.alive() == []
    assert _state(forge) == before
    # Every probe kept as an observation with the settings it ran with.
    obs = [o for o in load_observations(paths.observations_path(forge.root)).items if o.source == "tuning"]
    assert [(o.forge_inference_mb, o.forge_swap_method, o.forge_swap_location) for o in obs] == tried
    assert all(o.road is None and o.ok for o in obs)
    # The next plan uses the fastest (source tuning), and apply would write it.
    plan = json.loads(cli("plan", "--webui", str(forge.root), "--facts", str(facts), "--json").out)
    decided = {d["setting"]: d for d in plan["decisions"]}
    assert decided["forge_inference_memory"]["value"] == 1536 and decided["forge_inference_memory"]["source"] == "tuning"
    assert decided["forge_async_loading"]["value"] == "Async" and decided["forge.gpu_weights_mb"]["value"] == 8192 - 1536
    assert plan["offload"] == "none"  # a probe of Forge's settings never teaches the offload ladder


def test_the_chart_and_verdict_name_forges_settings(cli: Any, forge: ForgeApiUi, facts: Path) -> None:
    res = _tune(cli, forge, facts, "--max-candidates", "3")
    assert res.code == 0, res.err
    assert "per Forge candidate" in res.out and "◀ best" in res.out
    assert "best: Forge with inference memory 1536 MiB (GPU Weights = total − it), Swap Method Queue" in res.out
    assert "Forge's config.json (every option tune posted) are as they were before" in res.out
    assert len(forge.requests()) == 2 * 3  # --max-candidates bounds the sweep


def test_an_out_of_memory_candidate_stops_its_direction(cli: Any, tmp_path: Path, facts: Path) -> None:
    ui = make_forge_api_webui(tmp_path / "forge", config=USER, oom_below_mb=1000, optimum_mb=512)
    try:
        res = _tune(cli, ui, facts, "--json")
        assert res.code == 0, res.err
        probes = json.loads(res.out)["probes"]
        below = [p for p in probes if p["forge_inference_memory"] < 1024]
        assert len(below) == 1 and not below[0]["ok"] and "out of memory" in below[0]["reason"]
        obs = [o for o in load_observations(paths.observations_path(ui.root)).items if o.source == "tuning"]
        assert [o.ooms for o in obs if o.forge_inference_mb == 768] == [1]
        plan = json.loads(cli("plan", "--webui", str(ui.root), "--facts", str(facts), "--json").out)
        assert plan["offload"] == "none"  # the OOM of a settings probe is no reason to climb the ladder
    finally:
        ui.kill_all()


def test_ctrl_c_stops_forge_and_puts_config_back(forge: ForgeApiUi, facts: Path) -> None:
    forge.set_spec(best_sit=0.4)  # slow jobs: Ctrl-C lands mid-sweep
    before = _state(forge)
    proc = subprocess.Popen([sys.executable, "-m", "lowvram", "tune", "--webui", str(forge.root), "--facts",
                             str(facts), "--steps", "2", "--repeats", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(forge.requests()) < 2:
        time.sleep(0.1)
    assert forge.requests(), "tune reached Forge"
    assert (forge.root / "config.json").read_bytes() != before["config.json"]  # Forge saved tune's POSTs
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err.decode() and "config.json" in err.decode()
    assert forge.alive() == []
    assert _state(forge) == before


def test_values_forge_would_accept_unchecked_are_refused_here() -> None:
    for bad in (Knobs(-5), Knobs(1024, "Bogus"), Knobs(1024, "Queue", "GPU"), Knobs(9000)):
        with pytest.raises(TuneError):
            check_knobs(bad, 8192)
    check_knobs(Knobs(1024, "Async", "Shared"), 8192)


@pytest.mark.parametrize(("start", "total", "down", "up"), [
    (1024, 8192, [768, 512], [1536, 2048]),  # the plan's value is Forge's 1024: down to Forge's 512 floor
    (2048, 8192, [], [2560, 3072]),  # 2048 ÷ 1.1 → 1920 MiB is the estimate's own need: nothing below it
    (3072, 8192, [2816], [3584, 4096]),  # 3072 ÷ 1.1 → 2816 MiB: one step down, not two
    (1024, 1800, [768, 512], []),  # GPU Weights must keep 512 MiB
])
def test_the_inference_memory_candidates_follow_the_stated_rule(start: int, total: int, down: list[int],
                                                                 up: list[int]) -> None:
    assert inference_candidates(start, total) == (down, up)


def test_reforge_is_refused_with_the_reason(cli: Any, tmp_path: Path, facts: Path) -> None:
    ui = make_forge_api_webui(tmp_path / "reforge", config=USER)
    (ui.root / "modules_forge" / "forge_version.py").write_text("version = '1.0.0v2-v1.10.1RC'")
    before = _state(ui)
    res = cli("tune", "--webui", str(ui.root), "--facts", str(facts))
    assert res.code == 1 and "is reforge, which has no GPU Weights slider" in res.err and "Traceback" not in res.err
    assert ui.starts() == [] and _state(ui) == before


def test_a_candidate_equal_to_the_stored_value_is_still_made_live(cli: Any, forge: ForgeApiUi, facts: Path) -> None:
    # After an earlier tune (and `apply`), config.json stores 1536 and the plan starts from it. Forge with
    # --nowebui runs at its default 1024 whatever is stored, and skips a POST of the stored 1536: tune posts
    # another value first, so the job really runs at 1536.
    from tests.unit.test_forge_settings_apply import _tuned

    _tuned(forge.root, 1536, "Queue", "CPU", 1.0)
    res = _tune(cli, forge, facts, "--json", "--max-candidates", "1")
    assert res.code == 0, res.err
    assert [p["forge_inference_memory"] for p in json.loads(res.out)["probes"]] == [1536]
    assert {j["forge_inference_memory"] for j in forge.requests()} == {1536}


def test_forge_neo_is_refused_with_the_reason(cli: Any, tmp_path: Path, facts: Path) -> None:
    """Neo's memory management is ComfyUI's: posting forge_inference_memory to its options would change nothing."""
    ui = make_forge_api_webui(tmp_path / "neo", config=USER)
    (ui.root / "modules_forge" / "forge_version.py").write_text('version = "neo"\nrelease = "2.22"\n')
    before = _state(ui)
    res = cli("tune", "--webui", str(ui.root), "--facts", str(facts))
    assert res.code == 1 and "is forge-neo, which has no GPU Weights slider" in res.err
    assert "--reserve-vram" in res.err and "Traceback" not in res.err
    assert ui.starts() == [] and _state(ui) == before
