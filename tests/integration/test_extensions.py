"""`lowvram install-extensions` with real git and local bare repositories (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lowvram.world import fsutil
from lowvram.world.apply import extensions as ext_mod
from tests.fixtures.git_repos import Remotes, git, head_of, make_remotes, registry_entry, write_registry
from tests.fixtures.webui_trees import make_webui


@pytest.fixture
def remotes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Remotes:
    return make_remotes(tmp_path / "remotes", monkeypatch)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_webui(tmp_path / "webui", config={"disabled_extensions": ["a1111-stable-diffusion-webui-vram-estimator",
                                                                          "some-other-ext"],
                                                  "sd_vae": "Automatic", "ünïcode": "kept"})


def _json(res) -> dict:  # type: ignore[no-untyped-def]
    assert res.out, res.err
    return json.loads(res.out)  # type: ignore[no-any-return]


def _statuses(data: dict) -> dict[str, str]:  # type: ignore[type-arg]
    return {e["name"]: e["status"] for e in data["extensions"]}


def test_install_both_at_their_pins_then_reinstall_is_a_noop(cli, tree: Path, remotes: Remotes) -> None:
    res = cli("install-extensions", "--webui", str(tree), "--json")
    assert res.code == 0, res.err
    data = _json(res)
    assert next(iter(data)) == "schema"
    assert _statuses(data) == {"vram-estimator": "installed", "giant-kitten": "installed"}
    for entry in data["extensions"]:
        assert set(entry) >= {"name", "dir", "url", "ref", "status", "reason"}
    vram = tree / "extensions" / remotes.vram.dir
    kitten = tree / "extensions" / remotes.kitten.dir
    assert head_of(vram) == remotes.vram.pin
    assert head_of(kitten) == remotes.kitten.pin
    assert (vram / "scripts" / "vram_estimator.py").is_file()
    assert (kitten / "scripts" / "giant-kitten.py").is_file()
    def worktree() -> dict[Path, int]:  # git's own bookkeeping (.git/index refreshes) left out
        return {p: p.stat().st_mtime_ns for p in (tree / "extensions").rglob("*") if ".git" not in p.parts}

    before = worktree()
    again = _json(cli("install-extensions", "--webui", str(tree), "--json"))
    assert _statuses(again) == {"vram-estimator": "up-to-date", "giant-kitten": "up-to-date"}
    assert worktree() == before


def test_disabled_extension_is_enabled_and_other_config_keys_stay(cli, tree: Path, remotes: Remotes) -> None:
    res = cli("install-extensions", "vram-estimator", "--webui", str(tree), "--json")
    assert res.code == 0
    cfg = json.loads((tree / "config.json").read_text(encoding="utf-8"))
    assert cfg["disabled_extensions"] == ["some-other-ext"]
    assert cfg["sd_vae"] == "Automatic"
    assert cfg["ünïcode"] == "kept"
    assert cfg["sd_model_checkpoint"].startswith("sd_xl_base_1.0.safetensors")
    assert (tree / "config.json").read_text(encoding="utf-8").startswith('{\n    "')  # A1111's indent kept
    assert "enabled again" in _json(res)["extensions"][0]["reason"]


def test_recognised_by_remote_not_folder_name(cli, tree: Path, remotes: Remotes) -> None:
    # installed by A1111's own UI under another folder name, from the https spelling of the URL
    other = tree / "extensions" / "my-kitten"
    git("clone", "-q", remotes.kitten.url, str(other))
    git("checkout", "-q", remotes.kitten.pin, cwd=other)
    data = _json(cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "up-to-date"
    assert data["extensions"][0]["dir"] == "my-kitten"
    assert not (tree / "extensions" / remotes.kitten.dir).exists()


def test_update_moves_a_clean_checkout_and_leaves_a_dirty_one(cli, tree: Path, remotes: Remotes) -> None:
    kitten = tree / "extensions" / remotes.kitten.dir
    git("clone", "-q", remotes.kitten.url, str(kitten))  # newest commit, one past the pin
    assert head_of(kitten) == remotes.kitten.commits[-1]
    data = _json(cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "kept"
    assert "--update" in data["extensions"][0]["reason"]
    assert head_of(kitten) == remotes.kitten.commits[-1]

    (kitten / remotes.kitten.file).write_text("# my local fix\n")
    data = _json(cli("install-extensions", "giant-kitten", "--update", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "kept"
    assert "local changes" in data["extensions"][0]["reason"]
    assert (kitten / remotes.kitten.file).read_text() == "# my local fix\n"

    git("checkout", "-q", "--", ".", cwd=kitten)
    data = _json(cli("install-extensions", "giant-kitten", "--update", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "updated"
    assert head_of(kitten) == remotes.kitten.pin


def test_a_folder_with_another_remote_is_never_touched(cli, tree: Path, remotes: Remotes, tmp_path: Path) -> None:
    foreign = tree / "extensions" / remotes.kitten.dir
    git("init", "-q", str(foreign))
    git("remote", "add", "origin", "https://example.invalid/someone/else.git", cwd=foreign)
    (foreign / "notes.txt").write_text("mine")
    data = _json(cli("install-extensions", "giant-kitten", "--update", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "kept"
    assert "someone/else" in data["extensions"][0]["reason"]
    assert (foreign / "notes.txt").read_text() == "mine"


def test_missing_commit_fails_cleanly(cli, tree: Path, remotes: Remotes, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reg = write_registry(tmp_path / "bad.json", {"giant-kitten": registry_entry(
        remotes.kitten, ref="0123456789abcdef0123456789abcdef01234567")})
    monkeypatch.setattr(ext_mod, "REGISTRY_FILE", reg)
    res = cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json")
    assert res.code == 1
    entry = _json(res)["extensions"][0]
    assert entry["status"] == "failed"
    assert "has no commit" in entry["reason"]
    # exit 1 with --json: the error envelope rides in the same document, one line + hint on stderr
    assert "could not be installed" in _json(res)["error"]["message"] and _json(res)["error"]["hint"]
    assert "error:" in res.err and "hint:" in res.err
    assert sorted(p.name for p in (tree / "extensions").iterdir()) == []


def test_unreachable_url_fails_with_one_clear_reason(cli, tree: Path, remotes: Remotes, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    reg = write_registry(tmp_path / "bad.json", {"giant-kitten": registry_entry(
        remotes.kitten, url=str(tmp_path / "gone" / "kitten.git"))})
    monkeypatch.setattr(ext_mod, "REGISTRY_FILE", reg)
    res = cli("install-extensions", "--webui", str(tree))
    assert res.code == 1
    assert "cannot clone" in res.out
    assert "Traceback" not in res.err
    assert list((tree / "extensions").iterdir()) == []


def test_forge_skips_vram_estimator_with_the_reason(cli, tmp_path: Path, remotes: Remotes) -> None:
    forge = make_webui(tmp_path / "forge", flavor="forge")
    data = _json(cli("install-extensions", "vram-estimator", "giant-kitten", "--webui", str(forge), "--json"))
    assert data["ui"] == "forge"
    by_name = {e["name"]: e for e in data["extensions"]}
    assert by_name["vram-estimator"]["status"] == "skipped"
    assert "Gradio 4" in by_name["vram-estimator"]["reason"]
    assert not (forge / "extensions" / remotes.vram.dir).exists()


def test_source_and_mirror_install_offline_with_origin_set_to_the_registry(
        cli, tree: Path, remotes: Remotes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the registry names the real GitHub URLs; nothing may reach them
    reg = write_registry(tmp_path / "gh.json", {
        "vram-estimator": registry_entry(remotes.vram, url="https://github.invalid/space-nuko/vram.git"),
        "giant-kitten": registry_entry(remotes.kitten, url="https://github.invalid/klimaleksus/kitten"),
    })
    monkeypatch.setattr(ext_mod, "REGISTRY_FILE", reg)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copytree(remotes.vram.bare, mirror / "vram-estimator")
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror))
    data = _json(cli("install-extensions", "--source", f"giant-kitten={remotes.kitten.url}", "vram-estimator",
                     "--webui", str(tree), "--json"))
    assert _statuses(data) == {"vram-estimator": "installed", "giant-kitten": "installed"}
    vram = tree / "extensions" / remotes.vram.dir
    assert git("remote", "get-url", "origin", cwd=vram) == "https://github.invalid/space-nuko/vram.git"
    kitten = tree / "extensions" / remotes.kitten.dir
    assert git("remote", "get-url", "origin", cwd=kitten) == "https://github.invalid/klimaleksus/kitten"
    # recognised afterwards through the registry URL it now carries
    again = _json(cli("install-extensions", "--webui", str(tree), "--json"))
    assert _statuses(again) == {"vram-estimator": "up-to-date", "giant-kitten": "up-to-date"}


@pytest.mark.parametrize("bad", ["ext::sh -c 'touch /tmp/x'", "ftp://host/x", "--upload-pack=x"])
def test_bad_source_urls_are_refused(cli, tree: Path, remotes: Remotes, bad: str) -> None:
    res = cli("install-extensions", "--source", f"giant-kitten={bad}", "--webui", str(tree))
    assert res.code != 0
    assert "refusing git source" in res.err
    assert list((tree / "extensions").iterdir()) == []


@pytest.mark.parametrize("bad_dir", ["..", "../escape", "/abs", "a/b", "..hidden", ""])
def test_registry_dirs_escaping_extensions_are_refused(tmp_path: Path, remotes: Remotes, bad_dir: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    entry = registry_entry(remotes.kitten)
    entry["dir"] = bad_dir
    if not bad_dir:
        entry["url"] = "https://example.invalid/repo/.."  # the folder would come from the URL: ".."
    reg = write_registry(tmp_path / "bad.json", {"giant-kitten": entry})
    with pytest.raises(ext_mod.ExtensionError, match="could escape"):
        ext_mod.load_registry(reg)


def test_escaping_plan_spec_is_refused_at_install(tmp_path: Path, remotes: Remotes) -> None:
    from lowvram.world.apply.manifest import Manifest

    tree = make_webui(tmp_path / "w")
    entry = ext_mod.RegistryEntry(name="giant-kitten", url=remotes.kitten.url, ref=remotes.kitten.pin,
                                  dir="../../outside", uis=("a1111",))
    result = ext_mod.install_one(tree, entry, Manifest(webui=tree), ui="a1111")
    assert result.status == "failed"
    assert "escape" in result.reason
    assert not (tmp_path / "outside").exists()


def test_unknown_name_suggests_the_right_one(cli, tree: Path, remotes: Remotes) -> None:
    res = cli("install-extensions", "giant-kiten", "--webui", str(tree))
    assert res.code == 2
    assert "unknown extension 'giant-kiten'" in res.err
    assert "giant-kitten" in res.err


def test_profile_lists_what_to_install(cli, tree: Path, remotes: Remotes, lowvram_home: Path) -> None:
    (lowvram_home / "profiles").mkdir(parents=True, exist_ok=True)
    (lowvram_home / "profiles" / "only-kitten.yaml").write_text(
        "name: only-kitten\ndescription: test\nextensions: [giant-kitten]\n")
    data = _json(cli("install-extensions", "--profile", "only-kitten", "--webui", str(tree), "--json"))
    assert _statuses(data) == {"giant-kitten": "installed"}


def test_stale_temp_clone_from_a_killed_run_is_removed(cli, tree: Path, remotes: Remotes) -> None:
    stale = tree / "extensions" / f".{remotes.kitten.dir}{fsutil.TEMP_MARK}dead"
    (stale / "scripts").mkdir(parents=True)
    res = cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json")
    assert res.code == 0
    assert not stale.exists()


# ---------------------------------------------------------------------------------------------
# What A1111 reads from each extension's checkout (issue 13 §3): on a detached HEAD it fails, caches
# the failure ("Failed reading extension data from Git repository") and shows nothing for it.


def a1111_reads(path: Path) -> dict[str, object]:
    """The fields A1111 1.8's `Extension.do_read_info_from_repo` reads, with the GitPython calls it makes
    (`Repo(path)`, `next(repo.remote().urls)`, `repo.head.commit`, `repo.active_branch.name`): what its
    Extensions tab and /sdapi/v1/extensions show. Raises where A1111's reading raises."""
    import git as gitpython

    assert (path / ".git").exists()
    with gitpython.Repo(path) as repo:
        assert not repo.bare
        remote = next(repo.remote().urls, None)
        commit = repo.head.commit
        commit_date = commit.committed_date
        branch = repo.active_branch.name if repo.active_branch else None  # TypeError on a detached HEAD
        return {"remote": remote, "commit_hash": commit.hexsha, "commit_date": commit_date, "branch": branch,
                "version": commit.hexsha[:8]}


