"""Issue 16, item 10 and its "Also" list: lowvram says things in the user's words.

No author-only terms ("rung", "ladder", "headroom", "road", `<int range>`, `{name}`) on the screens
a user reads: every `--help`, the plan's reasons and warnings, doctor's checks, estimate and reserve.
The terms that must stay (flag names such as `--roads`, JSON keys and values such as `road: swap`)
are explained in README's "Words lowvram uses". Then: after `tune`, whether the WebUI still holds the
older plan; on Linux, `reserve` says the plan never uses a reserve; profiles list by card size,
`profiles show` prints YAML values, counts read "1 warning", profile names complete in the shell, and
one broken user profile stops only what uses it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lowvram.cli.app import COMMAND_ORDER
from tests.fixtures.api_ui import make_api_webui, write_gtx1070_windows_facts
from tests.fixtures.facts_matrix import MACHINES, write_facts
from tests.fixtures.webui_trees import make_webui

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
HELP_SCREENS = [(), *[(c,) for c in COMMAND_ORDER if c != "profiles"], ("profiles",), ("profiles", "list"),
                ("profiles", "show")]
# The words a user would not know. `--roads` (tune's flag) and JSON names stay, so they are taken out
# before the check; placeholders typer fills in when no metavar is given count too.
JARGON = re.compile(r"\brungs?\b|\bladders?\b|\bheadroom\b|\broads?\b|premise|<int|<float|range>|\{name\}|\{NAME\}"
                    r"|--layout off / profile", re.IGNORECASE)
SWAP = "swap parts of the model to RAM"
RESIDENT = "keep the model in VRAM and reserve memory"


def jargon(text: str) -> list[str]:
    return JARGON.findall(text.replace("--roads", "--tune-flag"))


@pytest.fixture
def facts_dir(tmp_path: Path) -> Path:
    d = tmp_path / "facts"
    d.mkdir()
    for name, facts in MACHINES.items():
        write_facts(facts, d / f"{name}.json")
    return d


# ---- 1. help texts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", HELP_SCREENS, ids=lambda c: " ".join(c) or "lowvram")
def test_every_help_screen_speaks_the_users_words(cli: Any, command: tuple[str, ...]) -> None:
    result = cli(*command, "--help")
    assert result.code == 0, result.err
    assert jargon(result.out) == [], result.out


def test_help_shows_real_metavars_not_placeholders(cli: Any) -> None:
    est = cli("estimate", "--help").out
    for option in ("--width PX", "--height PX", "--batch N", "--vram-mb MIB", "--hires-scale X"):
        assert option in est
    tune = cli("tune", "--help").out
    for option in ("--width PX", "--steps N", "--repeats N", "--max-minutes MINUTES"):
        assert option in tune
    assert "Usage: lowvram profiles show [OPTIONS] NAME" in cli("profiles", "show", "--help").out


def test_the_layout_and_offload_options_say_what_they_do(cli: Any) -> None:
    text = " ".join(cli("plan", "--help").out.split())
    assert f"on = {RESIDENT}" in text and f"off = {SWAP}" in text
    assert "--offload <auto|none|medvram-sdxl|medvram|lowvram> Offload level: how much of the model" in text


# ---- 2. the plan's reasons and warnings --------------------------------------------------------


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_plan_reasons_and_warnings_speak_the_users_words(cli: Any, facts_dir: Path, machine: str) -> None:
    facts = facts_dir / f"{machine}.json"
    for ui in ("a1111", "forge"):
        for extra in ((), ("--layout", "on"), ("--layout", "off"), ("--offload", "medvram"), ("-p", "generic-sdxl")):
            result = cli("plan", "--facts", str(facts), "--ui", ui, "--model", "sdxl", "--json", *extra)
            assert result.code == 0, result.err
            data = json.loads(result.out)
            texts = [d["reason"] for d in data["decisions"]] + list(data["warnings"])
            texts += [data["reserve"]["reason"], data["hook"]["reason"]]
            assert [t for t in texts if jargon(t)] == [], (ui, extra)


def test_the_plan_screen_says_how_the_model_runs(cli: Any, facts_dir: Path) -> None:
    linux = cli("plan", "--facts", str(facts_dir / "gtx1070-8gb.json"), "--ui", "a1111", "--model", "sdxl")
    assert linux.code == 0, linux.err
    text = " ".join(linux.out.split())
    assert f"{SWAP}: the driver here cannot spill VRAM into RAM (sysmem fallback off)" in text
    assert "MiB kept free (fits with a 10 % margin)" in text
    # The setting names are JSON names and stay; every word after them is the user's.
    rows = [re.sub(r"^(road|headroom_mb)\b", "", line) for line in linux.out.splitlines()]
    assert jargon("\n".join(rows)) == []

    windows = cli("plan", "--facts", str(facts_dir / "rtx4060-8gb-win.json"), "--ui", "a1111", "--model", "sdxl",
                  "--layout", "on", "--json")
    road = next(d for d in json.loads(windows.out)["decisions"] if d["setting"] == "road")
    assert (road["value"], road["source"], road["reason"]) == ("resident", "cli", f"--layout on: {RESIDENT}")


def test_layout_off_from_the_profile_says_so_not_the_flag(cli: Any, facts_dir: Path, lowvram_home: Path) -> None:
    mine = lowvram_home / "profiles"
    mine.mkdir()
    (mine / "swapper.yaml").write_text("description: always swap\nextends: 8gb-sdxl\nlayout: {mode: off}\n")
    data = json.loads(cli("plan", "--facts", str(facts_dir / "rtx4060-8gb-win.json"), "--model", "sdxl",
                          "-p", "swapper", "--json").out)
    road = next(d for d in data["decisions"] if d["setting"] == "road")
    assert road["reason"] == f"profile swapper (layout off): {SWAP}"


# ---- 3. doctor and estimate -----------------------------------------------------------------------


@pytest.mark.parametrize("machine", sorted(MACHINES))
def test_doctor_checks_speak_the_users_words_and_count_right(cli: Any, facts_dir: Path, machine: str) -> None:
    facts = str(facts_dir / f"{machine}.json")
    data = json.loads(cli("doctor", "--facts", facts, "--json").out)
    texts = [c["message"] for c in data["checks"]] + [c.get("hint") or "" for c in data["checks"]]
    assert [t for t in texts if jargon(t)] == []
    warns = sum(c["status"] == "warn" for c in data["checks"])
    summary = cli("doctor", "--facts", facts).out.strip().splitlines()[-1]
    assert f" {warns} warning{'' if warns == 1 else 's'}, " in summary


def test_one_warning_is_one_warning(cli: Any, facts_dir: Path) -> None:
    # A machine with exactly one warning (no WebUI found), which read "1 warnings".
    summary = cli("doctor", "--facts", str(facts_dir / "rtx2060-6gb.json")).out.strip().splitlines()[-1]
    assert ", 1 warning, " in summary and "warnings" not in summary


def test_the_linux_ram_check_says_how_the_model_runs(cli: Any, facts_dir: Path) -> None:
    data = json.loads(cli("doctor", "--facts", str(facts_dir / "gtx1070-8gb.json"), "--json").out)
    ram = next(c for c in data["checks"] if c["id"] == "system.ram")
    assert "VRAM cannot spill into RAM here, so lowvram swaps parts of the model to RAM" in ram["message"]


def test_estimate_says_vram_kept_free(cli: Any) -> None:
    out = cli("estimate", "--model", "sdxl", "--width", "1024", "--height", "1024", "--vram-mb", "8192").out
    assert "MiB kept free and a 10 % margin" in " ".join(out.split())
    assert jargon(out) == []
    sweep = cli("estimate", "--model", "sdxl", "--vram-mb", "8192", "--sweep").out
    assert "kept free" in sweep and jargon(sweep) == []


def _wsl_facts(tmp_path: Path) -> Path:
    """A GTX 1070 under WSL2: memory spills (so tune measures both ways) and apply writes webui-user.sh."""
    data = json.loads(write_gtx1070_windows_facts(tmp_path / "w.json").read_text())
    data["system"].update({"os": "linux", "wsl": True, "sysmem_fallback": "on", "glibc": "2.35"})
    path = tmp_path / "wsl.json"
    path.write_text(json.dumps(data))
    return path


# ---- 4. reserve on a machine whose VRAM never spills ------------------------------------------------


def test_reserve_on_linux_says_the_plan_never_uses_it(cli: Any, tmp_path: Path, facts_dir: Path) -> None:
    tree = make_webui(tmp_path / "stable-diffusion-webui")
    linux = str(facts_dir / "gtx1070-8gb.json")
    added = cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000", "--webui", str(tree), "--facts", linux)
    assert added.code == 0, added.err
    text = " ".join(added.out.split())
    assert "reserve 1600 MiB" in text
    assert ("plan not used here: this platform never spills into shared memory (native Linux/macOS or an older "
            f"driver), so the plan is to {SWAP} and keep no reserve") in text
    data = json.loads(cli("reserve", "--webui", str(tree), "--facts", linux, "--json").out)
    assert data["reserve_mb"] == 1600 and data["plan"]["uses_reserve"] is False

    windows = cli("reserve", "--webui", str(tree), "--facts", str(facts_dir / "rtx4060-8gb-win.json"))
    assert f"not used by the current plan, which is to {SWAP}" in " ".join(windows.out.split())


def test_reserve_says_when_the_plan_uses_it(cli: Any, tmp_path: Path) -> None:
    from lowvram.core.observations import Observation
    from lowvram.world import paths
    from lowvram.world.observation_log import append_observation

    tree = make_webui(tmp_path / "stable-diffusion-webui")
    # The hook measured both ways at the target size: keeping the model in VRAM was faster.
    common = {"source": "hook", "checkpoint": None, "family": "sdxl", "width": 1024, "height": 1024, "batch": 1,
              "device": "cuda"}
    append_observation(paths.observations_path(tree), Observation(time=1.0, road="swap", offload="medvram-sdxl",
                                                                  sit=2.0, **common))
    append_observation(paths.observations_path(tree), Observation(time=2.0, road="resident", offload="none",
                                                                  layout=True, reserve_mb=0, sit=1.0, **common))
    facts = str(_wsl_facts(tmp_path))  # memory spills under WSL2
    cli("reserve", "--add", "--free-mb", "600", "--overflow-mb", "1000", "--webui", str(tree), "--facts", facts)
    data = json.loads(cli("reserve", "--webui", str(tree), "--facts", facts, "--json").out)
    assert data["reserve_mb"] == 1600
    assert data["plan"] == {"uses_reserve": True,
                            "why": "used: the plan keeps the model in VRAM and reserves 1600 MiB"}


# ---- 5. after tune: does the WebUI still hold the older plan? -------------------------------------


def test_after_tune_it_says_whether_the_webui_holds_the_older_plan(cli: Any, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mirror").mkdir()  # extensions fail at once, offline; the rest is applied
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path / "mirror"))
    ui = make_api_webui(tmp_path / "stable-diffusion-webui", optimum_mb=1216)
    facts = str(_wsl_facts(tmp_path))
    base = ("--webui", str(ui.root), "--facts", facts)
    try:
        first = cli("tune", *base)
        assert first.code == 0, first.err
        said = " ".join(first.out.split())
        assert ("nothing is applied in this WebUI yet: `lowvram apply` writes the tuned plan (keep the model in "
                "VRAM and reserve 1216 MiB, flags") in said
        assert "`lowvram launch` applies it and starts the UI" in said

        # An older plan in the tree (the swap way, asked for): tune says it is still there, and what to run.
        assert cli("apply", *base, "--layout", "off").code in (0, 1)
        second = cli("tune", *base)
        said = " ".join(second.out.split())
        assert (f"webui-user.sh still holds the plan applied before tuning ({SWAP}, flags --medvram-sdxl") in said
        assert "the tuned plan is: keep the model in VRAM and reserve 1216 MiB" in said
        assert "Run `lowvram apply` to write it" in said

        # Applied afresh: the tree holds the tuned plan.
        assert cli("apply", *base).code in (0, 1)
        third = cli("tune", *base, "--json")
        tree = json.loads(third.out)["tree"]
        assert tree["file"] == "webui-user.sh" and tree["holds_tuned_plan"] is True
        assert tree["message"].startswith("webui-user.sh already holds the tuned plan (keep the model in VRAM")
    finally:
        ui.kill_all()


# ---- 6. profiles: order, values, completion, a broken one ------------------------------------------


def test_profiles_list_by_card_size(cli: Any) -> None:
    names = [line.split()[0] for line in cli("profiles", "list").out.splitlines()[1:]
             if line[:1].isdigit()]
    classes = [n for n in names if re.fullmatch(r"\d+gb-sdxl", n)]
    assert classes == ["2gb-sdxl", "4gb-sdxl", "6gb-sdxl", "8gb-sdxl", "12gb-sdxl", "16gb-sdxl"]
    listed = [p["name"] for p in json.loads(cli("profiles", "list", "--json").out)["profiles"]]
    assert listed.index("8gb-sd15") < listed.index("12gb-sd15") < listed.index("16gb-sd15") < listed.index("cpu")


def test_profiles_show_prints_yaml_values(cli: Any) -> None:
    out = cli("profiles", "show", "gtx1070-sdxl").out
    rows = {line.split()[0]: line.split(None, 1)[1].rsplit("  ", 1)[0].strip()
            for line in out.splitlines() if line.startswith(("layout.model_first", "extensions", "args",
                                                             "match.vram_mb", "alloc_conf"))}
    assert rows == {"layout.model_first": "true", "extensions": "[vram-estimator, giant-kitten]", "args": "[]",
                    "match.vram_mb": "[7000, 9000]", "alloc_conf": "{}"}
    assert "True" not in out


def _complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash completion offers for the last of `words` (click's protocol, as the shell calls it)."""
    full = {**os.environ, "_LOWVRAM_COMPLETE": "complete_bash", "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "lowvram"], capture_output=True, text=True, env=full, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_profile_names_complete_in_the_shell(lowvram_home: Path) -> None:
    mine = lowvram_home / "profiles"
    mine.mkdir()
    (mine / "gtx-mine.yaml").write_text("description: mine\n")
    offered = _complete("lowvram plan --profile gtx")
    assert "gtx1070-sdxl" in offered and "gtx1650-sd15" in offered and "gtx-mine" in offered
    assert all(name.startswith("gtx") for name in offered)
    assert "auto" in _complete("lowvram apply -p au")
    assert "auto" in _complete("lowvram launch --profile ")
    assert _complete("lowvram profiles show 12")[:2] == ["12gb-sd15", "12gb-sdxl"]
    assert "auto" not in _complete("lowvram profiles show ")
    assert "8gb-sdxl" in _complete("lowvram estimate -p 8")


def test_a_broken_user_profile_stops_only_what_uses_it(cli: Any, facts_dir: Path, lowvram_home: Path) -> None:
    mine = lowvram_home / "profiles"
    mine.mkdir()
    broken = mine / "broken.yaml"
    broken.write_text("description: x\nofload: medvram\n")
    listed = cli("profiles", "list")
    assert listed.code == 0, listed.err
    assert "gtx1070-sdxl" in listed.out and "broken" not in listed.out.split("user profiles:")[0]
    [warning] = [line for line in listed.err.splitlines() if str(broken) in line]
    assert warning.startswith("warning: profile broken is skipped: ") and "unknown key `ofload`" in warning
    assert json.loads(cli("profiles", "list", "--json").out)["warnings"] == [warning.removeprefix("warning: ")]

    facts = str(facts_dir / "gtx1070-8gb.json")
    plan = cli("plan", "--facts", facts, "--model", "sdxl")
    assert plan.code == 0, plan.err
    assert (plan.out + plan.err).count(str(broken)) == 1  # the error, shown once, as a warning
    assert "profile gtx1070-sdxl" in plan.out
    data = json.loads(cli("plan", "--facts", facts, "--model", "sdxl", "--json").out)
    assert data["profile"] == "gtx1070-sdxl"
    assert [w for w in data["warnings"] if "broken" in w] == [warning.removeprefix("warning: ")]

    asked = cli("plan", "--facts", facts, "--model", "sdxl", "--profile", "broken")
    assert asked.code == 1 and asked.out == ""
    assert asked.err.startswith(f"error: {broken}:2: unknown key `ofload`")


# ---- 7. README explains the words that stay ---------------------------------------------------------


def test_readme_has_a_glossary_for_the_terms_that_stay() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Words lowvram uses", 1)[1].split("\n## ", 1)[0]
    for term in ("road", "swap", "resident", "offload", "reserve", "headroom_mb", "sysmem fallback", "layout hook",
                 "managed block", "profile"):
        assert f"**{term}" in section.lower() or f"`{term}" in section.lower(), term
