"""Which launcher a tree's webui.sh is (world/detect/launcher.py): read from its text, the flavor only where
the text says neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowvram.world.apply.webui_user import choose_target
from lowvram.world.detect.launcher import read_launcher, runs_webui_sh, style_of_text
from tests.fixtures.launchers import FAKE_WEBUI_SH
from tests.fixtures.neo_launcher import NEO_WEBUI_SH, make_neo_tree
from tests.fixtures.webui_trees import make_forge_lineage

# A1111 v1.8.0's webui.sh reads webui-user.sh from beside itself (its line, quoted as it is).
A1111_SOURCES = 'if [[ -f "$SCRIPT_DIR"/webui-user.sh ]]\nthen\n    source "$SCRIPT_DIR"/webui-user.sh\nfi\n'


@pytest.mark.parametrize(("text", "flavor", "style", "by"), [
    (A1111_SOURCES, "forge-neo", "a1111", "webui.sh"),  # the text wins over the flavor
    (FAKE_WEBUI_SH, "a1111", "a1111", "webui.sh"),
    (NEO_WEBUI_SH, "a1111", "settings", "webui.sh"),
    ("#!/bin/bash\n# source webui.settings.sh\necho stand-in\n", "forge", "a1111", "flavor"),  # a comment says nothing
    (None, "forge-neo", "settings", "flavor"),
    (None, "reforge", "a1111", "flavor"),
])
def test_style_of_text(text: str | None, flavor: str, style: str, by: str) -> None:
    launcher = style_of_text(text, flavor)
    assert (launcher.style, launcher.decided_by) == (style, by)


def test_the_block_goes_where_each_launcher_reads() -> None:
    assert style_of_text(A1111_SOURCES, None).block_file == "webui-user.sh"
    assert style_of_text(NEO_WEBUI_SH, None).block_file == "webui.settings.sh"


@pytest.mark.parametrize(("text", "runs", "passes"), [
    ('export COMMANDLINE_ARGS="--uv"\nexec "$(dirname "$0")/webui.sh"\n', True, False),
    ('"$SCRIPT_DIR/webui.sh" "$@"\n', True, True),
    ("./webui.sh $@\n", True, True),
    ("# exec ./webui.sh\necho run webui.sh\n", False, False),
    ('export COMMANDLINE_ARGS=""\n', False, False),
])
def test_runs_webui_sh(text: str, runs: bool, passes: bool) -> None:
    assert runs_webui_sh(text) == (runs, passes)


def test_choose_target_follows_the_trees_webui_sh(tmp_path: Path) -> None:
    neo = make_neo_tree(tmp_path / "neo")
    assert choose_target(neo, "linux", "forge-neo").path == neo / "webui.settings.sh"
    assert choose_target(neo, "linux", "forge").path == neo / "webui.settings.sh"  # its webui.sh says so
    assert choose_target(neo, "windows", "forge-neo").path.name == "webui.settings.bat"  # no webui-user.bat here
    forge = make_forge_lineage(tmp_path / "forge", "forge")
    assert choose_target(forge, "linux", "forge").path == forge / "webui-user.sh"


def test_an_unreadable_webui_sh_falls_back_on_the_flavor(tmp_path: Path) -> None:
    root = make_forge_lineage(tmp_path / "neo", "forge-neo")
    (root / "webui.sh").unlink()
    (root / "webui.sh").mkdir()  # a folder: never opened as a file
    assert read_launcher(root, "forge-neo").block_file == "webui.settings.sh"
    assert read_launcher(root, "forge").block_file == "webui-user.sh"
