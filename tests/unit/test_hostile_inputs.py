"""Hostile input to every file lowvram reads: profiles, facts, observations, webui-user files.

Hypothesis feeds each reader arbitrary bytes, near-valid documents with wrong values, deep nesting,
alias bombs, huge numbers and non-UTF-8 text. The promise (docs/architecture.md#the-cli-contract, docs/architecture.md#damaged-and-hostile-inputs): a correct result or
one clean LowvramError, never another exception (which the CLI would show as "unexpected error"),
a hang or a memory blow-up. Bounded and derandomized, so a failure reproduces.

The apply writer gets arbitrary existing webui-user bytes: apply, re-apply and revert must give
the user's bytes back exactly, or refuse cleanly.
"""

from __future__ import annotations

import itertools
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowvram.core.errors import ApplyError, FactsError, LowvramError, ProfileError, WebuiError
from lowvram.core.facts import facts_from_dict
from lowvram.world import paths
from lowvram.world.apply import apply_plan, revert, webui_user
from lowvram.world.detect import webui as detect_webui
from lowvram.world.detect.facts_file import load_facts_file
from lowvram.world.observation_log import load_observations
from lowvram.world.profile_files import load_profile
from tests.fixtures.git_repos import linux_facts, simple_plan
from tests.fixtures.webui_trees import STOCK_WEBUI_USER_BAT, STOCK_WEBUI_USER_SH, make_webui

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FEW = settings(FUZZ, max_examples=40)

_names = itertools.count()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.integers(min_value=10**18, max_value=10**400),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


class Bounded:
    """Time and memory bounds around one call: no hang, no blow-up."""

    def __init__(self, seconds: float = 5.0, mib: int = 256) -> None:
        self.seconds, self.mib = seconds, mib

    def __enter__(self) -> Bounded:
        self.start = time.monotonic()
        self.rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: object) -> None:
        took = time.monotonic() - self.start
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.rss) / 1024
        assert took < self.seconds, f"took {took:.1f} s"
        assert grew < self.mib, f"peak memory grew by {grew:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# Profiles


def _load_profile_text(home: Path, data: bytes) -> Any:
    """Write `data` as a user profile under a fresh name (the loader caches by path) and load it."""
    name = f"fuzz{next(_names)}"
    (home / "profiles").mkdir(exist_ok=True)
    (home / "profiles" / f"{name}.yaml").write_bytes(data)
    with Bounded():
        try:
            return load_profile(name)
        except ProfileError as exc:
            assert exc.message and "\n" not in exc.message, exc.message  # one line
            return exc


@FUZZ
@given(data=st.binary(max_size=400))
def test_profile_loader_on_arbitrary_bytes(lowvram_home: Path, data: bytes) -> None:
    _load_profile_text(lowvram_home, data)


@pytest.mark.parametrize("data", [b"\x00", b"description: a\x01b\n", b"description: x\x7f\n"], ids=["nul", "soh", "del"])
def test_profile_with_a_control_character_is_a_clean_error(lowvram_home: Path, data: bytes) -> None:
    assert isinstance(_load_profile_text(lowvram_home, data), ProfileError)


PROFILE_KEYS = ["description", "extends", "match", "offload", "attention", "precision", "tcmalloc", "alloc_conf",
                "extensions", "layout", "args", "target", "sysmem_fallback", "bogus"]


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(PROFILE_KEYS), json_values, max_size=6))
def test_profile_loader_on_wrong_values_for_real_keys(lowvram_home: Path, doc: dict[str, Any]) -> None:
    doc.setdefault("description", "fuzz")
    if isinstance(doc.get("extends"), str):
        doc["extends"] = "8gb-sdxl"  # an existing parent, so the values are what gets checked
    try:
        text = json.dumps(doc)  # JSON is YAML
    except ValueError:
        return
    _load_profile_text(lowvram_home, text.encode())


@pytest.mark.parametrize("text", [
    pytest.param("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b]\n",
                 id="alias-bomb"),
    pytest.param("description: x\n<<: {offload: none}\n", id="merge-key"),
    pytest.param("description: x\n---\ndescription: y\n", id="two-documents"),
    pytest.param("description: x\noffload: none\noffload: lowvram\n", id="duplicate-key"),
    pytest.param("description: x\ntarget: {width: " + "9" * 400 + "}\n", id="huge-int"),
    pytest.param("description: x\ntarget: {hires_scale: .nan}\n", id="nan"),
    pytest.param("", id="empty"),
])
def test_profile_loader_refuses_hostile_yaml_cleanly(lowvram_home: Path, text: str) -> None:
    result = _load_profile_text(lowvram_home, text.encode())
    assert isinstance(result, ProfileError)
    assert not Path("/tmp/lowvram-pwned").exists()


