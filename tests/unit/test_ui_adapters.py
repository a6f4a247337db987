"""UI adapters: real flag lists as data, validation with the closest real flag, each UI's spelling."""

from __future__ import annotations

import argparse

import pytest

from lowvram import ui
from lowvram.core.errors import FlagError
from lowvram.ui.base import FLAGS_DIR, FlagSet, load_flagset, reserve_gb


def a1111_parser(flagset: FlagSet) -> argparse.ArgumentParser:
    """An argparse parser built like A1111's (flat, strict parse_args) from a flag list."""
    parser = argparse.ArgumentParser(prog="launch.py", exit_on_error=False)
    for spec in flagset.flags.values():
        if spec.kind == "flag":
            parser.add_argument(spec.name, action="store_true")
        elif spec.kind == "values":
            parser.add_argument(spec.name, nargs="+")
        elif spec.kind == "optvalue":
            parser.add_argument(spec.name, nargs="?")
        else:
            parser.add_argument(spec.name, choices=spec.choices or None)
    return parser


def test_a1111_18_list_has_exactly_the_117_flags_plus_builtin_preloads() -> None:
    fs = load_flagset("a1111-1.8.txt", "A1111 1.8")
    preload = {"--lora-dir", "--lyco-dir-backcompat", "--ldsr-models-path", "--scunet-models-path", "--swinir-models-path"}
    assert len(set(fs.flags) - preload) == 117
    assert {"--medvram-sdxl", "--xformers", "--opt-sdp-attention", "--upcast-sampling", "-f"} <= set(fs.flags)
    assert fs.flags["--precision"].choices == ("full", "autocast")
    assert "--models-dir" not in fs.flags


def test_a1111_110_adds_models_dir_and_precision_half() -> None:
    fs = load_flagset("a1111-1.10.txt", "A1111 1.10")
    assert "--models-dir" in fs.flags and "--no-prompt-history" in fs.flags
    assert "half" in fs.flags["--precision"].choices


@pytest.mark.parametrize("name", sorted(p.name for p in FLAGS_DIR.glob("*.txt")))
def test_every_flag_file_parses_and_groups_name_declared_flags(name: str) -> None:
    fs = load_flagset(name, name)
    assert len(fs.flags) > 20
    for members in fs.groups.values():
        assert all(m in fs.flags for m in members)


def test_unknown_flag_names_the_flag_the_ui_and_the_closest_real_flag() -> None:
    with pytest.raises(FlagError) as err:
        ui.validate("a1111", "1.8.0", ["--xformer"])
    assert "--xformer" in err.value.message and "A1111 1.8.0" in err.value.message
    assert "--xformers" in err.value.hint


def test_forge_flag_is_not_an_a1111_flag() -> None:
    with pytest.raises(FlagError) as err:
        ui.validate("a1111", "1.10.1", ["--always-low-vram"])
    assert "has no flag --always-low-vram" in err.value.message


def test_precision_half_is_110_only_and_unknown_version_takes_the_common_flags() -> None:
    ui.validate("a1111", "1.10.1", ["--precision", "half"])
    with pytest.raises(FlagError, match="does not take 'half'"):
        ui.validate("a1111", "1.8.0", ["--precision", "half"])
    with pytest.raises(FlagError, match="does not take 'half'"):
        ui.validate("a1111", None, ["--precision", "half"])
    with pytest.raises(FlagError, match="has no flag --models-dir"):
        ui.validate("a1111", None, ["--models-dir", "/m"])
    ui.validate("a1111", None, ["--precision", "full", "--medvram-sdxl"])


def test_valued_flag_without_value_and_stray_value_are_errors() -> None:
    with pytest.raises(FlagError, match="needs a value"):
        ui.validate("a1111", "1.8.0", ["--device-id"])
    with pytest.raises(FlagError, match="not a flag"):
        ui.validate("a1111", "1.8.0", ["--xformers", "oops"])


@pytest.mark.parametrize(
    ("ui_key", "args", "category"),
    [
        ("a1111", ["--xformers", "--opt-sdp-attention"], "attention"),
        ("a1111", ["--medvram", "--lowvram"], "offload"),
        ("a1111", ["--medvram-sdxl", "--lowvram"], "offload"),
        ("a1111", ["--no-half", "--upcast-sampling"], "precision"),
        ("forge", ["--always-low-vram", "--always-no-vram"], "group vram"),
        ("forge", ["--attention-pytorch", "--attention-quad"], "attention"),
        ("comfyui", ["--lowvram", "--novram"], "group vram"),
        ("comfyui", ["--use-pytorch-cross-attention", "--use-split-cross-attention"], "group attention"),
    ],
)
def test_contradictions_are_refused(ui_key: str, args: list[str], category: str) -> None:
    with pytest.raises(FlagError) as err:
        ui.validate(ui_key, None, args)
    assert "contradict" in err.value.message and category in err.value.message


def test_same_backend_spelled_twice_is_not_a_contradiction() -> None:
    ui.validate("a1111", "1.8.0", ["--xformers", "--force-enable-xformers", "--xformers-flash-attention"])


