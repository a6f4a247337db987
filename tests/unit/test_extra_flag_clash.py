"""A plan flag and the user's own flag after `launch --` from one mutually exclusive group (issue 19).

ComfyUI `--lowvram` with `--cpu`, Forge `--always-low-vram` with `--always-cpu`: both on the UI's
command line made it exit 2 (argparse: "not allowed with argument"). The same clash in
COMMANDLINE_ARGS was already resolved; now the `--` flags are too: the user's flag wins, the plan's
is left out of the command line (and of the plan in `launch --dry-run --json`), one warning says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.faults import GTX1650_LINUX
from tests.fixtures.webui_trees import make_webui

CASES = {
    # ui: (tree flavor, the plan's flag, the user's flag after --, more planning options)
    "comfyui": ("comfyui", "--lowvram", "--cpu", ("--offload", "lowvram")),
    "forge": ("forge", "--always-low-vram", "--always-cpu", ("--offload", "lowvram")),
}


@pytest.fixture
def facts_file(tmp_path: Path) -> Path:
    path = tmp_path / "gtx1650.json"
    path.write_text(json.dumps(GTX1650_LINUX))
    return path


def dry_run(cli: Any, tmp_path: Path, facts_file: Path, ui: str, *extra: str, as_json: bool = True,
            profile: str | None = None) -> Any:
    flavor, _plan_flag, _user_flag, more = CASES[ui]
    tree = tmp_path / ui
    if not tree.exists():
        make_webui(tree, flavor=flavor, version="0.3.64" if flavor == "comfyui" else "f2.0.1v1.10.1")
    args = ["launch", "--dry-run", *(["--json"] if as_json else []), "--webui", str(tree), "--facts", str(facts_file),
            "--model", "sdxl", *more, *(["--profile", profile] if profile else [])]
    return cli(*args, *(["--", *extra] if extra else []))


@pytest.mark.parametrize("ui", sorted(CASES))
def test_the_users_flag_after_dashdash_wins_and_the_plans_is_left_out(cli: Any, tmp_path: Path, facts_file: Path,
                                                                      ui: str) -> None:
    _flavor, plan_flag, user_flag, _more = CASES[ui]
    plain = dry_run(cli, tmp_path, facts_file, ui)
    assert plain.code == 0, plain.err
    assert plan_flag in json.loads(plain.out)["args"]  # what the plan would pass without the user's flag

    result = dry_run(cli, tmp_path, facts_file, ui, user_flag)
    assert result.code == 0, result.err
    data = json.loads(result.out)
    argv = data["launch"]["argv"]
    assert user_flag in argv and plan_flag not in argv
    assert plan_flag not in data["args"] and data["plan_args_dropped"] == [plan_flag]
    if ui == "forge":  # webui.sh reads the block's COMMANDLINE_ARGS: it must not carry the plan's flag either
        assert plan_flag not in data["env"].get("COMMANDLINE_ARGS", "")
    said = [w for w in data["warnings"] if user_flag in w and plan_flag in w]
    assert said == [f"your {user_flag} (after --) contradicts the plan's {plan_flag}: kept yours and left the "
                    "plan's out of the command line"]


@pytest.mark.parametrize("ui", sorted(CASES))
def test_the_human_dry_run_says_it_in_one_line(cli: Any, tmp_path: Path, facts_file: Path, ui: str) -> None:
    _flavor, plan_flag, user_flag, _more = CASES[ui]
    result = dry_run(cli, tmp_path, facts_file, ui, user_flag, as_json=False)
    assert result.code == 0, result.err
    command = next(line for line in result.out.splitlines() if line.startswith("command"))
    assert user_flag in command.split() and plan_flag not in command.split()
    lines = [line for line in result.err.splitlines() if "(after --)" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: your " + user_flag)


def test_a_valued_flag_after_dashdash_replaces_the_plans(cli: Any, tmp_path: Path, facts_file: Path,
                                                         lowvram_home: Path) -> None:
    (lowvram_home / "profiles").mkdir(parents=True, exist_ok=True)
    (lowvram_home / "profiles" / "with-reserve.yaml").write_text(
        'description: a profile that passes a valued flag\nextends: gtx1650-sdxl\nargs: ["--reserve-vram", "0.5"]\n')
    plain = json.loads(dry_run(cli, tmp_path, facts_file, "comfyui", as_json=True, profile="with-reserve").out)
    assert plain["args"][-2:] == ["--reserve-vram", "0.5"]
    result = dry_run(cli, tmp_path, facts_file, "comfyui", "--reserve-vram", "1.5", profile="with-reserve")
    assert result.code == 0, result.err
    argv = json.loads(result.out)["launch"]["argv"]
    assert argv.count("--reserve-vram") == 1 and argv[argv.index("--reserve-vram") + 1] == "1.5"


def test_flags_that_do_not_clash_are_all_kept(cli: Any, tmp_path: Path, facts_file: Path) -> None:
    result = dry_run(cli, tmp_path, facts_file, "comfyui", "--port", "8190")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert "--lowvram" in data["launch"]["argv"] and data["launch"]["argv"][-2:] == ["--port", "8190"]
    assert data["plan_args_dropped"] == [] and not [w for w in data["warnings"] if "(after --)" in w]