def test_profile_with_a_python_tag_is_refused_in_one_line(lowvram_home: Path) -> None:
    text = "description: !!python/object/apply:os.system ['touch /tmp/lowvram-pwned']\n"
    result = _load_profile_text(lowvram_home, text.encode())
    assert not Path("/tmp/lowvram-pwned").exists()  # refused either way: never constructed
    assert isinstance(result, ProfileError)


def test_profile_over_one_mib_is_refused_before_parsing(lowvram_home: Path) -> None:
    result = _load_profile_text(lowvram_home, b"description: x\nargs: [" + b"'--x', " * 200_000 + b"]\n")
    assert isinstance(result, ProfileError) and "1 MiB" in result.message


def test_profile_not_utf8(lowvram_home: Path) -> None:
    result = _load_profile_text(lowvram_home, "description: café\n".encode("latin-1"))
    assert isinstance(result, ProfileError) and "UTF-8" in result.message


@pytest.mark.parametrize("text", [
    "description: x\nargs: " + "[" * 50_000 + "]" * 50_000 + "\n",
    "description: x\nalloc_conf: " + "{a: " * 30_000 + "1" + "}" * 30_000 + "\n",
], ids=["deep-sequence", "deep-mapping"])
def test_deeply_nested_profile_is_a_clean_error(lowvram_home: Path, text: str) -> None:
    assert isinstance(_load_profile_text(lowvram_home, text.encode()), ProfileError)


def test_profile_with_an_integer_over_4300_digits_is_a_clean_error(lowvram_home: Path) -> None:
    text = "description: x\ntarget: {width: " + "9" * 5000 + "}\n"
    assert isinstance(_load_profile_text(lowvram_home, text.encode()), ProfileError)


# ---------------------------------------------------------------------------------------------
# Facts


GOOD_FACTS = {
    "system": {"os": "linux", "ram_mb": 32768, "swap_mb": 0, "glibc": "2.36", "wsl": False},
    "gpus": [{"index": 0, "name": "NVIDIA GeForce GTX 1070", "vram_total_mb": 8192, "vram_free_mb": 7800,
              "driver": "550.54.14", "cuda_driver": "12.4", "compute_capability": "6.1"}],
    "tcmalloc": {"library": None, "usable": False, "reason": "x"},
    "webui": None,
}


def _facts_or_error(path: Path) -> Any:
    with Bounded():
        try:
            return load_facts_file(path)
        except FactsError as exc:
            assert exc.message and exc.hint
            return exc


@FUZZ
@given(data=st.binary(max_size=300))
def test_facts_file_of_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "facts.json"
    path.write_bytes(data)
    _facts_or_error(path)


