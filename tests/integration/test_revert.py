"""`revert`: exactly what the manifest records comes out; what the user did since stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.core import markers
from lowvram.world import paths
from lowvram.world.apply import apply_plan, revert
from tests.fixtures.git_repos import Remotes, git, head_of, linux_facts, make_remotes, simple_plan, spec_for
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_SH, make_webui


@pytest.fixture
def remotes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Remotes:
    return make_remotes(tmp_path / "remotes", monkeypatch)


def test_user_edits_since_apply_stay(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w")
    apply_plan(simple_plan(), tree, linux_facts())
    path = tree / "webui-user.sh"
    edited = path.read_bytes().replace(b"#venv_dir=\"venv\"", b"venv_dir=\"-\"") + b"export MINE=1\n"
    path.write_bytes(edited)
    result = revert(tree)
    assert result.changes[0]["action"] == "modified"
    expected = STOCK_WEBUI_USER_SH.replace('#venv_dir="venv"', 'venv_dir="-"') + "export MINE=1\n"
    assert path.read_text() == expected


def test_a_created_file_is_deleted_unless_the_user_added_to_it(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh=None)
    apply_plan(simple_plan(), tree, linux_facts())
    assert (tree / "webui-user.sh").exists()
    assert revert(tree).changes[0]["action"] == "removed"
    assert not (tree / "webui-user.sh").exists()

    apply_plan(simple_plan(), tree, linux_facts())
    with (tree / "webui-user.sh").open("a") as fh:
        fh.write("export MINE=1\n")
    revert(tree)
    assert (tree / "webui-user.sh").read_text() == "export MINE=1\n"


def test_no_final_newline_comes_back_exactly(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w", webui_user_sh="#!/bin/bash\nexport COMMANDLINE_ARGS='--api'")
    apply_plan(simple_plan(), tree, linux_facts())
    apply_plan(simple_plan(args=("--lowvram",)), tree, linux_facts())  # re-applied with another plan
    revert(tree)
    assert (tree / "webui-user.sh").read_bytes() == b"#!/bin/bash\nexport COMMANDLINE_ARGS='--api'"


def test_extension_with_results_in_it_is_kept(tmp_path: Path, remotes: Remotes) -> None:
    tree = make_webui(tmp_path / "w")
    apply_plan(simple_plan(extensions=(spec_for(remotes.vram), spec_for(remotes.kitten))), tree, linux_facts())
    vram = tree / "extensions" / remotes.vram.dir
    (vram / "stats.json").write_text('{"txt2img": []}')  # hours of benchmark results (gitignored)
    kitten = tree / "extensions" / remotes.kitten.dir
    (kitten / "scripts" / "__pycache__").mkdir()
    (kitten / "scripts" / "__pycache__" / "giant-kitten.cpython-310.pyc").write_bytes(b"\0")  # the UI ran it
    result = revert(tree)
    by_name = {e["name"]: e for e in result.extensions}
    assert by_name["vram-estimator"]["status"] == "kept"
    assert "stats.json" in by_name["vram-estimator"]["reason"]
    assert (vram / "stats.json").read_text() == '{"txt2img": []}'
    assert by_name["giant-kitten"]["status"] == "removed"
    assert not kitten.exists()


def test_extension_moved_by_the_user_is_kept(tmp_path: Path, remotes: Remotes) -> None:
    tree = make_webui(tmp_path / "w")
    apply_plan(simple_plan(extensions=(spec_for(remotes.kitten),)), tree, linux_facts())
    kitten = tree / "extensions" / remotes.kitten.dir
    git("checkout", "-q", remotes.kitten.commits[-1], cwd=kitten)
    result = revert(tree)
    assert result.extensions[0]["status"] == "kept"
    assert kitten.is_dir()


def test_an_update_lowvram_made_is_moved_back(tmp_path: Path, remotes: Remotes) -> None:
    tree = make_webui(tmp_path / "w")
    kitten = tree / "extensions" / remotes.kitten.dir
    git("clone", "-q", remotes.kitten.url, str(kitten))
    apply_plan(simple_plan(extensions=(spec_for(remotes.kitten),)), tree, linux_facts(), update=True)
    assert head_of(kitten) == remotes.kitten.pin
    result = revert(tree)
    assert result.extensions[0]["status"] == "restored"
    assert head_of(kitten) == remotes.kitten.commits[-1]
    # back on the user's branch, not a detached HEAD (A1111's extension updater needs the branch)
    assert git("symbolic-ref", "--short", "HEAD", cwd=kitten) == "master"


def test_config_rewritten_by_the_ui_gets_the_name_back_and_keeps_new_keys(tmp_path: Path, remotes: Remotes) -> None:
    tree = make_webui(tmp_path / "w", config={"disabled_extensions": [remotes.kitten.dir, "other"]})
    apply_plan(simple_plan(extensions=(spec_for(remotes.kitten),)), tree, linux_facts())
    cfg = json.loads((tree / "config.json").read_text())
    assert cfg["disabled_extensions"] == ["other"]
    cfg["new_setting"] = 3  # A1111 saves its settings
    (tree / "config.json").write_text(json.dumps(cfg))
    revert(tree)
    after = json.loads((tree / "config.json").read_text())
    assert sorted(after["disabled_extensions"]) == sorted([remotes.kitten.dir, "other"])
    assert after["new_setting"] == 3


def test_hook_and_created_extensions_dir_go_away(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w")
    (tree / "extensions").rmdir()
    apply_plan(simple_plan(hook=True), tree, linux_facts())
    hook = tree / "extensions" / markers.HOOK_EXTENSION_DIR
    assert hook.is_dir()
    (hook / "scripts").mkdir(exist_ok=True)
    (hook / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (hook / "scripts" / "__pycache__" / "x.pyc").write_bytes(b"\0")
    revert(tree)
    assert not (tree / "extensions").exists()
    assert not paths.hook_config_path(tree).exists()


def test_revert_twice_and_revert_with_nothing_applied(cli, tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w")
    assert revert(tree).notes
    apply_plan(simple_plan(), tree, linux_facts())
    assert revert(tree).changes
    res = cli("revert", "--webui", str(tree))
    assert res.code == 0
    assert "nothing to revert" in res.out


@pytest.mark.parametrize("how", ["lost", "corrupt"])
def test_without_a_readable_manifest_the_block_still_comes_out(cli, tmp_path: Path, how: str) -> None:
    """The markers are unambiguous: a lost or unreadable manifest must not leave the plan in force."""
    tree = make_webui(tmp_path / "w")
    apply_plan(simple_plan(), tree, linux_facts())
    manifest = paths.manifest_path(tree)
    if how == "lost":
        manifest.unlink()
    else:
        manifest.write_text("{not json")
    res = cli("revert", "--webui", str(tree), "--json")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["changes"] == [{"path": str(tree / "webui-user.sh"), "action": "modified"}]
    assert (tree / "webui-user.sh").read_text() == STOCK_WEBUI_USER_SH
    assert any("manifest" in n for n in data["notes"])
