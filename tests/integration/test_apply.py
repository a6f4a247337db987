"""`apply_plan` and `lowvram apply`: block, hook, extensions; dry run; failures; disk errors."""

from __future__ import annotations

import errno
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lowvram.core import markers
from lowvram.core.errors import ApplyError, LockError
from lowvram.world import fsutil, paths
from lowvram.world.apply import apply_plan, check_applied, revert
from tests.fixtures.git_repos import (
    Remotes,
    linux_facts,
    make_remotes,
    simple_plan,
    spec_for,
    tree_snapshot,
)
from tests.fixtures.webui_trees import make_webui


@pytest.fixture
def remotes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Remotes:
    return make_remotes(tmp_path / "remotes", monkeypatch)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_webui(tmp_path / "webui", config={"disabled_extensions": ["stable-diffusion-webui-giant-kitten"]})


def _full_plan(remotes: Remotes, **kw: Any):  # type: ignore[no-untyped-def]
    return simple_plan(extensions=(spec_for(remotes.vram), spec_for(remotes.kitten)), hook=True, **kw)


def _no_temps(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if fsutil.TEMP_MARK in p.name]


def test_apply_then_revert_restores_the_tree_byte_for_byte(tree: Path, remotes: Remotes) -> None:
    before = tree_snapshot(tree)
    result = apply_plan(_full_plan(remotes), tree, linux_facts())
    assert result.exit_code == 0
    actions = {Path(c["path"]).name: c["action"] for c in result.changes}
    assert actions == {"webui-user.sh": "modified", markers.HOOK_EXTENSION_DIR: "created",
                       remotes.vram.dir: "created", remotes.kitten.dir: "created", "config.json": "modified"}
    assert (tree / "extensions" / markers.HOOK_EXTENSION_DIR).is_dir()
    cfg = json.loads(paths.hook_config_path(tree).read_text())
    assert cfg["schema"] == 1 and cfg["enabled"] is True
    assert json.loads((tree / "config.json").read_text())["disabled_extensions"] == []
    assert check_applied(tree) == []
    assert _no_temps(tree) == []

    again = apply_plan(_full_plan(remotes), tree, linux_facts())
    assert {c["action"] for c in again.changes} == {"unchanged"}
    assert {e["status"] for e in again.extensions} == {"up-to-date"}

    reverted = revert(tree)
    assert {e["status"] for e in reverted.extensions} == {"removed"}
    assert tree_snapshot(tree) == before
    assert not paths.manifest_path(tree).exists()


def test_unfetchable_extension_still_writes_the_block_and_exits_1(tree: Path, remotes: Remotes) -> None:
    from lowvram.core.plan import ExtensionSpec

    bad = ExtensionSpec(name="giant-kitten", url=str(tree.parent / "nowhere.git"), ref=remotes.kitten.pin,
                        dir=remotes.kitten.dir)
    result = apply_plan(simple_plan(extensions=(spec_for(remotes.vram), bad)), tree, linux_facts())
    assert result.exit_code == 1
    by_name = {e["name"]: e for e in result.extensions}
    assert by_name["giant-kitten"]["status"] == "failed"
    assert "cannot clone" in by_name["giant-kitten"]["reason"]
    assert by_name["vram-estimator"]["status"] == "installed"
    assert markers.BLOCK_BEGIN in (tree / "webui-user.sh").read_text()
    assert not (tree / "extensions" / remotes.kitten.dir).exists()


def test_dry_run_changes_nothing_and_shows_the_diff(tree: Path, remotes: Remotes, lowvram_home: Path) -> None:
    before = tree_snapshot(tree)
    result = apply_plan(_full_plan(remotes), tree, linux_facts(), dry_run=True)
    assert tree_snapshot(tree) == before
    assert not paths.manifest_path(tree).exists()
    assert "+export COMMANDLINE_ARGS=" in result.diff
    assert {e["status"] for e in result.extensions} == {"installed"}
    assert all("dry run" in e["reason"] for e in result.extensions)


def test_comfyui_gets_nothing_written(tmp_path: Path, remotes: Remotes) -> None:
    comfy = make_webui(tmp_path / "comfy", flavor="comfyui")
    before = tree_snapshot(comfy)
    result = apply_plan(_full_plan(remotes, ui="comfyui"), comfy, linux_facts())
    assert result.changes == [] and result.exit_code == 0
    assert "ComfyUI" in result.notes[0]
    assert tree_snapshot(comfy) == before