def _paths_in(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths_in(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths_in(v, (*prefix, i))
    return out


FACT_PATHS = [p for p in _paths_in(GOOD_FACTS) if p]


def _replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


@FUZZ
@given(path=st.sampled_from(FACT_PATHS), value=json_values)
def test_facts_with_one_wrong_value(tmp_path: Path, path: tuple[Any, ...], value: Any) -> None:
    try:
        text = json.dumps(_replaced(GOOD_FACTS, path, value))
    except ValueError:  # an int json cannot write (over 4300 digits)
        return
    file = tmp_path / "facts.json"
    file.write_text(text)
    _facts_or_error(file)


@pytest.mark.parametrize("data", [
    b"[" * 100_000,
    b'{"system": {"ram_mb": ' + b"9" * 5000 + b"}}",
    b'{"system": {"ram_mb": ' + b"9" * 400 + b"}}",
    b'{"gpus": [{"vram_total_mb": 1e999}]}',
    b'{"system": {"os": "linux"}, "gpus": "many"}',
    b"\xff\xfe{}",
    b"",
    b'{"schema": 1, "error": {"message": "boom", "hint": ""}}',
], ids=["deep", "int-5000-digits", "int-400-digits", "inf", "gpus-string", "utf16-bom", "empty", "error-report"])
def test_facts_file_hostile_cases_are_clean_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "facts.json"
    path.write_bytes(data)
    assert isinstance(_facts_or_error(path), FactsError)


def test_facts_file_too_large(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_bytes(b" " * (5 * 1024 * 1024) + b"{}")
    result = _facts_or_error(path)
    assert isinstance(result, FactsError) and "over the 4 MiB" in result.message and str(path) in result.message


@FEW
@given(path=st.sampled_from(FACT_PATHS), value=json_values)
def test_plan_with_a_hostile_facts_file_is_a_result_or_one_clean_line(cli: Any, tmp_path: Path,
                                                                      path: tuple[Any, ...], value: Any) -> None:
    try:
        text = json.dumps(_replaced(GOOD_FACTS, path, value))
    except ValueError:
        return
    file = tmp_path / "facts.json"
    file.write_text(text)
    with Bounded(seconds=10):
        result = cli("plan", "--facts", str(file), "--model", "sdxl", "--json")
    assert "unexpected error" not in result.err and "Traceback" not in result.err, result.err
    if result.code == 0:
        assert json.loads(result.out)["schema"] == 1
    else:
        assert result.code == 1 and result.err.startswith("error:"), result.err


# ---------------------------------------------------------------------------------------------
# Observations


@FUZZ
@given(data=st.binary(max_size=600))
def test_observations_of_arbitrary_bytes_never_raise(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "observations.jsonl"
    path.write_bytes(data)
    with Bounded():
        loaded = load_observations(path)
    for obs in loaded.items:
        assert obs.source in ("hook", "manual", "tuning") and math.isfinite(obs.time)


@FUZZ
@given(lines=st.lists(st.dictionaries(st.sampled_from(
    ["time", "source", "reserve_mb", "free_mb", "overflow_mb", "sit", "flags", "road", "layout", "ooms", "pid",
     "checkpoint", "width", "extra"]), json_values, max_size=6), max_size=5))
def test_observation_lines_with_wrong_values_are_skipped_with_a_warning(tmp_path: Path,
                                                                          lines: list[dict[str, Any]]) -> None:
    good = {"schema": 1, "time": 1.0, "source": "manual", "free_mb": 600, "overflow_mb": 900}
    text = []
    for line in lines:
        try:
            text.append(json.dumps(line))
        except ValueError:
            text.append("{")
    path = tmp_path / "observations.jsonl"
    path.write_text("\n".join([json.dumps(good), *text, json.dumps(good)]) + "\n")
    with Bounded():
        loaded = load_observations(path)
    assert len(loaded.items) >= 2  # the good lines survive whatever is between them
    assert len(loaded.items) + len(loaded.warnings) == len(lines) + 2


@pytest.mark.parametrize("line", [
    b'{"time": ' + b"9" * 400 + b"}",
    b'{"time": 1, "reserve_mb": ' + b"9" * 400 + b"}",
    b'{"time": ' + b"9" * 5000 + b"}",
    b"[" * 100_000,
], ids=["time-400-digits", "reserve-400-digits", "time-5000-digits", "deep"])
def test_observation_lines_with_huge_numbers_are_skipped(tmp_path: Path, line: bytes) -> None:
    path = tmp_path / "observations.jsonl"
    path.write_bytes(b'{"time": 1.0, "source": "manual"}\n' + line + b"\n")
    loaded = load_observations(path)
    assert len(loaded.items) == 1 and len(loaded.warnings) == 1


# ---------------------------------------------------------------------------------------------
# webui-user files: reading the user's flags, and the writer on arbitrary existing bytes


@FUZZ
@given(text=st.text(max_size=300))
def test_user_args_parsers_never_raise(text: str) -> None:
    with Bounded():
        for parse in (detect_webui.parse_sh_args, detect_webui.parse_bat_args):
            args, literal = parse(text)
            assert args is None or all(isinstance(a, str) for a in args)
            assert isinstance(literal, bool)


sh_lines = st.sampled_from([
    'export COMMANDLINE_ARGS="--api --ckpt-dir \'/a b\'"', "export COMMANDLINE_ARGS=$(cat flags)",
    'export COMMANDLINE_ARGS="--data-dir ~/x"', 'export COMMANDLINE_ARGS="--ckpt /dev/null"',
    "export COMMANDLINE_ARGS='--medvram", "# comment", "", "\x00", "export COMMANDLINE_ARGS=\"--ckpt-dir \x00\"",
])


@FEW
@given(lines=st.lists(sh_lines | st.text(max_size=40), max_size=6))
def test_probe_webui_with_a_hostile_webui_user_sh(tmp_path_factory: pytest.TempPathFactory,
                                                   lines: list[str]) -> None:
    tree = make_webui(tmp_path_factory.mktemp("w"), webui_user_sh="\n".join(lines), venv=False)
    with Bounded():
        try:
            detect_webui.probe_webui(tree, "linux")
        except WebuiError:
            pass


def test_probe_webui_with_a_tilde_of_an_unknown_user(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w", venv=False,
                      webui_user_sh='export COMMANDLINE_ARGS="--data-dir ~nobody-lowvram-xyz/data"\n')
    try:
        detect_webui.probe_webui(tree, "linux")
    except WebuiError:
        pass


def test_probe_webui_with_a_huge_integer_in_config_json(tmp_path: Path) -> None:
    tree = make_webui(tmp_path / "w", venv=False)
    (tree / "config.json").write_text('{"batch_cond_uncond": ' + "9" * 5000 + "}")
    try:
        detect_webui.probe_webui(tree, "linux")
    except WebuiError:
        pass


user_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from([
        b"#!/bin/bash\n", b"export COMMANDLINE_ARGS=\"--api\"\n", b"\r\n", b"\n", b"no newline at the end",
        b"# >>> lowvram managed block (`lowvram revert` removes it; edits inside are replaced) >>>\n",
        b"# <<< lowvram managed block <<<\n", b"call webui.bat\r\n", b"@echo off\r\n", b"\xff\xfe\x00",
        b"rem >>> lowvram managed block (`lowvram revert` removes it; edits inside are replaced) >>>\r\n",
        b"rem <<< lowvram managed block <<<\r\n", "caf\u00e9\n".encode(), b"\t  \x0c\x0b\x1c\x1d\x1e\x85",
    ]), max_size=8).map(b"".join),
)


def _apply_revert_round_trip(tmp: Path, data: bytes, os_name: str) -> None:
    name = "webui-user.bat" if os_name == "windows" else "webui-user.sh"
    tree = make_webui(tmp / "w", webui_user_sh=None, venv=False, family=None)
    (tree / name).write_bytes(data)
    plan = simple_plan(args=("--xformers", "--ckpt-dir", "/models/it's here"))
    facts = linux_facts(os_name)
    with Bounded(seconds=10):
        try:
            apply_plan(plan, tree, facts)
        except ApplyError as exc:
            assert exc.hint
            assert (tree / name).read_bytes() == data  # refused: untouched
            return
        target = Path(apply_plan(plan, tree, facts).target or "")
        first = target.read_bytes()
        apply_plan(plan, tree, facts)  # idempotent
        assert target.read_bytes() == first
        kind = webui_user.BAT if target.suffix == ".bat" else webui_user.SH
        assert webui_user.block_bytes(first, kind) is not None
        revert(tree)
    # A complete block already in the file is lowvram's (from a run whose manifest was lost): it goes.
    kind = webui_user.BAT if os_name == "windows" else webui_user.SH
    expected = data if webui_user.find_block(data, kind) is None else webui_user.remove_block(data, kind)
    assert (tree / name).read_bytes() == expected, "revert did not give the user's bytes back"
    assert not (tree / "webui.settings.bat").exists()
    assert not paths.manifest_path(tree).exists()


@FUZZ
@given(data=user_bytes)
def test_apply_then_revert_gives_arbitrary_webui_user_sh_bytes_back(tmp_path_factory: pytest.TempPathFactory,
                                                                    data: bytes) -> None:
    _apply_revert_round_trip(tmp_path_factory.mktemp("sh"), data, "linux")


@FEW
@given(data=user_bytes)
def test_apply_then_revert_gives_arbitrary_webui_user_bat_bytes_back(tmp_path_factory: pytest.TempPathFactory,
                                                                     data: bytes) -> None:
    _apply_revert_round_trip(tmp_path_factory.mktemp("bat"), data, "windows")


@pytest.mark.parametrize("data", [STOCK_WEBUI_USER_SH.encode(), STOCK_WEBUI_USER_BAT.encode()], ids=["sh", "bat"])
def test_round_trip_on_the_stock_files(tmp_path: Path, data: bytes) -> None:
    _apply_revert_round_trip(tmp_path, data, "windows" if data.startswith(b"@echo") else "linux")


def test_every_hostile_error_is_a_lowvram_error() -> None:
    """The classes the tests above accept all carry a message and a hint for the CLI's one line."""
    for cls in (ProfileError, FactsError, WebuiError, ApplyError):
        assert issubclass(cls, LowvramError)
    assert facts_from_dict(GOOD_FACTS).gpus[0].vram_total_mb == 8192
