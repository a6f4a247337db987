"""`lowvram reserve`: manual readings, the formula with its numbers, the tuning state, the JSON contract."""

from __future__ import annotations

import json

import pytest

from lowvram.core.observations import Observation
from lowvram.world import paths
from lowvram.world.observation_log import append_observation, load_observations
from tests.fixtures.webui_trees import make_webui

GTX1070_WINDOWS = {
    "system": {"os": "windows", "os_version": "10.0.19045", "ram_mb": 32768, "swap_mb": 0, "wsl": False,
               "sysmem_fallback": "unknown"},
    "gpus": [{"index": 0, "uuid": "GPU-1070", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
              "vram_free_mb": 7800, "driver": "546.01", "cuda_driver": "12.3", "compute_capability": "6.1"}],
}

CONTRACT = {"schema", "reserve_mb", "free_dedicated_mb", "overflow_mb", "source", "observations", "clamped_by",
            "tuning"}


@pytest.fixture
def tree(tmp_path, monkeypatch):
    root = make_webui(tmp_path / "stable-diffusion-webui")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(GTX1070_WINDOWS))
    monkeypatch.setenv("LOWVRAM_FACTS", str(facts))
    monkeypatch.chdir(tmp_path)
    return root


def reserve_json(cli, *args: str) -> dict:
    result = cli("reserve", "--json", *args)
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_the_issue_check_add_600_and_1000_then_1600_from_observations(cli, tree) -> None:
    added = cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000", "--webui", str(tree))
    assert added.code == 0, added.err
    assert "WebUI-wide" in added.out and "1600 MiB" in added.out
    data = reserve_json(cli, "--webui", str(tree))
    assert next(iter(data)) == "schema" and set(data) >= CONTRACT
    assert data["reserve_mb"] == 1600 and data["source"] == "observations"
    assert (data["free_dedicated_mb"], data["overflow_mb"], data["observations"]) == (600, 1000, 1)
    assert data["clamped_by"] is None
    assert set(data["tuning"]) >= {"best", "probes", "closed", "next_candidate"}
    saved = load_observations(paths.observations_path(tree)).items
    assert len(saved) == 1 and saved[0].source == "manual" and saved[0].checkpoint is None
    assert saved[0].driver == "546.01" and saved[0].vram_total_mb == 8192


def test_nothing_recorded_yet_is_zero_and_learning(cli, tree) -> None:
    data = reserve_json(cli, "--webui", str(tree))
    assert (data["reserve_mb"], data["source"], data["observations"]) == (0, "none", 0)
    text = cli("reserve", "--webui", str(tree))
    assert text.code == 0 and "learning" in text.out


def test_the_human_view_shows_the_formula_with_its_numbers(cli, tree) -> None:
    cli("reserve", "--add", "--free-mb", "650", "--overflow-mb", "1000", "--webui", str(tree))
    out = cli("reserve", "--webui", str(tree)).out
    assert "free 650 MiB + overflow 1000 MiB = 1650 MiB" in out
    assert "→ 1600 MiB" in out
    assert "(WebUI-wide)" in out


def test_a_reading_for_one_checkpoint_counts_for_it_only(cli, tree) -> None:
    add = cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000",
              "--checkpoint", "sd_xl_base_1.0.safetensors", "--webui", str(tree), "--json")
    assert add.code == 0, add.err
    key = json.loads(add.out)["added"]["checkpoint"]
    assert key.startswith("sd_xl_base_1.0.safetensors|")
    assert reserve_json(cli, "--webui", str(tree))["reserve_mb"] == 1600  # the selected checkpoint
    other = tree / "models" / "Stable-diffusion" / "v1-5.safetensors"
    other.write_bytes(b"\0" * 64)
    data = reserve_json(cli, "--webui", str(tree), "--checkpoint", "v1-5.safetensors")
    assert data["reserve_mb"] == 0 and data["source"] == "none"


def test_an_unknown_checkpoint_for_add_is_one_clear_error(cli, tree) -> None:
    result = cli("reserve", "--add", "--free-mb", "1", "--overflow-mb", "1", "--checkpoint", "nope.safetensors",
                 "--webui", str(tree))
    assert result.code == 1
    assert "nope.safetensors" in result.err and "hint:" in result.err and "Traceback" not in result.err
    assert not paths.observations_path(tree).exists()


