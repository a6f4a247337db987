"""Profiles: every bundled one loads, broken files give one precise line, inheritance, selection.

The files are found and read by lowvram.world.profile_files (the edge); lowvram.core.profiles (the core) only
parses, validates, merges and selects what it is handed, and the tests at the end hold it to that.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lowvram.core import profiles
from lowvram.core.errors import ProfileError
from lowvram.core.facts import Facts, SystemFacts
from lowvram.world import paths, profile_files
from tests.fixtures.facts_matrix import MACHINES

BUNDLED = sorted(p.stem for p in paths.bundled_profiles_dir().glob("*.yaml"))


def write_user(name: str, text: str) -> Path:
    d = paths.user_profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", BUNDLED)
def test_every_bundled_profile_loads_and_says_what_it_is_for(name: str) -> None:
    resolved = profile_files.load_profile(name)
    assert resolved.profile.name == name
    assert len(resolved.profile.description) > 40
    text = (paths.bundled_profiles_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    assert text.startswith("#"), "each bundled profile cites its source in a comment"
    assert resolved.profile.match.model or resolved.profile.match.nvidia is False


def test_the_matrix_of_classes_exists() -> None:
    for size in ("2gb", "4gb", "6gb", "8gb", "12gb", "16gb"):
        for fam in ("sd15", "sdxl"):
            assert f"{size}-{fam}" in BUNDLED
    assert {"cpu", "gtx1070-sdxl", "gtx16xx-sd15", "pascal-sd15", "laptop-4gb-sd15"} <= set(BUNDLED)


@pytest.mark.parametrize(("name", "rung"), [("2gb-sd15", "lowvram"), ("4gb-sd15", "medvram"),
                                            ("2gb-sdxl", "lowvram"), ("4gb-sdxl", "lowvram")])
def test_thin_margin_classes_pin_their_rung_and_say_so(name: str, rung: str) -> None:
    p = profile_files.load_profile(name).profile
    assert p.offload == rung
    assert "pinned" in p.description


def test_gtx1070_sdxl_inherits_and_names_origins() -> None:
    r = profile_files.load_profile("gtx1070-sdxl")
    assert r.chain == ("gtx1070-sdxl", "8gb-sdxl")
    assert r.profile.offload == "medvram-sdxl" and r.profile.attention == "xformers"
    assert r.origins["offload"] == "gtx1070-sdxl"
    assert r.origins["target.width"] == "8gb-sdxl" and r.profile.target.width == 1024
    assert r.origins["layout.reserve"] == "8gb-sdxl"
    assert r.origins["tcmalloc"] == "default"
    # match is never inherited: the parent's VRAM class must not widen the card profile
    assert r.profile.match.gpu == ("GTX 1070",)


def test_user_profile_overrides_bundled_by_name_and_list_says_so() -> None:
    write_user("8gb-sdxl", "description: my own 8 GB SDXL settings for this box\noffload: lowvram\n")
    infos = {i.name: i for i in profile_files.list_profiles()}
    assert infos["8gb-sdxl"].source == "user"
    assert infos["8gb-sd15"].source == "bundled"
    # a bundled child now inherits from the user's parent
    assert profile_files.load_profile("gtx1070-sdxl").profile.target.width is None


def test_unknown_profile_suggests_close_names() -> None:
    with pytest.raises(ProfileError) as err:
        profile_files.load_profile("gtx1070-sxdl")
    assert "no profile named 'gtx1070-sxdl'" in err.value.message
    assert "gtx1070-sdxl" in err.value.hint


BROKEN = [
    ("unknown-key", "description: x\noffloat: medvram\n", ":2: unknown key `offloat` (did you mean `offload`?)"),
    ("nested-typo", "description: x\nmatch:\n  vram: [1, 2]\n", ":3: unknown key `match.vram` (did you mean `vram_mb`?)"),
    ("wrong-type", "description: x\nextensions: 5\n", ":2: `extensions` should be a string or a list of strings, not 5"),
    ("bad-choice", "description: x\nattention: xformer\n", ":2: `attention` should be one of auto | xformers"),
    ("bad-range", "description: x\ntarget: {width: 100000}\n", ":2: `target.width` should be a whole number from 64 to 8192, not 100000"),
    ("not-multiple", "description: x\ntarget:\n  width: 1001\n", ":3: `target.width` should be a multiple of 8"),
    ("inverted", "description: x\nmatch: {vram_mb: [9000, 7000]}\n", "low end is not above its high end"),
    ("batch-zero", "description: x\ntarget: {batch: 0}\n", "`target.batch` should be a whole number from 1 to 64, not 0"),
    ("bool-not-int", "description: x\nlayout: {reserve: true}\n", "`layout.reserve` should be a whole number"),
    ("alias", "description: &d x\nextends: *d\n", ":1: YAML anchors and aliases (&, *) are not allowed"),
    ("merge-key", "description: x\nprecision: {<<: {unet: half}}\n", "merge keys (<<) are not allowed"),
    ("duplicate", "description: x\noffload: none\noffload: lowvram\n", ":3: `offload` is given twice"),
    ("not-yaml", "description: [x\n", "not valid YAML"),
    ("list-top", "- a\n- b\n", "a profile must be a mapping"),
    ("empty", "", "the file is empty"),
    ("two-docs", "description: a\n---\ndescription: b\n", "more than one YAML document"),
    ("wrong-name", "name: something-else\ndescription: x\n", "`name` is 'something-else' but the file is wrong-name.yaml"),
    ("alloc-list", "description: x\nalloc_conf: {max_split_size_mb: [1, 2]}\n", "`alloc_conf.max_split_size_mb` should be a single value"),
]


@pytest.mark.parametrize(("name", "text", "expected"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_profile_gives_one_precise_line(name: str, text: str, expected: str) -> None:
    path = write_user(name, text)
    with pytest.raises(ProfileError) as err:
        profile_files.load_profile(name)
    message = err.value.message
    assert "\n" not in message
    assert str(path) in message
    assert expected in message
    assert err.value.hint


def test_alias_bomb_is_refused_before_it_expands() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]")
    write_user("bomb", "description: x\n" + "\n".join(lines) + "\n")
    with pytest.raises(ProfileError, match="anchors and aliases"):
        profile_files.load_profile("bomb")


def test_file_over_one_mib_is_refused() -> None:
    write_user("huge", "description: x\n" + "# padding\n" * 120_000)
    with pytest.raises(ProfileError, match="over the 1 MiB limit"):
        profile_files.load_profile("huge")


def test_extends_cycle_and_missing_parent() -> None:
    write_user("loop-a", "description: a\nextends: loop-b\n")
    write_user("loop-b", "description: b\nextends: loop-a\n")
    with pytest.raises(ProfileError, match="cycle: loop-a → loop-b → loop-a"):
        profile_files.load_profile("loop-a")
    write_user("orphan", "description: o\nextends: 8gb-sdxll\n")
    with pytest.raises(ProfileError) as err:
        profile_files.load_profile("orphan")
    assert "`extends: 8gb-sdxll` names no profile" in err.value.message
    assert "8gb-sdxl" in err.value.hint


def test_yaml_on_off_reads_as_words() -> None:
    write_user("onoff", "description: x\ntcmalloc: off\nlayout: {mode: on}\n")
    p = profile_files.load_profile("onoff").profile
    assert p.tcmalloc == "off" and p.layout.mode == "on"


def test_deep_merge_keeps_sibling_keys() -> None:
    write_user("child", "description: child\nextends: 8gb-sdxl\nprecision: {vae: full}\ntarget: {width: 896}\n")
    r = profile_files.load_profile("child")
    assert r.profile.precision.unet == "half" and r.profile.precision.vae == "full"
    assert r.profile.target.width == 896 and r.profile.target.height == 1024
    assert r.origins["precision.vae"] == "child" and r.origins["precision.unet"] == "8gb-sdxl"


@pytest.mark.parametrize(
    ("machine", "family", "expected"),
    [
        ("gtx1070-8gb", "sdxl", "gtx1070-sdxl"),
        ("gtx1070-8gb", "sd15", "pascal-sd15"),
        ("gtx1650-4gb", "sd15", "gtx1650-sd15"),
        ("gtx1660s-6gb-win", "sdxl", "gtx16xx-sdxl"),
        ("rtx3050-laptop-4gb-win", "sd15", "laptop-4gb-sd15"),
        ("rtx2060-6gb", "sdxl", "6gb-sdxl"),
        ("rtx3060-12gb", "sdxl", "12gb-sdxl"),
        ("rtx4090-24gb", "sd15", "16gb-sd15"),
        ("gt1030-2gb", "sd15", "2gb-sd15"),
        ("no-gpu", "sdxl", "cpu"),
        ("amd-only", "sd15", "cpu"),
    ],
)
def test_auto_selection_picks_the_most_specific_match(machine: str, family: str, expected: str) -> None:
    sel = profile_files.select_profile(MACHINES[machine], family)
    assert sel.name == expected
    assert "most specific match" in sel.reason


def test_selection_says_which_others_matched() -> None:
    sel = profile_files.select_profile(MACHINES["gtx1070-8gb"], "sdxl")
    assert "pascal-sdxl" in sel.others_matched and "8gb-sdxl" in sel.others_matched
    assert "GPU name" in sel.reason
    assert sel.others_matched.index("pascal-sdxl") < sel.others_matched.index("8gb-sdxl")


def test_refiner_family_uses_sdxl_profiles_and_unknown_vram_falls_back() -> None:
    assert profile_files.select_profile(MACHINES["rtx3060-12gb"], "sdxl-refiner").name == "12gb-sdxl"
    from dataclasses import replace

    gpu = replace(MACHINES["rtx3060-12gb"].gpus[0], vram_total_mb=None, vram_free_mb=None)
    facts = Facts(system=SystemFacts(os="linux"), gpus=(gpu,))
    assert profile_files.select_profile(facts, "sdxl").name == "generic-sdxl"


def test_no_match_at_all_is_a_profile_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    monkeypatch.setattr(paths, "bundled_profiles_dir", lambda: empty)
    with pytest.raises(ProfileError, match="no profile matches"):
        profile_files.select_profile(MACHINES["gtx1070-8gb"], "sdxl")


# ---------------------------------------------------------------------------------------------
# The core is pure: it parses bytes it is handed and resolves through the caller's lookup.


def test_core_profiles_module_does_no_io() -> None:
    import ast

    source = Path(profiles.__file__).read_text(encoding="utf-8")
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    assert not {"os", "lowvram.world.paths", "lowvram.world.fsutil", "lowvram.world.profile_files"} & imported
    assert not [n for n in imported if n.startswith(("lowvram.world.paths", "lowvram.world.fsutil"))]
    calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
             for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)}
    assert not calls & {"open", "read_bytes", "read_text", "exists", "iterdir", "glob", "stat", "is_file"}


def test_parse_yaml_reads_nothing_and_names_the_path_it_is_given() -> None:
    path = Path("/nowhere/at/all/mine.yaml")
    doc = profiles.parse_yaml(b"description: x\noffload: lowvram\n", path)
    assert doc.data == {"description": "x", "offload": "lowvram"} and doc.lines[("offload",)] == 2
    with pytest.raises(ProfileError) as err:
        profiles.parse_profile(b"description: x\noffloat: medvram\n", path)
    assert err.value.message == f"{path}:2: unknown key `offloat` (did you mean `offload`?)"
    with pytest.raises(ProfileError, match="not UTF-8 text"):
        profiles.parse_yaml("description: café\n".encode("latin-1"), path)


def test_resolve_profile_merges_through_the_callers_lookup() -> None:
    texts = {"base": b"description: base\noffload: medvram\ntarget: {width: 512, height: 768}\n",
             "kid": b"description: kid\nextends: base\ntarget: {width: 640}\n"}
    files = {name: (Path(f"/virtual/{name}.yaml"), "user") for name in texts}
    read: list[str] = []

    def lookup(name: str) -> dict[str, object]:
        read.append(name)
        return profiles.parse_profile(texts[name], files[name][0])

    r = profiles.resolve_profile("kid", files, lookup)
    assert read == ["kid", "base"]
    assert r.chain == ("kid", "base") and r.source == "user" and r.path == Path("/virtual/kid.yaml")
    assert r.profile.offload == "medvram" and r.profile.target.width == 640 and r.profile.target.height == 768
    assert r.origins["target.width"] == "kid" and r.origins["target.height"] == "base"
    with pytest.raises(ProfileError) as err:
        profiles.resolve_profile("kdi", files, lookup)
    assert err.value.message == "no profile named 'kdi'" and "kid" in err.value.hint


def test_pure_selection_takes_its_candidates_and_agrees_with_the_edge() -> None:
    everything = profile_files.load_all()
    for machine, family in (("gtx1070-8gb", "sdxl"), ("no-gpu", "sd15"), ("rtx3060-12gb", "sdxl-refiner")):
        assert profiles.select_profile(MACHINES[machine], family, everything) == \
            profile_files.select_profile(MACHINES[machine], family)
    with pytest.raises(ProfileError, match="no profile matches"):
        profiles.select_profile(MACHINES["gtx1070-8gb"], "sdxl", [])
