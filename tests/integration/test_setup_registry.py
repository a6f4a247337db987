"""lowvram/data/uis.json: every UI has what setup needs, and bad registries fail in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lowvram.core.errors import UsageError
from lowvram.world import setup_ui

SHA = re.compile(r"^[0-9a-f]{40}$")


def test_every_ui_is_pinned_with_a_reason() -> None:
    registry = setup_ui.load_registry()
    assert set(registry.uis) == set(setup_ui.UI_KEYS)
    for key, spec in registry.uis.items():
        assert spec.url.startswith("https://github.com/") and spec.url.endswith(".git"), key
        assert spec.tag or spec.commit, key
        if spec.commit is not None:
            assert SHA.match(spec.commit), key
        else:
            assert spec.commit_verified is False, f"{key}: an unknown commit cannot be verified"
        assert len(spec.why) > 40, key
        assert spec.folder and "/" not in spec.folder, key
        assert spec.clone_mb > 0 and spec.python_supported, key
        assert spec.first_start, key
        assert all(d.download_mb > 0 and d.disk_mb > 0 for d in spec.first_start), key
        assert all(d.when in (None, "no-torch", "no-torch-cpu", "no-torch-cu126", "xformers", "no-checkpoint")
                   for d in spec.first_start), key
        # Without an NVIDIA GPU the first start installs torch's CPU build: a much smaller download.
        cuda = [d for d in spec.first_start if d.when == "no-torch"]
        cpu = [d for d in spec.first_start if d.when == "no-torch-cpu"]
        assert len(cuda) == 1 and len(cpu) == 1 and cpu[0].download_mb * 5 < cuda[0].download_mb, key


def test_a1111_pins_v1_10_1() -> None:
    spec = setup_ui.ui_spec("a1111")
    assert spec.tag == "v1.10.1"
    assert spec.commit == "82a973c04367123ae98bd9abdf80d9eda9b910e2"
    assert spec.pin == "v1.10.1"
    assert spec.folder == "stable-diffusion-webui"
    # The model A1111's first start downloads only when there is none.
    assert any(d.when == "no-checkpoint" for d in spec.first_start)


def test_forge_pins_a_commit_because_it_has_no_release_tags() -> None:
    spec = setup_ui.ui_spec("forge")
    assert spec.tag is None
    assert spec.pin == spec.commit


def test_unknown_ui_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown UI 'invoke'"):
        setup_ui.ui_spec("invoke")


def test_a_broken_registry_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "uis.json"
    bad.write_text(json.dumps({"schema": 1, "uis": {"a1111": {"name": "x"}}}))
    with pytest.raises(setup_ui.SetupError, match=r"UI registry .* is unreadable"):
        setup_ui.load_registry(bad)


def test_the_registry_is_shipped_in_the_package() -> None:
    from lowvram.world import paths

    assert paths.data_file("uis.json").is_file()


def test_sdnext_records_the_oldest_gpu_its_torch_runs_on() -> None:
    spec = setup_ui.ui_spec("sdnext")
    assert spec.min_cc == (7, 5)
    assert "TORCH_COMMAND" in spec.min_cc_why
    assert setup_ui.ui_spec("a1111").min_cc is None