def test_clamped_by_the_card(cli, tree) -> None:
    data = json.loads(cli("reserve", "--add", "--free-mb", "7000", "--overflow-mb", "4000", "--webui", str(tree),
                          "--json").out)
    assert data["clamped_by"] == "vram_total"
    assert data["reserve_mb"] <= 8192 - 256 and data["reserve_mb"] % 64 == 0


@pytest.mark.parametrize("args", [("--free-mb", "600"), ("--add", "--free-mb", "600"), ("--sit", "2")])
def test_misused_options_are_usage_errors(cli, tree, args) -> None:
    result = cli("reserve", *args, "--webui", str(tree))
    assert result.code == 2 and "Traceback" not in result.err


def test_negative_readings_are_refused_by_the_parser(cli, tree) -> None:
    result = cli("reserve", "--add", "--free-mb", "-5", "--overflow-mb", "0", "--webui", str(tree))
    assert result.code == 2


def test_no_webui_is_one_line_with_a_hint(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("reserve", "--json")
    assert result.code == 1
    assert json.loads(result.out)["error"]["hint"]
    assert "no WebUI found" in result.err


def test_a_corrupt_line_is_a_warning_and_the_rest_counts(cli, tree) -> None:
    path = paths.observations_path(tree)
    append_observation(path, Observation(time=1, source="manual", free_mb=600, overflow_mb=1000))
    with open(path, "ab") as fh:
        fh.write(b'{"time": 2, "source": "manual", "free_mb": \n')
    result = cli("reserve", "--webui", str(tree))
    assert result.code == 0 and "line 2" in result.err
    data = reserve_json(cli, "--webui", str(tree))
    assert data["reserve_mb"] == 1600 and any("line 2" in w for w in data["warnings"])


def test_tuning_results_show_and_win(cli, tree) -> None:
    from lowvram.world.detect.webui import probe_webui

    key = probe_webui(tree).checkpoint_key
    path = paths.observations_path(tree)
    for t, reserve, sit in [(1, 0, 3.0), (2, 1600, 2.2), (3, 1088, 1.8), (4, 832, 2.1), (5, 1344, 2.0),
                            (6, 1216, 1.9), (7, 960, 1.95)]:
        append_observation(path, Observation(time=t, source="tuning", checkpoint=key, road="resident", layout=True,
                                             reserve_mb=reserve, free_mb=600, overflow_mb=1000, sit=sit,
                                             width=1024, height=1024, driver="546.01"))
    data = reserve_json(cli, "--webui", str(tree))
    assert data["source"] == "tuning" and data["reserve_mb"] == 1088
    assert data["tuning"]["closed"] is True
    assert data["tuning"]["best"] == {"road": "resident", "reserve_mb": 1088, "sit": 1.8}
    out = cli("reserve", "--webui", str(tree)).out
    assert "closed" in out and "1088" in out
    assert "closed: closed" not in out, out  # the state is said once


def test_a_checkpoint_named_as_the_ui_lists_it_with_its_hash_is_found(cli, tree) -> None:
    """A1111's checkpoint list shows `name [hash]`; the hint says to give the name as the UI lists it."""
    add = cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000",
              "--checkpoint", "sd_xl_base_1.0.safetensors [31e35c80fc]", "--webui", str(tree), "--json")
    assert add.code == 0, add.err
    assert json.loads(add.out)["added"]["checkpoint"].startswith("sd_xl_base_1.0.safetensors|")


def test_a_checkpoint_under_the_users_ckpt_dir_is_found(cli, tree, tmp_path, monkeypatch) -> None:
    elsewhere = tmp_path / "my-models"
    elsewhere.mkdir()
    (elsewhere / "juggernaut.safetensors").write_bytes(b"\0" * 32)
    (tree / "webui-user.sh").write_text(f'export COMMANDLINE_ARGS="--ckpt-dir {elsewhere}"\n')
    linux = {**GTX1070_WINDOWS, "system": {**GTX1070_WINDOWS["system"], "os": "linux"}}
    facts = tmp_path / "linux.json"
    facts.write_text(json.dumps(linux))
    monkeypatch.setenv("LOWVRAM_FACTS", str(facts))
    add = cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000",
              "--checkpoint", "juggernaut.safetensors", "--webui", str(tree), "--json")
    assert add.code == 0, add.err
    assert json.loads(add.out)["added"]["checkpoint"] == f"juggernaut.safetensors|32|{int((elsewhere / 'juggernaut.safetensors').stat().st_mtime)}"