@pytest.mark.parametrize(
    ("offload", "attention", "expected"),
    [
        ("medvram-sdxl", "xformers", ["--medvram-sdxl", "--xformers"]),
        ("medvram", "sdp", ["--medvram", "--opt-sdp-attention"]),
        ("lowvram", "sub-quad", ["--lowvram", "--opt-sub-quad-attention"]),
        ("none", "auto", []),
        ("cpu", "auto", ["--use-cpu", "all", "--skip-torch-cuda-test", "--no-half", "--precision", "full"]),
    ],
)
def test_a1111_rendering(offload: str, attention: str, expected: list[str]) -> None:
    rendered = ui.adapter("a1111").render(ui.UiSettings(offload=offload, attention=attention), "1.8.0")
    assert list(rendered.args) == expected
    ui.validate("a1111", "1.8.0", rendered.args)


def test_a1111_before_16_has_no_medvram_sdxl() -> None:
    a = ui.adapter("a1111")
    assert a.rungs("sdxl", "1.5.2") == ("none", "medvram", "lowvram")
    assert a.rungs("sdxl", "1.8.0") == ("none", "medvram-sdxl", "lowvram")
    assert a.rungs("sd15", "1.8.0") == ("none", "medvram", "lowvram")
    rendered = a.render(ui.UiSettings(offload="medvram-sdxl"), "1.5.2")
    assert rendered.args == ("--medvram",)


def test_a1111_precision_and_device() -> None:
    a = ui.adapter("a1111")
    r = a.render(ui.UiSettings(unet_precision="upcast", vae_precision="full", device_index=1), "1.8.0")
    assert r.args == ("--upcast-sampling", "--no-half-vae", "--device-id", "1")
    r = a.render(ui.UiSettings(unet_precision="full", vae_precision="full"), "1.8.0")
    assert r.args == ("--no-half", "--precision", "full")


def test_forge_never_gets_medvram_flags_and_uses_its_own_rungs() -> None:
    f = ui.adapter("forge")
    assert f.render(ui.UiSettings(offload="medvram-sdxl"), None).args == ()
    assert f.render(ui.UiSettings(offload="medvram"), None).args == ()
    assert f.render(ui.UiSettings(offload="lowvram"), None).args == ("--always-low-vram",)
    assert f.render(ui.UiSettings(offload="novram"), None).args == ("--always-no-vram",)
    assert f.render(ui.UiSettings(offload="cpu"), None).args == ("--always-cpu", "--skip-torch-cuda-test")
    r = f.render(ui.UiSettings(attention="sdp", unet_precision="full", device_index=0), None)
    # --attention-pytorch alone: Forge's backend/memory_management.py turns xformers off when it is given.
    assert r.args == ("--attention-pytorch", "--all-in-fp32", "--gpu-device-id", "0")
    ui.validate("forge", None, r.args)


def test_comfyui_rungs_reserve_and_cpu() -> None:
    c = ui.adapter("comfyui")
    assert c.render(ui.UiSettings(offload="lowvram", headroom_mb=600), None).args == (
        "--lowvram", "--reserve-vram", "0.6")
    assert c.render(ui.UiSettings(offload="novram"), None).args == ("--novram",)
    assert c.render(ui.UiSettings(offload="cpu", headroom_mb=600), None).args == ("--cpu",)
    assert c.render(ui.UiSettings(offload="medvram", attention="sdp"), None).args == (
        "--use-pytorch-cross-attention",)


def test_sdnext_has_no_medvram_sdxl() -> None:
    s = ui.adapter("sdnext")
    assert s.render(ui.UiSettings(offload="medvram-sdxl"), None).args == ("--medvram",)
    assert s.render(ui.UiSettings(offload="lowvram", attention="xformers"), None).args == ("--lowvram", "--use-xformers")
    ui.validate("sdnext", None, ["--medvram", "--use-xformers", "--device-id", "0"])


@pytest.mark.parametrize(("mb", "gb"), [(0, "0.0"), (256, "0.3"), (512, "0.5"), (600, "0.6"), (1024, "1.0"), (1100, "1.1")])
def test_reserve_gb_rounds_up_to_a_tenth(mb: int, gb: str) -> None:
    assert reserve_gb(mb) == gb


@pytest.mark.parametrize(
    "args",
    [
        ["--xformers", "--medvram-sdxl", "--no-half-vae"],
        ["--use-cpu", "all", "--skip-torch-cuda-test", "--no-half", "--precision", "full"],
        ["--lowvram", "--opt-sdp-attention", "--upcast-sampling", "--device-id", "0"],
    ],
)
def test_a1111_argparse_built_from_the_18_list_accepts_rendered_args(args: list[str]) -> None:
    parser = a1111_parser(load_flagset("a1111-1.8.txt", "A1111 1.8"))
    ns = parser.parse_args(args)
    assert ns is not None
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parser.parse_args(["--always-low-vram"])


def test_lenient_parse_keeps_unknown_user_flags() -> None:
    fs = ui.adapter("a1111").flagset("1.8.0")
    parsed = ui.parse_args(["--api", "--some-extension-flag", "--port", "7861"], fs, strict=False)
    assert [p.name for p in parsed] == ["--api", "--some-extension-flag", "--port"]
    assert parsed[2].value == "7861" and not parsed[1].known


def test_unknown_ui_is_a_flag_error() -> None:
    with pytest.raises(FlagError, match="unknown UI"):
        ui.adapter("invokeai")
