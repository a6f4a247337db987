"""WebUI trees of each flavor: flavor, version, venv, torch/xformers, checkpoint, user flags."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowvram.core import markers
from lowvram.core.errors import WebuiError
from lowvram.world.detect import webui
from tests.fixtures.safetensors import write_checkpoint
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT, STOCK_WEBUI_USER_SH, make_webui


@pytest.mark.parametrize("flavor", ["a1111", "forge", "sdnext", "comfyui"])
def test_each_flavor_is_told_apart(tmp_path: Path, flavor: str) -> None:
    root = make_webui(tmp_path / flavor, flavor=flavor)
    assert webui.detect_flavor(root) == flavor
    facts = webui.probe_webui(root, os_name="linux")
    assert facts.flavor == flavor
    assert facts.path == str(root.resolve())
    assert facts.torch == "2.1.2+cu121" and facts.torch_cuda == "12.1"
    assert facts.xformers == "0.0.23.post1"
    assert facts.python == str(root.resolve() / "venv" / "bin" / "python")


def test_a1111_full_reading(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", version="1.8.0-RC", config={"batch_cond_uncond": False,
                                                                "disabled_extensions": ["sd-webui-foo"]})
    (root / "extensions" / "sd-webui-foo").mkdir()
    (root / "extensions" / "a1111-sd-webui-vram-estimator").mkdir()
    f = webui.probe_webui(root, os_name="linux")
    assert f.version == "1.8.0-RC"
    assert f.checkpoint == "sd_xl_base_1.0.safetensors"
    assert f.checkpoint_path == str(root.resolve() / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors")
    assert f.model_family == "sdxl"
    st = Path(f.checkpoint_path).stat()
    assert f.checkpoint_key == markers.checkpoint_key("sd_xl_base_1.0.safetensors", st.st_size, st.st_mtime)
    assert f.batch_cond_uncond is False
    assert f.extensions == ("a1111-sd-webui-vram-estimator", "sd-webui-foo")
    assert f.disabled_extensions == ("sd-webui-foo",)
    assert f.user_args is None and f.user_args_literal  # the stock webui-user.sh sets nothing


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl", "sdxl-refiner"])
def test_model_family_of_the_selected_checkpoint(tmp_path: Path, family: str) -> None:
    root = make_webui(tmp_path / "sd", family=family, checkpoint=f"{family}.safetensors")
    assert webui.probe_webui(root, os_name="linux").model_family == family


def test_not_a_webui(tmp_path: Path) -> None:
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "main.py").write_text("")
    with pytest.raises(WebuiError) as err:
        webui.probe_webui(tmp_path / "random")
    assert err.value.message == f"{tmp_path / 'random'} is not a Stable Diffusion WebUI"
    assert "webui.sh" in err.value.hint
    with pytest.raises(WebuiError, match="does not exist"):
        webui.probe_webui(tmp_path / "nowhere")


def test_sdnext_needs_a_launcher_not_just_installer_py(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "installer.py").write_text("")
    assert webui.detect_flavor(tmp_path / "x") is None


def test_bad_config_json_is_read_past_as_the_ui_defaults(tmp_path: Path) -> None:
    """A1111 moves a config.json it cannot load to tmp/config.json and starts with its defaults."""
    root = make_webui(tmp_path / "sd", config={"batch_cond_uncond": False})
    (root / "config.json").write_text('{"sd_model_checkpoint": "x", "batch_cond_uncond": false,,}')
    f = webui.probe_webui(root, os_name="linux")
    assert f.config_error is not None and "config.json is not valid JSON (line 1" in f.config_error
    assert "tmp/config.json" in f.config_error
    assert f.batch_cond_uncond is True and f.checkpoint == "sd_xl_base_1.0.safetensors"  # the defaults
    with pytest.raises(webui.ConfigDamagedError) as err:
        webui.read_config(root / "config.json")
    assert "move it away" in err.value.hint
    (root / "config.json").write_text("[1, 2]")
    f = webui.probe_webui(root, os_name="linux")
    assert f.config_error is not None and "not an object of settings" in f.config_error


def test_unreadable_config_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_webui(tmp_path / "sd")
    real = os.open

    def deny(path: str, flags: int, *args: int) -> int:  # root reads anything: refuse the open itself
        if os.fspath(path).endswith("config.json"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(WebuiError, match=r"cannot read .*config\.json: Permission denied"):
        webui.probe_webui(root, os_name="linux")


def test_missing_config_is_a_fresh_install(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd")
    (root / "config.json").unlink()
    f = webui.probe_webui(root, os_name="linux")
    assert f.batch_cond_uncond is True
    assert f.checkpoint == "sd_xl_base_1.0.safetensors"  # the first one A1111 lists


def test_truncated_selected_checkpoint_is_read_past_with_its_error(tmp_path: Path) -> None:
    """A damaged header is an optional input: the family is unknown and the error kept for the warning."""
    root = make_webui(tmp_path / "sd")
    ckpt = root / "models" / "Stable-diffusion" / "sd_xl_base_1.0.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:30])
    f = webui.probe_webui(root, os_name="linux")
    assert f.model_family == "unknown" and f.checkpoint_path == str(ckpt)
    assert f.checkpoint_error is not None and "truncated" in f.checkpoint_error and str(ckpt) in f.checkpoint_error


def test_selection_missing_falls_back_like_a1111(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", config={"sd_model_checkpoint": "gone.safetensors [0123456789]"})
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint == "sd_xl_base_1.0.safetensors" and f.model_family == "sdxl"


def test_selection_in_a_subfolder_and_ckpt_dir(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", family=None)
    write_checkpoint(root / "models" / "Stable-diffusion" / "SD15" / "v1-5.safetensors", "sd15")
    (root / "config.json").write_text(json.dumps({"sd_model_checkpoint": "SD15\\v1-5.safetensors [6ce0161689]"}))
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint == "SD15/v1-5.safetensors" and f.model_family == "sd15"

    elsewhere = tmp_path / "models"
    write_checkpoint(elsewhere / "refiner.safetensors", "sdxl-refiner")
    (root / "config.json").write_text(json.dumps({"sd_model_checkpoint": "refiner.safetensors"}))
    (root / "webui-user.sh").write_text(STOCK_WEBUI_USER_SH + f'export COMMANDLINE_ARGS="--ckpt-dir {elsewhere}"\n')
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint_path == str(elsewhere / "refiner.safetensors") and f.model_family == "sdxl-refiner"


def test_ckpt_flag_wins(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd")
    write_checkpoint(tmp_path / "mine.safetensors", "sd2")
    (root / "webui-user.sh").write_text(f"export COMMANDLINE_ARGS='--ckpt {tmp_path / 'mine.safetensors'}'\n")
    assert webui.probe_webui(root, os_name="linux").model_family == "sd2"


def test_ckpt_pickle_family_unknown(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", family=None)
    (root / "models" / "Stable-diffusion" / "old.ckpt").write_bytes(b"\x80\x04not really")
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint == "old.ckpt" and f.model_family == "unknown"


def test_no_checkpoint_at_all(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", family=None)
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint is None and f.model_family is None and f.checkpoint_key is None


def test_data_dir_moves_config_and_extensions(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", family=None)
    data = tmp_path / "data"
    write_checkpoint(data / "models" / "Stable-diffusion" / "x.safetensors", "sd15")
    (data / "extensions" / "ext1").mkdir(parents=True)
    (data / "config.json").write_text(json.dumps({"batch_cond_uncond": False}))
    (root / "webui-user.sh").write_text(f'export COMMANDLINE_ARGS="--data-dir {data} --xformers"\n')
    f = webui.probe_webui(root, os_name="linux")
    assert f.batch_cond_uncond is False and f.extensions == ("ext1",) and f.model_family == "sd15"




def test_data_dir_hides_the_trees_own_models_as_a1111_does(tmp_path: Path) -> None:
    """With --data-dir, A1111 lists <data>/models/Stable-diffusion only: a checkpoint left in the tree's
    own models/ is not what it loads."""
    root = make_webui(tmp_path / "sd", family="sdxl")  # selected: sd_xl_base_1.0.safetensors in <root>/models
    data = tmp_path / "data"
    write_checkpoint(data / "models" / "Stable-diffusion" / "mine.safetensors", "sd15")
    (data / "config.json").write_text(json.dumps({"sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]"}))
    (root / "webui-user.sh").write_text(f'export COMMANDLINE_ARGS="--data-dir {data}"\n')
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint == "mine.safetensors" and f.model_family == "sd15"


def test_fallback_checkpoint_is_the_first_a1111_lists(tmp_path: Path) -> None:
    """No selection: A1111 loads the first file of its natural-sorted walk, skipping VAEs (*.vae.safetensors),
    hidden folders and broken symlinks; none of those may become "the checkpoint"."""
    root = make_webui(tmp_path / "sd", family=None)
    models = root / "models" / "Stable-diffusion"
    write_checkpoint(models / "a_vae.vae.safetensors", "sdxl")
    write_checkpoint(models / ".cache" / "a.safetensors", "sdxl")
    (models / "a0.safetensors").symlink_to(tmp_path / "gone.safetensors")
    write_checkpoint(models / "model10.safetensors", "sdxl")
    write_checkpoint(models / "model2.safetensors", "sd15")
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint == "model2.safetensors" and f.model_family == "sd15"
# -- user args -------------------------------------------------------------------------------


def test_sh_last_export_outside_lowvram_block_wins() -> None:
    text = (STOCK_WEBUI_USER_SH
            + 'export COMMANDLINE_ARGS="--medvram --opt-split-attention"\n'
            + "export COMMANDLINE_ARGS='--xformers --ckpt-dir \"/models/my ckpts\"'  # mine\n"
            + markers.BLOCK_BEGIN + "\n"
            + 'export COMMANDLINE_ARGS="${COMMANDLINE_ARGS:+$COMMANDLINE_ARGS }--medvram-sdxl"\n'
            + markers.BLOCK_END + "\n")
    args, literal = webui.parse_sh_args(text)
    assert literal
    assert args == ("--xformers", "--ckpt-dir", "/models/my ckpts")


@pytest.mark.parametrize("line", ['export COMMANDLINE_ARGS="$EXTRA --xformers"',
                                  "export COMMANDLINE_ARGS=\"$(cat args.txt)\"",
                                  "export COMMANDLINE_ARGS=`cat args.txt`"])
def test_sh_expansions_are_not_literal(line: str) -> None:
    assert webui.parse_sh_args(line + "\n") == (None, False)


def test_sh_single_quoted_dollar_is_literal() -> None:
    assert webui.parse_sh_args("export COMMANDLINE_ARGS='--api-auth u:pa$$'\n") == (("--api-auth", "u:pa$$"), True)


def test_sh_commented_lines_and_absence() -> None:
    assert webui.parse_sh_args(STOCK_WEBUI_USER_SH) == (None, True)
    assert webui.parse_sh_args("export COMMANDLINE_ARGS=\n") == ((), True)


def test_sh_args_really_are_what_bash_exports(tmp_path: Path) -> None:
    """Cross-check the parser against bash itself on a tricky but literal line."""
    line = "export COMMANDLINE_ARGS=\"--ckpt-dir '/m/a b' --port 7861\"  # note\n"
    script = tmp_path / "u.sh"
    script.write_text(line)
    out = subprocess.run(["bash", "-c", f'source "{script}"; printf %s "$COMMANDLINE_ARGS"'], capture_output=True,
                         text=True, timeout=10, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    import shlex

    args, literal = webui.parse_sh_args(line)
    assert literal and args == tuple(shlex.split(out.stdout))


def test_bat_forms() -> None:
    text = STOCK_WEBUI_USER_BAT.replace("set COMMANDLINE_ARGS=", "set COMMANDLINE_ARGS=--medvram --xformers")
    assert webui.parse_bat_args(text) == (("--medvram", "--xformers"), True)
    quoted = '@echo off\r\nset "COMMANDLINE_ARGS=--ckpt-dir \'C:\\my models\' --lowvram"\r\ncall webui.bat\r\n'
    assert webui.parse_bat_args(quoted) == (("--ckpt-dir", "C:\\my models", "--lowvram"), True)
    assert webui.parse_bat_args("SET commandline_args=--api\r\n") == (("--api",), True)


def test_bat_percent_is_not_literal_and_block_is_skipped() -> None:
    assert webui.parse_bat_args("set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% --api\r\n") == (None, False)
    text = ("set COMMANDLINE_ARGS=--api\r\n" + markers.BAT_BLOCK_BEGIN + "\r\n"
            + 'set "COMMANDLINE_ARGS=%COMMANDLINE_ARGS% --medvram"\r\n' + markers.BAT_BLOCK_END + "\r\ncall webui.bat\r\n")
    assert webui.parse_bat_args(text) == (("--api",), True)


def test_os_name_picks_the_webui_user_file(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", webui_user_sh='export COMMANDLINE_ARGS="--medvram"\n',
                      webui_user_bat="set COMMANDLINE_ARGS=--lowvram\r\ncall webui.bat\r\n")
    assert webui.probe_webui(root, os_name="linux").user_args == ("--medvram",)
    assert webui.probe_webui(root, os_name="windows").user_args == ("--lowvram",)


# -- versions, venvs -------------------------------------------------------------------------


def test_git_describe_wins_over_changelog(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", version="1.8.0")
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull}
    for cmd in (["git", "init", "-q"], ["git", "add", "-Af"], ["git", "commit", "-qm", "x"], ["git", "tag", "v1.10.1"]):
        subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True, timeout=30)
    assert webui.probe_webui(root, os_name="linux").version == "1.10.1"


def test_git_describe_has_a_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_webui(tmp_path / "sd", version="1.8.0")
    (root / ".git").mkdir()
    seen: dict[str, object] = {}

    def slow(cmd, **kw):  # type: ignore[no-untyped-def]
        seen["timeout"] = kw.get("timeout")
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(webui.subprocess, "run", slow)
    assert webui.probe_webui(root, os_name="linux").version == "1.8.0"  # CHANGELOG fallback
    assert seen["timeout"] == 1.0


def test_no_version_anywhere(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", version=None)
    assert webui.probe_webui(root, os_name="linux").version is None


def test_comfyui_reads_comfyui_version_and_its_checkpoint(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "ComfyUI", flavor="comfyui", version="0.3.27")
    f = webui.probe_webui(root, os_name="linux")
    assert f.version == "0.3.27"
    assert f.checkpoint == "sd_xl_base_1.0.safetensors" and f.model_family == "sdxl" and f.user_args is None
    assert f.model_files == ("sd_xl_base_1.0.safetensors",)


def test_comfyui_without_model_files_has_no_checkpoint(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "ComfyUI", flavor="comfyui", version="0.3.27", family=None)
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint is None and f.model_family is None and f.model_files == ()


def test_windows_venv_and_cpu_torch(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", venv=False)
    from tests.fixtures.webui_trees import make_venv

    make_venv(root, torch="2.3.1", xformers=None, windows=True)
    f = webui.probe_webui(root, os_name="windows")
    assert f.python is not None and f.python.endswith("python.exe")
    assert f.torch == "2.3.1" and f.torch_cuda is None and f.xformers is None


def test_no_venv_yet(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", venv=False)
    f = webui.probe_webui(root, os_name="linux")
    assert f.python is None and f.torch is None and f.xformers is None


def test_torch_version_py_with_annotations_and_dist_info_fallback(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "version.py").write_text(
        "from typing import Optional\n__all__ = ['__version__']\n"
        "__version__ = '2.4.1+cu124'\ndebug = False\ncuda: Optional[str] = '12.4'\nhip: Optional[str] = None\n")
    assert webui.torch_build(site) == ("2.4.1+cu124", "12.4")
    (site / "torch" / "version.py").unlink()
    (site / "torch-2.1.2+cu118.dist-info").mkdir()
    assert webui.torch_build(site) == ("2.1.2+cu118", "11.8")


def test_symlink_loop_in_models_ends(tmp_path: Path) -> None:
    root = make_webui(tmp_path / "sd", family=None)
    models = root / "models" / "Stable-diffusion"
    (models / "loop").symlink_to(models, target_is_directory=True)
    f = webui.probe_webui(root, os_name="linux")
    assert f.checkpoint is None


_ARG = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(_ARG, max_size=6), st.sampled_from(["single", "double"]))
def test_sh_args_round_trip_through_shell_quoting(args: list[str], style: str) -> None:
    """Whatever literal value a user quotes into webui-user.sh comes back as A1111 would split it."""
    import shlex

    value = " ".join(shlex.quote(a) for a in args)
    if style == "single":
        rhs = shlex.quote(value)
    else:
        if any(c in value for c in '$`\\"'):
            return  # double quotes would need escaping: covered by the single-quoted form
        rhs = f'"{value}"'
    parsed, literal = webui.parse_sh_args(f"export COMMANDLINE_ARGS={rhs}\n")
    assert literal
    assert parsed == tuple(shlex.split(value))
