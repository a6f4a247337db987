"""Extension names, folders, URLs and refs that try to leave extensions/, run commands through git's
transports or options, or smuggle a git option: refused with one clean line, nothing created."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowvram.core.errors import ExtensionError, LowvramError
from lowvram.world import gitops
from lowvram.world.apply import extensions as ext_mod
from lowvram.world.apply.manifest import Manifest
from tests.fixtures.git_repos import make_remotes, write_registry
from tests.fixtures.webui_trees import make_webui

SENTINEL = "lowvram-hostile-sentinel"

BAD_URLS = [
    f"ext::sh -c touch% /tmp/{SENTINEL}",
    "ext::sh -c 'touch x'",
    "fd::17",
    "file::/tmp/repo",
    f"--upload-pack=touch /tmp/{SENTINEL}",
    "-u", "--config=core.sshCommand=touch x",
    "ftp://example.com/repo.git", "gopher://example.com/x", "javascript://x",
    "file://", "https://", "ssh://user@/path", "host:",
    "https://example.com/a\nb", "https://example.com/\x00",
    "", "   ", "~nobody-lowvram-xyz/repo",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_hostile_source_urls_are_refused(url: str) -> None:
    with pytest.raises(gitops.CloneError) as info:
        gitops.validate_source_url(url)
    assert "refusing git source" in info.value.message and info.value.hint
    assert "\n" not in info.value.message.replace(repr(url), "")


@pytest.mark.parametrize("url", ["https://github.com/a/b", "git@github.com:a/b.git", "ssh://git@host:22/a/b",
                                 "file:///srv/mirror/b", "/srv/mirror/b", "C:\\mirror\\b", "git://host/a"])
def test_ordinary_sources_pass(url: str) -> None:
    assert gitops.validate_source_url(url)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(url=st.text(max_size=60))
def test_no_text_gets_a_transport_or_an_option_through(url: str) -> None:
    try:
        ok = gitops.validate_source_url(url)
    except gitops.CloneError:
        return
    assert not ok.startswith("-")  # never read as a git option
    assert not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", ok)  # never a remote helper (ext::, fd::)
    assert not any(ord(c) < 32 for c in ok)


BAD_DIRS = ["..", ".", "../../outside", "/etc", "a/b", "a\\b", "..\\x", "x/../../y", "", "~root", "a\nb", "a\0b"]


@pytest.mark.parametrize("name", BAD_DIRS)
def test_folder_names_that_leave_extensions_are_refused(name: str) -> None:
    with pytest.raises(ExtensionError, match="could escape the extensions/ folder"):
        ext_mod.check_safe_dir(name)


@pytest.mark.parametrize("field,value", [("dir", "../../outside"), ("dir", "/tmp/abs"), ("url", "ext::sh -c x"),
                                         ("url", "--upload-pack=touch x")])
def test_a_hostile_registry_is_refused_at_load(tmp_path: Path, field: str, value: str) -> None:
    entry: dict[str, Any] = {"url": "https://example.com/x", "ref": "0" * 40, "dir": "x", "uis": ["a1111"]}
    entry[field] = value
    path = write_registry(tmp_path / "registry.json", {"x": entry})
    if field == "dir":
        with pytest.raises(ExtensionError):
            ext_mod.load_registry(path)
    else:  # a URL is checked where it is used: the install of that entry fails, nothing is cloned
        registry = ext_mod.load_registry(path)
        tree = make_webui(tmp_path / "w", venv=False)
        result = ext_mod.install_one(tree, registry["x"], Manifest(webui=tree), ui="a1111")
        assert result.status == "failed" and "refusing git source" in result.reason
        assert sorted(p.name for p in (tree / "extensions").iterdir()) == []


@pytest.mark.parametrize("ref", ["--upload-pack=touch x", "-x", "", "  "])
def test_a_ref_that_is_an_option_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: str) -> None:
    remotes = make_remotes(tmp_path / "remotes", monkeypatch)
    dest = tmp_path / "w" / "extensions" / remotes.vram.dir
    with pytest.raises(gitops.CloneError, match="bad git ref"):
        gitops.clone_pinned(remotes.vram.url, ref, dest)
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []  # no temp clone left either


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(max_size=30))
def test_installing_any_name_never_writes_outside_extensions(tmp_path_factory: pytest.TempPathFactory,
                                                             name: str) -> None:
    root = tmp_path_factory.mktemp("ext")
    tree = make_webui(root / "w", venv=False)
    entry = ext_mod.RegistryEntry(name="x", url=str(root / "nowhere"), ref="0" * 40, dir=name, uis=("a1111",),
                                  file="", why="", skip=())
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    result = ext_mod.install_one(tree, entry, Manifest(webui=tree), ui="a1111")
    assert result.status in ("failed", "kept")
    after = sorted(p.relative_to(root) for p in root.rglob("*"))
    assert after == before


@pytest.mark.parametrize("args", [
    ["install-extensions", "../../etc"],
    ["install-extensions", "--source", f"vram-estimator=ext::sh -c touch% /tmp/{SENTINEL}"],
    ["install-extensions", "--source", f"vram-estimator=--upload-pack=touch /tmp/{SENTINEL}"],
    ["install-extensions", "--source", "no-equals-sign"],
])
def test_cli_refuses_in_one_line(cli: Any, tmp_path: Path, args: list[str]) -> None:
    tree = make_webui(tmp_path / "w", venv=False)
    result = cli(*args, "--webui", str(tree), "--json")
    assert result.code in (1, 2)
    assert "Traceback" not in result.err and "unexpected error" not in result.err
    assert json.loads(result.out)["error"]["message"]
    assert not Path(f"/tmp/{SENTINEL}").exists()
    assert sorted(p.name for p in (tree / "extensions").iterdir()) == []


def test_errors_are_lowvram_errors() -> None:
    assert issubclass(gitops.CloneError, LowvramError)


def test_a_tampered_manifest_cannot_smuggle_git_options_into_put_back(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    remotes = make_remotes(tmp_path / "remotes", monkeypatch)
    dest = tmp_path / "ext"
    gitops.clone_pinned(remotes.kitten.url, remotes.kitten.pin, dest)
    newest = remotes.kitten.commits[-1]
    hostile: dict[str, Any] = {
        "-D": {"set": remotes.kitten.pin, "before": None},
        "--upload-pack=touch x": {"set": remotes.kitten.pin, "before": None},
        "master": {"set": remotes.kitten.pin, "before": f"--upload-pack=touch /tmp/{SENTINEL}"},
        "x": "not a mapping",
    }
    assert gitops.put_back(dest, newest, "--help", hostile) is None
    assert gitops.repo_state(dest).head == newest
    assert gitops.repo_state(dest).branch is None
    assert not Path(f"/tmp/{SENTINEL}").exists()
    assert not (dest / "x").exists()