def test_forge_gets_the_block_but_no_hook_and_no_vram_estimator(tmp_path: Path, remotes: Remotes) -> None:
    forge = make_webui(tmp_path / "forge", flavor="forge")
    result = apply_plan(_full_plan(remotes, ui="forge"), forge, linux_facts())
    assert markers.BLOCK_BEGIN in (forge / "webui-user.sh").read_text()
    assert not (forge / "extensions" / markers.HOOK_EXTENSION_DIR).exists()
    by_name = {e["name"]: e for e in result.extensions}
    assert by_name["vram-estimator"]["status"] == "skipped"
    assert "LOWVRAM_CONFIG" not in (forge / "webui-user.sh").read_text()


def test_apply_refuses_while_another_lowvram_holds_the_lock(tree: Path) -> None:
    with fsutil.webui_lock(paths.lock_path(tree.resolve())):
        with pytest.raises(LockError):
            apply_plan(simple_plan(), tree, linux_facts())
        # launch holds the lock itself and says so
        apply_plan(simple_plan(), tree, linux_facts(), lock_held=True)
    assert markers.BLOCK_BEGIN in (tree / "webui-user.sh").read_text()


def test_check_applied_reports_what_went_missing(tree: Path, remotes: Remotes) -> None:
    apply_plan(_full_plan(remotes), tree, linux_facts())
    (tree / "webui-user.sh").write_text("# reset by a UI update\n")
    fsutil.remove_tree(tree / "extensions" / markers.HOOK_EXTENSION_DIR)
    fsutil.remove_tree(tree / "extensions" / remotes.kitten.dir)
    problems = check_applied(tree)
    assert any("no longer holds lowvram's managed block" in p for p in problems)
    assert any("hook extension" in p for p in problems)
    assert any("giant-kitten" in p for p in problems)
    assert len(problems) == 3


def test_check_applied_reads_an_unreadable_manifest_without_touching_it(tree: Path) -> None:
    """doctor never writes lowvram's state: a broken manifest is reported, not moved aside."""
    apply_plan(simple_plan(), tree, linux_facts())
    manifest = paths.manifest_path(tree)
    manifest.write_text("{truncated")
    problems = check_applied(tree)
    assert len(problems) == 1 and "unreadable" in problems[0]
    assert manifest.read_text() == "{truncated"
    assert not manifest.with_name("manifest.broken.json").exists()


@pytest.mark.parametrize(("err", "words"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "cannot write"),
                                            (errno.EACCES, "cannot write")])
def test_disk_errors_leave_the_file_as_it_was(tree: Path, monkeypatch: pytest.MonkeyPatch, err: int,
                                              words: str) -> None:
    original = (tree / "webui-user.sh").read_bytes()
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "webui-user.sh":
            raise OSError(err, os.strerror(err))
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing_replace)
    with pytest.raises(ApplyError) as info:
        apply_plan(simple_plan(), tree, linux_facts())
    assert words in info.value.message
    assert info.value.hint
    assert (tree / "webui-user.sh").read_bytes() == original
    assert _no_temps(tree) == []
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    # the manifest was written first; revert with nothing applied leaves the file alone
    revert(tree)
    assert (tree / "webui-user.sh").read_bytes() == original


def test_disk_full_while_writing_the_manifest_touches_nothing(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = tree_snapshot(tree)
    real_open = os.open

    def full_disk(path: Any, flags: int, mode: int = 0o777) -> int:
        if "manifest.json" in str(path) or "webui-user.sh.orig" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, flags, mode)

    monkeypatch.setattr(fsutil.os, "open", full_disk)
    with pytest.raises(ApplyError, match="no space left"):
        apply_plan(simple_plan(), tree, linux_facts())
    assert tree_snapshot(tree) == before


# --------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def stub_planner(monkeypatch: pytest.MonkeyPatch, remotes: Remotes):  # type: ignore[no-untyped-def]
    """The planner's contract (make_plan → PlanContext), standing in so the CLI is tested on its own."""
    calls: list[dict[str, Any]] = []

    def make_plan(*, webui: Path | None, facts_file: Path | None, overrides: Any) -> Any:
        calls.append({"webui": webui, "facts_file": facts_file, "overrides": overrides})
        plan = simple_plan(extensions=(spec_for(remotes.kitten),), hook=True)
        return types.SimpleNamespace(plan=plan, facts=linux_facts(), webui=webui, from_facts_file=facts_file is not None)

    module = types.ModuleType("lowvram.world.plan_inputs")
    module.make_plan = make_plan  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lowvram.world.plan_inputs", module)
    return calls