def _commit_date(bare: Path, commit: str) -> int:
    return int(git("show", "-s", "--format=%ct", commit, cwd=bare))


GH = {"vram-estimator": "https://github.invalid/space-nuko/a1111-stable-diffusion-webui-vram-estimator",
      "giant-kitten": "https://github.invalid/klimaleksus/stable-diffusion-webui-giant-kitten"}


def _gh_registry(tmp_path: Path, remotes: Remotes, monkeypatch: pytest.MonkeyPatch, pin: int) -> None:
    reg = write_registry(tmp_path / f"gh-{pin}.json", {
        "vram-estimator": registry_entry(remotes.vram, url=GH["vram-estimator"], ref=remotes.vram.commits[pin]),
        "giant-kitten": registry_entry(remotes.kitten, url=GH["giant-kitten"], ref=remotes.kitten.commits[pin]),
    })
    monkeypatch.setattr(ext_mod, "REGISTRY_FILE", reg)


def _assert_a1111_reads(tree: Path, remotes: Remotes, pin: int) -> None:
    for repo in (remotes.vram, remotes.kitten):
        got = a1111_reads(tree / "extensions" / repo.dir)
        assert got == {"remote": GH[repo.key], "commit_hash": repo.commits[pin],
                       "commit_date": _commit_date(repo.bare, repo.commits[pin]), "branch": "master",
                       "version": repo.commits[pin][:8]}, repo.key


