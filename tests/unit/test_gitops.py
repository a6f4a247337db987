"""gitops: which sources are accepted, how URLs compare, where clones come from, pinned clones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lowvram.core.errors import ExtensionError
from lowvram.world import fsutil, gitops
from tests.fixtures.git_repos import git, head_of, make_extension_repo

ACCEPTED = [
    "https://github.com/space-nuko/a1111-stable-diffusion-webui-vram-estimator",
    "http://mirror.local/x.git",
    "git://host/repo.git",
    "ssh://git@github.com/a/b.git",
    "git@github.com:klimaleksus/stable-diffusion-webui-giant-kitten.git",
    "file:///srv/mirror/vram-estimator",
    "C:\\mirror\\giant-kitten",
]


@pytest.mark.parametrize("url", ACCEPTED)
def test_accepted_sources(url: str) -> None:
    assert gitops.validate_source_url(f"  {url} ") == url


def test_local_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert gitops.validate_source_url("mirror/vram") == str(tmp_path / "mirror" / "vram")
    assert gitops.validate_source_url(str(tmp_path)) == str(tmp_path)


REFUSED = [
    ("ext::sh -c touch% /tmp/pwned", "remote helpers"),
    ("fd::3", "remote helpers"),
    ("ftp://host/repo", "ftp:// transport"),
    ("gopher://host/x", "transport"),
    ("--upload-pack=touch /tmp/x", "starts with '-'"),
    ("", "empty"),
    ("https://", "no host"),
    ("https://host/x\nmore", "control characters"),
    ("file://", "no folder"),
]


@pytest.mark.parametrize(("url", "why"), REFUSED)
def test_refused_sources_say_why(url: str, why: str) -> None:
    with pytest.raises(ExtensionError) as info:
        gitops.validate_source_url(url)
    assert why in info.value.message
    assert info.value.hint


SAME = [
    ("https://github.com/A/b", "https://GitHub.com/A/b.git/"),
    ("https://github.com/A/b", "git@github.com:A/b.git"),
    ("https://github.com/A/b", "ssh://git@github.com:22/A/b"),
    ("https://github.com/A/b", "https://user@github.com:443/A/b"),
]


@pytest.mark.parametrize(("a", "b"), SAME)
def test_normalise_url_equates_spellings_of_one_repo(a: str, b: str) -> None:
    assert gitops.normalise_url(a) == gitops.normalise_url(b)


def test_normalise_url_keeps_different_repos_apart(tmp_path: Path) -> None:
    assert gitops.normalise_url("https://github.com/a/b") != gitops.normalise_url("https://github.com/a/c")
    assert gitops.normalise_url("https://github.com/a/b") != gitops.normalise_url("https://gitlab.com/a/b")
    assert gitops.normalise_url(str(tmp_path / "x.git")) == gitops.normalise_url(f"file://{tmp_path}/x")


def test_source_for_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reg = "https://github.com/a/b"
    assert gitops.source_for("k", reg, {}) == reg
    monkeypatch.setenv("LOWVRAM_MIRROR", str(tmp_path))
    assert gitops.source_for("k", reg, {}) == str(tmp_path / "k")
    assert gitops.source_for("k", reg, {"k": "/srv/k"}) == "/srv/k"
    with pytest.raises(ExtensionError):
        gitops.source_for("k", reg, {"k": "ext::sh"})


def test_clone_pinned_checks_out_the_pin_on_a_branch_and_sets_origin(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    dest = tmp_path / "ext" / "kitten"
    seen: list[str] = []
    got = gitops.clone_pinned(repo.url, repo.pin, dest, origin_url="https://github.com/k/kitten",
                              before_rename=lambda c: seen.append(c) or None)  # type: ignore[func-returns-value]
    assert got == repo.pin == head_of(dest) == seen[0]
    # On the remote's default branch, as a user's clone is (A1111 reads repo.active_branch), at the pin
    # although the branch's tip upstream is one commit newer; its upstream is origin/master.
    assert git("symbolic-ref", "--short", "HEAD", cwd=dest) == "master"
    assert git("rev-parse", "master", cwd=dest) == repo.pin != repo.commits[-1]
    assert git("rev-parse", "--abbrev-ref", "master@{upstream}", cwd=dest) == "origin/master"
    assert git("remote", "get-url", "origin", cwd=dest) == "https://github.com/k/kitten"
    assert "REVISION = 1" in (dest / repo.file).read_text()
    state = gitops.repo_state(dest)
    assert (state.head, state.dirty, state.untracked, state.branch) == (repo.pin, False, False, "master")
    assert not [p for p in dest.parent.iterdir() if fsutil.TEMP_MARK in p.name]


def _work_clone(repo_url: str, path: Path) -> Path:
    git("clone", "-q", repo_url, str(path))
    git("config", "user.name", "t", cwd=path)
    git("config", "user.email", "t@t.invalid", cwd=path)
    return path


def test_clone_from_a_detached_or_feature_branch_source_still_lands_on_master(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    src = _work_clone(repo.url, tmp_path / "src")
    git("checkout", "-q", "-b", "feature", repo.commits[0], cwd=src)  # a branch that lacks the pin
    (src / "x.txt").write_text("x")
    git("add", "x.txt", cwd=src)
    git("commit", "-q", "-m", "feature", cwd=src)
    gitops.clone_pinned(str(src), repo.pin, tmp_path / "a")
    assert git("symbolic-ref", "--short", "HEAD", cwd=tmp_path / "a") == "master"
    git("checkout", "-q", "--detach", repo.pin, cwd=src)  # a source on a detached HEAD
    gitops.clone_pinned(str(src), repo.pin, tmp_path / "b")
    assert git("symbolic-ref", "--short", "HEAD", cwd=tmp_path / "b") == "master"
    assert head_of(tmp_path / "b") == repo.pin


def test_put_on_branch_moves_a_published_branch_and_back(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    user = _work_clone(repo.url, tmp_path / "user")  # A1111's installer's clone: master at the newest
    seen: list[gitops.BranchMove] = []
    move = gitops.put_on_branch(user, repo.pin, before_change=seen.append)
    assert seen == [move] == [gitops.BranchMove("master", repo.commits[-1])]
    assert git("symbolic-ref", "--short", "HEAD", cwd=user) == "master"
    assert head_of(user) == repo.pin
    branches = {move.name: {"set": repo.pin, "before": move.before}}
    assert gitops.put_back(user, repo.commits[-1], "master", branches) == "master"
    assert head_of(user) == repo.commits[-1] == git("rev-parse", "master", cwd=user)


def test_a_branch_with_unpublished_commits_is_never_moved(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    user = _work_clone(repo.url, tmp_path / "user")
    (user / "mine.txt").write_text("my work")
    git("add", "mine.txt", cwd=user)
    git("commit", "-q", "-m", "mine", cwd=user)
    mine = head_of(user)
    move = gitops.put_on_branch(user, repo.pin)
    assert move == gitops.BranchMove(f"lowvram-{repo.pin[:8]}", None)
    assert git("rev-parse", "master", cwd=user) == mine  # the user's branch as it was
    assert git("symbolic-ref", "--short", "HEAD", cwd=user) == move.name
    assert gitops.unpublished_branches(user, repo.pin) == ["master"]
    assert gitops.put_back(user, mine, "master", {move.name: {"set": repo.pin, "before": None}}) == "master"
    assert head_of(user) == mine
    assert git("branch", "--list", move.name, cwd=user) == ""  # the branch lowvram made is gone


def test_put_back_leaves_a_branch_the_user_moved_since(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    dest = tmp_path / "ext"
    gitops.clone_pinned(repo.url, repo.pin, dest)
    git("checkout", "-q", "--detach", repo.commits[0], cwd=dest)
    move = gitops.put_on_branch(dest, repo.commits[0])  # master moved back from the pin
    assert move == gitops.BranchMove("master", repo.pin)
    git("branch", "-q", "-f", "other", repo.commits[-1], cwd=dest)
    branches = {"master": {"set": repo.commits[0], "before": repo.pin},
                "other": {"set": repo.commits[0], "before": None}}  # `other` points elsewhere now: theirs
    assert gitops.put_back(dest, repo.pin, "master", branches) == "master"
    assert git("rev-parse", "other", cwd=dest) == repo.commits[-1]
    assert head_of(dest) == repo.pin


def test_clone_pinned_missing_commit_leaves_nothing(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    dest = tmp_path / "ext" / "kitten"
    with pytest.raises(gitops.CloneError, match="has no commit"):
        gitops.clone_pinned(repo.url, "0123456789abcdef0123456789abcdef01234567", dest)
    assert not dest.exists()
    assert os.listdir(dest.parent) == []


def test_clone_pinned_unreachable_url_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "ext" / "kitten"
    with pytest.raises(gitops.CloneError) as info:
        gitops.clone_pinned(str(tmp_path / "no-such-repo"), "1d2362d267260238e021f3f8bd8543f11ec12eb8", dest)
    assert "cannot clone" in info.value.message
    assert "LOWVRAM_MIRROR" in info.value.hint
    assert os.listdir(dest.parent) == []


def test_clone_pinned_refuses_an_existing_destination(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "giant-kitten")
    dest = tmp_path / "kitten"
    dest.mkdir()
    (dest / "mine.txt").write_text("user data")
    with pytest.raises(gitops.CloneError, match="already exists"):
        gitops.clone_pinned(repo.url, repo.pin, dest)
    assert (dest / "mine.txt").read_text() == "user data"


def test_repo_state_sees_changes_untracked_and_ignored_files(tmp_path: Path) -> None:
    repo = make_extension_repo(tmp_path, "vram-estimator")
    dest = tmp_path / "vram"
    gitops.clone_pinned(repo.url, repo.pin, dest)
    (dest / "stats.json").write_text("{}")  # ignored by the extension's .gitignore
    state = gitops.repo_state(dest)
    assert (state.dirty, state.untracked, state.ignored) == (False, True, True)
    assert state.user_files == ("stats.json",)
    (dest / "stats.json").unlink()
    (dest / "scripts" / "__pycache__").mkdir()
    (dest / "scripts" / "__pycache__" / "vram_estimator.cpython-310.pyc").write_bytes(b"\0")
    assert gitops.repo_state(dest).user_files == ()
    (dest / repo.file).write_text("edited")
    assert gitops.repo_state(dest).dirty


def test_repo_state_of_a_plain_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ExtensionError, match="not a git checkout"):
        gitops.repo_state(tmp_path)
