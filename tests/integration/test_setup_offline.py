"""Issue 16 §9: a clone that fails says git's own reason in one line, and how to clone offline.

Real git, real failures: an https URL nothing answers on (port 9 on loopback: refused at once, no
network needed), a file:// path that does not exist, a LOWVRAM_MIRROR without the UI. Nothing may be
left behind, and the hint must not blame the disk for what the network did.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lowvram.world import fsutil, setup_ui

UNREACHABLE = "https://127.0.0.1:9/stable-diffusion-webui.git"
DUMP_WORDS = ("cmdline", "exit code(", "Cmd('git')", "Traceback")


@pytest.fixture(autouse=True)
def real_transports(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite allows git only file:// (tests/conftest.py); these tests need git to try https."""
    monkeypatch.delenv("GIT_ALLOW_PROTOCOL", raising=False)


@pytest.fixture
def unreachable_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111's registry entry pointing where nothing answers: what an offline machine meets."""
    real = setup_ui.load_registry

    def load_registry(path: Path | None = None) -> setup_ui.Registry:
        registry = real(path)
        uis = dict(registry.uis)
        uis["a1111"] = replace(uis["a1111"], url=UNREACHABLE)
        return replace(registry, uis=uis)

    monkeypatch.setattr(setup_ui, "load_registry", load_registry)


def _one_error(res: Any) -> tuple[str, str]:
    """The single `error:` line and the `hint:` line of a refused run."""
    assert res.code == 1, (res.out, res.err)
    errors = [ln for ln in res.err.splitlines() if ln.startswith("error:")]
    hints = [ln for ln in res.err.splitlines() if ln.startswith("hint:")]
    assert len(errors) == 1 and len(hints) == 1, res.err
    for word in DUMP_WORDS:
        assert word not in res.err, res.err
    return errors[0], hints[0]


def _nothing_left(target: Path) -> None:
    assert not target.exists()
    parent = target.parent
    if parent.exists():
        assert [p.name for p in parent.iterdir() if fsutil.TEMP_MARK in p.name] == []


def test_offline_setup_says_gits_reason_and_how_to_clone_offline(cli: Any, tmp_path: Path,
                                                                  unreachable_registry: None) -> None:
    target = tmp_path / "sd" / "webui"
    error, hint = _one_error(cli("setup", "--dir", str(target)))
    assert f"cannot clone {UNREACHABLE}" in error
    assert "fatal: unable to access 'https://127.0.0.1:9/" in error  # git's own words
    assert "LOWVRAM_MIRROR" in hint and "--source a1111=" in hint
    assert "could not write" not in hint and "writable" not in hint  # the disk is not to blame
    _nothing_left(target)


def test_offline_setup_json_is_one_document_with_the_reason(cli: Any, tmp_path: Path,
                                                            unreachable_registry: None) -> None:
    res = cli("setup", "--dir", str(tmp_path / "w"), "--json")
    assert res.code == 1
    error = json.loads(res.out)["error"]
    assert "fatal: unable to access" in error["message"] and "\n" not in error["message"]
    assert "LOWVRAM_MIRROR" in error["hint"] and "--source a1111=" in error["hint"]
    for word in DUMP_WORDS:
        assert word not in res.out


def test_a_source_that_is_not_a_repository_is_named(cli: Any, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-clone.git"
    target = tmp_path / "webui"
    error, hint = _one_error(cli("setup", "--dir", str(target), "--source", f"a1111=file://{missing}"))
    assert f"'{missing}' does not appear to be a git repository" in error
    assert f"--source a1111=file://{missing}" in hint and "could not write" not in hint
    _nothing_left(target)


def test_a_mirror_without_the_ui_says_so(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror))
    target = tmp_path / "webui"
    error, hint = _one_error(cli("setup", "--dir", str(target)))
    assert f"{mirror / 'a1111'}" in error and "does not exist" in error
    assert f"LOWVRAM_MIRROR={mirror} has no a1111 clone" in hint
    _nothing_left(target)


def test_an_unreachable_extension_source_blames_the_network_not_the_disk(tmp_path: Path) -> None:
    """The extension clones (apply, install-extensions) share the clone: git's "Cloning into '<dest>'"
    line, printed before a network failure, named the destination and made the hint blame the disk."""
    from lowvram.world import gitops

    dest = tmp_path / "extensions" / "giant-kitten"
    with pytest.raises(gitops.CloneError) as caught:
        gitops.clone_pinned("https://127.0.0.1:9/giant-kitten.git", "1d2362d267260238e021f3f8bd8543f11ec12eb8",
                            dest, progress=lambda *_a: None)
    assert caught.value.message.startswith("cannot clone https://127.0.0.1:9/giant-kitten.git: fatal: unable to access")
    assert "network" in caught.value.hint and "LOWVRAM_MIRROR" in caught.value.hint
    assert "could not write" not in caught.value.hint
    assert os.listdir(dest.parent) == []


def test_a_git_failure_that_said_nothing_is_still_one_line_without_the_command_dump() -> None:
    """GitPython's str() of a failed command is a multi-line dump ("Cmd('git') failed due to: exit
    code(128) cmdline: git clone -v -- …"): the line shown is git's reason, or that git said none."""
    import git

    from lowvram.world.gitops import _git_error_text

    silent = git.GitCommandError(["git", "clone", "-v", "--", UNREACHABLE, "/tmp/x"], 128, "")
    assert _git_error_text(silent) == "git exited with code 128 and said nothing"
    said = git.GitCommandError(["git", "clone", "-v", "--", UNREACHABLE, "/tmp/x"], 128,
                               "Cloning into '/tmp/x'...\nfatal: unable to access 'x': Could not resolve host: github.com\n")
    assert _git_error_text(said) == "fatal: unable to access 'x': Could not resolve host: github.com"