def test_cli_apply_json_contract_and_remembered_profile(cli, tree: Path, stub_planner: list) -> None:  # type: ignore[type-arg]
    from lowvram.world import state

    res = cli("apply", "--webui", str(tree), "--profile", "gtx1070-sdxl", "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert next(iter(data)) == "schema" and data["schema"] == 1
    assert {"plan", "changes", "extensions"} <= set(data)
    assert data["plan"]["profile"] == "test"
    assert all(set(c) == {"path", "action"} for c in data["changes"])
    assert {"name", "dir", "url", "ref", "status", "reason"} <= set(data["extensions"][0])
    assert stub_planner[0]["overrides"].profile == "gtx1070-sdxl"
    assert state.remembered_profile(tree) == "gtx1070-sdxl"

    rv = cli("revert", "--webui", str(tree), "--json")
    assert rv.code == 0
    rdata = json.loads(rv.out)
    assert next(iter(rdata)) == "schema"
    assert {"changes", "extensions"} <= set(rdata)


def test_cli_apply_json_failed_extension_carries_the_error(cli, tree: Path, stub_planner: list,  # type: ignore[type-arg]
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "empty-mirror"))  # the extension cannot be fetched
    res = cli("apply", "--webui", str(tree), "--json")
    assert res.code == 1
    data = json.loads(res.out)
    assert data["extensions"][0]["status"] == "failed"
    assert "could not be installed" in data["error"]["message"] and data["error"]["hint"]
    assert markers.BLOCK_BEGIN in (tree / "webui-user.sh").read_text()
    assert "error:" in res.err


def test_cli_apply_dry_run_prints_the_diff(cli, tree: Path, stub_planner: list) -> None:  # type: ignore[type-arg]
    before = tree_snapshot(tree)
    res = cli("apply", "--webui", str(tree), "--dry-run")
    assert res.code == 0, res.err
    assert "+# >>> lowvram managed block" in res.out
    assert "giant-kitten" in res.out
    assert tree_snapshot(tree) == before


def test_cli_apply_with_facts_remembers_nothing(cli, tree: Path, stub_planner: list, tmp_path: Path) -> None:  # type: ignore[type-arg]
    from lowvram.world import state

    facts = tmp_path / "facts.json"
    facts.write_text("{}")
    res = cli("apply", "--webui", str(tree), "--profile", "x", "--facts", str(facts))
    assert res.code == 0, res.err
    assert state.remembered_profile(tree) is None
    assert paths.manifest_path(tree).exists()  # revert still works


def test_cli_disk_full_is_one_line_and_a_hint(cli, tree: Path, stub_planner: list,  # type: ignore[type-arg]
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "webui-user.sh":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", failing_replace)
    res = cli("apply", "--webui", str(tree))
    assert res.code == 1
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert lines[0].startswith("error: no space left on the disk while writing")
    assert lines[1].startswith("hint:")
    assert "Traceback" not in res.err


def test_apply_on_comfyui_says_what_it_did_instead_of_an_empty_list(cli: Any, tmp_path: Path) -> None:
    """issue 19: ComfyUI has no webui-user file; `apply` printed a header over an empty list."""
    comfy = make_webui(tmp_path / "ComfyUI", flavor="comfyui")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({
        "system": {"os": "linux", "ram_mb": 32768, "wsl": False},
        "gpus": [{"index": 0, "uuid": "GPU-1", "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192,
                  "vram_free_mb": 7800, "driver": "546.01", "cuda_driver": "12.3", "compute_capability": "6.1"}],
    }))
    before = tree_snapshot(comfy)
    for dry in ((), ("--dry-run",)):
        result = cli("apply", *dry, "--webui", str(comfy), "--facts", str(facts), "--model", "sdxl")
        assert result.code == 0, result.err
        plan = json.loads(cli("plan", "--json", "--webui", str(comfy), "--facts", str(facts), "--model", "sdxl").out)
        lines = result.out.strip().splitlines()
        assert len(lines) >= 2, result.out
        said = " ".join(result.out.split())
        assert "ComfyUI has no webui-user file, so nothing is written into the tree;" in said
        if plan["args"]:
            assert f"`lowvram launch` puts the flags on main.py's command line: {' '.join(plan['args'])}" in said
        else:  # on this Pascal card ComfyUI needs none (its VAE is fp32 there by itself; no reserve without evidence)
            assert "this plan adds no flags to main.py's command line" in said
    assert "nothing to write" in cli("apply", "--webui", str(comfy), "--facts", str(facts), "--model", "sdxl").out
    data = json.loads(cli("apply", "--json", "--webui", str(comfy), "--facts", str(facts), "--model", "sdxl").out)
    assert data["changes"] == [] and data["plan"]["ui"] == "comfyui"  # JSON: unchanged
    assert tree_snapshot(comfy) == before