def test_a1111_reads_branch_version_and_remote_after_install_update_and_rerun(
        cli, tree: Path, remotes: Remotes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sources = ["--source", f"vram-estimator={remotes.vram.url}", "--source", f"giant-kitten={remotes.kitten.url}"]
    _gh_registry(tmp_path, remotes, monkeypatch, pin=1)  # the pin is one commit behind master upstream
    data = _json(cli("install-extensions", *sources, "--webui", str(tree), "--json"))
    assert _statuses(data) == {"vram-estimator": "installed", "giant-kitten": "installed"}
    _assert_a1111_reads(tree, remotes, pin=1)
    kitten = tree / "extensions" / remotes.kitten.dir
    assert git("rev-parse", "--abbrev-ref", "master@{upstream}", cwd=kitten) == "origin/master"

    again = _json(cli("install-extensions", *sources, "--webui", str(tree), "--json"))
    assert _statuses(again) == {"vram-estimator": "up-to-date", "giant-kitten": "up-to-date"}
    assert all(not e["reason"] for e in again["extensions"])
    _assert_a1111_reads(tree, remotes, pin=1)

    _gh_registry(tmp_path, remotes, monkeypatch, pin=2)  # a newer lowvram pins the newest commits
    data = _json(cli("install-extensions", "--update", *sources, "--webui", str(tree), "--json"))
    assert _statuses(data) == {"vram-estimator": "updated", "giant-kitten": "updated"}
    _assert_a1111_reads(tree, remotes, pin=2)

    res = cli("revert", "--webui", str(tree), "--json")
    assert res.code == 0, res.err
    assert not (tree / "extensions" / remotes.vram.dir).exists()
    assert not kitten.exists()


def test_a_detached_install_from_an_older_lowvram_is_put_on_a_branch_by_a_rerun(
        cli, tree: Path, remotes: Remotes) -> None:
    cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json")
    kitten = tree / "extensions" / remotes.kitten.dir
    git("checkout", "-q", "--detach", remotes.kitten.pin, cwd=kitten)  # what lowvram did before
    git("branch", "-q", "-D", "master", cwd=kitten)
    with pytest.raises(TypeError):
        a1111_reads(kitten)
    data = _json(cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "up-to-date"
    assert "branch master" in data["extensions"][0]["reason"]
    assert a1111_reads(kitten)["branch"] == "master"
    assert head_of(kitten) == remotes.kitten.pin
    assert cli("revert", "--webui", str(tree)).code == 0
    assert not kitten.exists()


def test_a_users_detached_clone_at_the_pin_moves_only_with_update_and_comes_back(
        cli, tree: Path, remotes: Remotes) -> None:
    kitten = tree / "extensions" / remotes.kitten.dir
    git("clone", "-q", remotes.kitten.url, str(kitten))
    git("checkout", "-q", "--detach", remotes.kitten.pin, cwd=kitten)
    data = _json(cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "up-to-date"
    assert "--update giant-kitten" in data["extensions"][0]["reason"]
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=kitten) == "HEAD"  # the user's: not moved
    data = _json(cli("install-extensions", "giant-kitten", "--update", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "up-to-date"
    # master held only published commits (origin/master has them): moved to the pin, as `git reset` would
    assert a1111_reads(kitten)["branch"] == "master"
    assert head_of(kitten) == remotes.kitten.pin
    assert cli("revert", "--webui", str(tree)).code == 0
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=kitten) == "HEAD"  # detached again, as it was
    assert head_of(kitten) == remotes.kitten.pin
    assert git("rev-parse", "master", cwd=kitten) == remotes.kitten.commits[-1]


def test_update_never_moves_a_branch_with_the_users_own_commits(cli, tree: Path, remotes: Remotes) -> None:
    kitten = tree / "extensions" / remotes.kitten.dir
    git("clone", "-q", remotes.kitten.url, str(kitten))
    (kitten / "notes.md").write_text("mine\n")
    git("add", "notes.md", cwd=kitten)
    git("commit", "-q", "-m", "my notes", cwd=kitten)
    mine = head_of(kitten)
    data = _json(cli("install-extensions", "giant-kitten", "--update", "--webui", str(tree), "--json"))
    assert data["extensions"][0]["status"] == "updated"
    branch = f"lowvram-{remotes.kitten.pin[:8]}"
    assert a1111_reads(kitten)["branch"] == branch
    assert head_of(kitten) == remotes.kitten.pin
    assert git("rev-parse", "master", cwd=kitten) == mine  # the user's branch, untouched
    assert cli("revert", "--webui", str(tree)).code == 0
    assert git("symbolic-ref", "--short", "HEAD", cwd=kitten) == "master"
    assert head_of(kitten) == mine
    assert git("branch", "--list", branch, cwd=kitten) == ""


def test_revert_keeps_an_install_that_holds_the_users_commits_on_a_branch(cli, tree: Path, remotes: Remotes) -> None:
    cli("install-extensions", "giant-kitten", "--webui", str(tree), "--json")
    kitten = tree / "extensions" / remotes.kitten.dir
    git("checkout", "-q", "-b", "my-fix", cwd=kitten)
    (kitten / "fix.txt").write_text("fix\n")
    git("add", "fix.txt", cwd=kitten)
    git("commit", "-q", "-m", "my fix", cwd=kitten)
    git("checkout", "-q", "master", cwd=kitten)  # back at the pin, clean: only the branch is the user's
    data = _json(cli("revert", "--webui", str(tree), "--json"))
    entry = next(e for e in data["extensions"] if e["name"] == "giant-kitten")
    assert entry["status"] == "kept"
    assert "my-fix" in entry["reason"]
    assert kitten.is_dir()
