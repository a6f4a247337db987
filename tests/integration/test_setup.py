"""`lowvram setup` end to end: real git clones from local bare repositories, real apply, real state.

The mirror (tests/fixtures/ui_repos.py) stands in for each UI's upstream; LOWVRAM_MIRROR or
--source points setup at it. Refusals are checked to leave the disk exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest

from lowvram.core import markers
from lowvram.world import fsutil, paths, setup_ui, state
from tests.conftest import run_lowvram
from tests.fixtures.fake_nvml import gtx1070, no_driver
from tests.fixtures.ui_repos import UiMirror, build_ui_mirror, git, pin_extensions


@pytest.fixture(scope="session")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> UiMirror:
    return build_ui_mirror(tmp_path_factory.mktemp("ui-mirror") / "mirror")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as on a machine without an NVIDIA GPU, whatever this one has."""
    from lowvram.world.detect import nvml

    monkeypatch.setattr(nvml, "pynvml", no_driver())


@pytest.fixture(autouse=True)
def system_python(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A system Python 3.10 that answers at once (the UI's first start would build its venv with it)."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for name in ("python3.10", "python3"):
        (bin_dir / name).write_text("#!/bin/sh\necho 3.10\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.fixture
def with_mirror(mirror: UiMirror, monkeypatch: pytest.MonkeyPatch) -> UiMirror:
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror.root))
    pin_extensions(monkeypatch, mirror)
    return mirror


def _json(out: str) -> dict:
    return json.loads(out)


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _no_temps(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if fsutil.TEMP_MARK in p.name]
    assert not left, f"temp clones left behind: {left}"


def _origin(path: Path) -> str:
    return git(path, "remote", "get-url", "origin")


# --------------------------------------------------------------------------------------------
# Clone into nothing


def test_setup_clones_the_pinned_release_and_applies_the_plan(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "sd" / "webui"
    r = cli("setup", "--ui", "a1111", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert next(iter(data)) == "schema"
    assert data["ui"] == "a1111"
    assert data["dir"] == str(target)
    assert data["adopted"] is False and data["resumed"] is False
    # The release tag, not the branch head one commit later.
    assert data["ref"] == "v1.10.1"
    assert data["commit"] == with_mirror["a1111"].commit
    assert git(target, "rev-parse", "HEAD") == with_mirror["a1111"].commit
    # A clone from a mirror looks like any other install: origin is the project's URL.
    assert _origin(target) == setup_ui.ui_spec("a1111").url
    # The mirror's tag is not upstream's commit: said, not hidden.
    assert any("not the upstream release" in w for w in data["warnings"])
    # The plan was applied: the managed block is in webui-user.sh.
    assert markers.BLOCK_BEGIN in (target / "webui-user.sh").read_text()
    assert "plan" in data["apply"] and "changes" in data["apply"]
    assert data["launch"] == f"lowvram launch --webui {target}"
    assert data["first_start"] and data["first_start_download_mb"] > 1000
    # Remembered, so later commands find it without --webui.
    assert state.last_webui() == target.resolve()
    _no_temps(target.parent)


def test_the_clone_is_on_a_branch_as_a_users_would_be(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    """A1111's config_states (its Extensions tab's backups) reads `webui_repo.active_branch.name` and, on
    a detached HEAD, records no remote, commit or branch for the UI; `git pull` refuses to run there."""
    import git as gitpython

    target = tmp_path / "w"
    assert cli("setup", "--ui", "a1111", "--dir", str(target), "--json").code == 0
    with gitpython.Repo(target) as repo:  # the GitPython calls A1111 1.8's get_webui_config makes
        assert next(repo.remote().urls, None) == setup_ui.ui_spec("a1111").url
        assert repo.head.commit.hexsha == with_mirror["a1111"].commit  # the release, not the branch tip
        assert repo.active_branch.name == "master"
    assert git(target, "rev-parse", "--abbrev-ref", "master@{upstream}") == "origin/master"


def test_setup_json_contract_keys(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    r = cli("setup", "--dir", str(tmp_path / "w"), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    for key in ("schema", "ui", "dir", "ref", "adopted", "resumed", "apply"):
        assert key in data
    assert data["schema"] == 1
    assert isinstance(data["adopted"], bool) and isinstance(data["resumed"], bool)
    assert isinstance(data["apply"], dict)


def test_default_dir_is_under_the_data_dir(cli, with_mirror: UiMirror) -> None:
    r = cli("setup", "--json")
    assert r.code == 0, r.err
    expected = paths.data_dir() / "stable-diffusion-webui"
    assert _json(r.out)["dir"] == str(expected)
    assert (expected / "webui.sh").is_file()
    assert state.last_webui() == expected.resolve()


def test_human_output_says_how_to_start_and_what_downloads(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "webui"
    r = cli("setup", "--dir", str(target))
    assert r.code == 0, r.err
    assert f"lowvram launch --webui {target}" in r.out
    assert "The first start downloads about" in r.out
    assert "torch" in r.out
    assert "cloned from" in r.out


def test_empty_existing_dir_is_cloned_into(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    assert (target / "launch.py").is_file()
    assert _json(r.out)["adopted"] is False


def test_ref_overrides_the_pin(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "w"
    head = with_mirror["a1111"].head
    r = cli("setup", "--dir", str(target), "--ref", head, "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["commit"] == head and data["ref"] == head
    assert not any("upstream release" in w for w in data["warnings"])


def test_explicit_profile_is_remembered(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    name = "pascal-sd15"
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--profile", name, "--json")
    assert r.code == 0, r.err
    assert _json(r.out)["profile"] == name
    assert state.remembered_profile(target) == name


def test_gtx1070_gets_its_flags_and_extensions_from_the_mirror(cli, with_mirror: UiMirror, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from lowvram.world.detect import nvml

    monkeypatch.setattr(nvml, "pynvml", gtx1070())
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    plan = data["apply"]["plan"]
    assert plan["args"], "a GTX 1070 plan adds flags"
    block = (target / "webui-user.sh").read_text()
    for flag in plan["args"]:
        assert flag in block
    installed = {e["name"]: e for e in data["apply"]["extensions"]}
    assert installed and all(e["status"] == "installed" for e in installed.values())
    for name, ext in installed.items():
        checkout = target / "extensions" / ext["dir"]
        assert git(checkout, "rev-parse", "HEAD") == with_mirror.extensions[name]
        assert "github.com" in _origin(checkout)  # origin is the registry URL, not the mirror
        assert git(checkout, "symbolic-ref", "--short", "HEAD") == "master"  # A1111 reads active_branch
    # No checkpoint yet: planned for the model A1111's first start downloads, and said so.
    model = next(d for d in plan["decisions"] if d["setting"] == "model")
    assert model["value"] == "sd15"
    assert any("no checkpoint yet" in n for n in data["notes"]) or "first start" in model["reason"]
    assert any("v1-5-pruned-emaonly" in d["what"] for d in data["first_start"])


def test_facts_from_a_file_plan_for_that_machine_and_remember_nothing(
        cli, with_mirror: UiMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowvram.world.detect import nvml

    monkeypatch.setattr(nvml, "pynvml", gtx1070())
    facts = cli("doctor", "--json").out
    monkeypatch.setattr(nvml, "pynvml", no_driver())
    facts_file = tmp_path / "friend.json"
    facts_file.write_text(facts)
    monkeypatch.setenv("LOWVRAM_FACTS", str(facts_file))
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["apply"]["plan"]["profile"] != "cpu"  # the friend's GTX 1070, not this machine
    assert any("not remembered" in n for n in data["notes"])
    assert state.last_webui() is None


def test_an_extension_that_cannot_be_fetched_fails_the_run_but_not_the_setup(
        cli, mirror: UiMirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowvram.world.detect import nvml

    monkeypatch.setattr(nvml, "pynvml", gtx1070())
    monkeypatch.setenv("LOWVRAM_MIRROR", str(mirror.root))  # the registry's real pins: not in the mirror
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 1
    data = _json(r.out)
    assert any(e["status"] == "failed" for e in data["apply"]["extensions"])
    assert markers.BLOCK_BEGIN in (target / "webui-user.sh").read_text()
    assert data["launch"] == f"lowvram launch --webui {target}"
    assert state.last_webui() == target.resolve()


@pytest.mark.parametrize("ui", ["forge", "sdnext", "comfyui"])
def test_other_uis(cli, with_mirror: UiMirror, tmp_path: Path, ui: str) -> None:
    target = tmp_path / ui
    args = ["setup", "--ui", ui, "--dir", str(target), "--json"]
    if ui == "forge":  # Forge pins a commit the fixture cannot have; take the fixture's release
        args += ["--ref", with_mirror["forge"].tag]
    r = cli(*args)
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["ui"] == ui
    assert data["commit"] == with_mirror[ui].commit
    from lowvram.world.detect.webui import detect_flavor

    assert detect_flavor(target) == ui
    assert data["launch"] == f"lowvram launch --webui {target}"
    if ui == "comfyui":  # no webui-user file, nothing written into the tree; its venv is the user's to make
        assert not (target / "webui-user.sh").exists()
        assert data["apply"]["changes"] == []
        assert data["before_launch"][0] == f"python3 -m venv {target}/venv"
        assert any("requirements.txt" in c for c in data["before_launch"])
    else:
        assert data["before_launch"] == []


def test_sdnext_on_a_pascal_card_warns_about_its_cuda_13_torch(cli, with_mirror: UiMirror, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from lowvram.world.detect import nvml

    monkeypatch.setattr(nvml, "pynvml", gtx1070())
    r = cli("setup", "--ui", "sdnext", "--dir", str(tmp_path / "sdnext"), "--json")
    assert r.code == 0, r.err
    (warning,) = [w for w in _json(r.out)["warnings"] if "too old for the torch" in w]
    assert "GTX 1070" in warning and "6.1" in warning and "TORCH_COMMAND" in warning
    # A1111's torch 2.1.2+cu121 still runs on Pascal: no such warning there.
    r = cli("setup", "--ui", "a1111", "--dir", str(tmp_path / "a1111"), "--json")
    assert not [w for w in _json(r.out)["warnings"] if "too old for the torch" in w]


def test_forge_pin_missing_from_the_mirror_fails_cleanly(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "forge"
    r = cli("setup", "--ui", "forge", "--dir", str(target))
    assert r.code == 1
    assert "has no commit" in r.err
    assert "Traceback" not in r.err
    assert not target.exists()
    _no_temps(tmp_path)


# --------------------------------------------------------------------------------------------
# Sources


def test_source_option_clones_from_that_url(cli, mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "w"
    bare = mirror["a1111"].path
    r = cli("setup", "--dir", str(target), "--source", f"a1111={bare}", "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["source"] == str(bare)
    assert data["commit"] == mirror["a1111"].commit
    assert _origin(target) == setup_ui.ui_spec("a1111").url


def test_source_beats_the_mirror(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    other = tmp_path / "other-mirror"
    from tests.fixtures.ui_repos import build_ui_repo

    repo = build_ui_repo(other, "a1111")
    r = cli("setup", "--dir", str(tmp_path / "w"), "--source", f"a1111={repo.path}", "--json")
    assert r.code == 0, r.err
    assert _json(r.out)["commit"] == repo.commit != with_mirror["a1111"].commit


def test_source_for_a_non_ui_is_a_usage_error(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--source", "vram-estimator=/x")
    assert r.code == 2
    assert "not a UI" in r.err
    assert not target.exists()


def test_malformed_source_is_a_usage_error(cli, tmp_path: Path) -> None:
    r = cli("setup", "--dir", str(tmp_path / "w"), "--source", "a1111")
    assert r.code == 2
    assert "UI=URL" in r.err


def test_ext_transport_source_is_refused(cli, tmp_path: Path) -> None:
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--source", "a1111=ext::sh -c touch% /tmp/pwned")
    assert r.code == 1
    assert "refusing git source" in r.err
    assert not target.exists()


def test_unreachable_source_leaves_nothing(cli, tmp_path: Path) -> None:
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target), "--source", f"a1111={tmp_path / 'nowhere'}")
    assert r.code == 1
    assert "cannot clone" in r.err
    assert "Traceback" not in r.err
    assert not target.exists()
    _no_temps(tmp_path)


# --------------------------------------------------------------------------------------------
# Adopt or refuse what is already there


def test_existing_checkout_is_adopted_not_recloned(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    git(tmp_path, "clone", "-q", str(with_mirror["a1111"].path), str(target))  # the user's own clone, at HEAD
    (target / "my-notes.txt").write_text("mine\n")
    inode = target.stat().st_ino
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["adopted"] is True and data["resumed"] is False
    assert data["commit"] == with_mirror["a1111"].head  # left where the user had it
    assert git(target, "rev-parse", "HEAD") == with_mirror["a1111"].head
    assert target.stat().st_ino == inode
    assert (target / "my-notes.txt").read_text() == "mine\n"
    assert markers.BLOCK_BEGIN in (target / "webui-user.sh").read_text()
    assert any("left as it is" in w for w in data["warnings"])


def test_an_adopted_tree_whose_apply_failed_is_adopted_again_not_resumed(cli, with_mirror: UiMirror,
                                                                          tmp_path: Path) -> None:
    """`resumed` means lowvram's own clone from a killed run; the user's checkout is never that."""
    target = tmp_path / "mine"
    git(tmp_path, "clone", "-q", str(with_mirror["a1111"].path), str(target))
    with fsutil.webui_lock(paths.lock_path(target)):  # a running `lowvram launch` holds the WebUI
        r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 1 and "another lowvram process" in _json(r.out)["error"]["message"]
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["adopted"] is True and data["resumed"] is False


def test_ref_is_not_applied_to_an_adopted_tree(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    git(tmp_path, "clone", "-q", str(with_mirror["a1111"].path), str(target))
    r = cli("setup", "--dir", str(target), "--ref", with_mirror["a1111"].tag, "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["adopted"] is True
    assert git(target, "rev-parse", "HEAD") == with_mirror["a1111"].head
    assert any("--ref v1.10.1 ignored" in w for w in data["warnings"])


def test_a_second_setup_of_the_same_folder_waits_its_turn(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "w"
    with fsutil.webui_lock(paths.webui_state_dir(target) / "setup.lock"):
        r = cli("setup", "--dir", str(target))
    assert r.code == 1
    assert "another lowvram process is using setup of" in r.err
    assert not target.exists()


def test_tree_without_git_is_adopted(cli, tmp_path: Path) -> None:
    from tests.fixtures.webui_trees import make_webui

    target = make_webui(tmp_path / "zip-install", flavor="a1111")
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["adopted"] is True
    assert data["commit"] is None


def test_no_ui_option_adopts_the_ui_that_is_there(cli, tmp_path: Path) -> None:
    from tests.fixtures.webui_trees import make_webui

    target = make_webui(tmp_path / "forge", flavor="forge")
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 0, r.err
    data = _json(r.out)
    assert data["ui"] == "forge" and data["adopted"] is True


def test_foreign_folder_is_refused_and_untouched(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"\xff\xd8")
    before = _listing(tmp_path)
    r = cli("setup", "--dir", str(target))
    assert r.code == 1
    assert "not empty and not a Stable Diffusion WebUI" in r.err
    assert "Traceback" not in r.err
    assert _listing(tmp_path) == before
    assert not paths.webui_state_dir(target).exists()


def test_a_file_as_target_is_refused(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    r = cli("setup", "--dir", str(target), "--json")
    assert r.code == 1
    assert _json(r.out)["error"]["message"].endswith("setup will not clone into it")
    assert target.read_text() == "x"


def test_another_ui_is_refused_with_the_right_hint(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    from tests.fixtures.webui_trees import make_webui

    target = make_webui(tmp_path / "forge", flavor="forge")
    before = _listing(target)
    r = cli("setup", "--ui", "a1111", "--dir", str(target))
    assert r.code == 1
    assert "is a forge install, not a1111" in r.err
    assert "--ui forge" in r.err
    assert _listing(target) == before


# --------------------------------------------------------------------------------------------
# Preflight: refused before touching the disk


def test_no_git_is_refused_before_touching_the_disk(cli, with_mirror: UiMirror, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    target = tmp_path / "sd" / "w"
    r = cli("setup", "--dir", str(target))
    assert r.code == 1
    assert "git is not installed" in r.err
    assert "install git" in r.err
    assert not (tmp_path / "sd").exists()
    assert not paths.webui_state_dir(target).exists()


def test_unwritable_target_is_refused(cli, with_mirror: UiMirror, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    real_access = os.access

    def access(path, mode, *a, **kw):  # type: ignore[no-untyped-def]
        if Path(path) == parent and mode & os.W_OK:
            return False
        return real_access(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    r = cli("setup", "--dir", str(parent / "w"))
    assert r.code == 1
    assert "is not writable" in r.err
    assert list(parent.iterdir()) == []


def test_unwritable_adopted_tree_is_refused(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.fixtures.webui_trees import make_webui

    target = make_webui(tmp_path / "w", flavor="a1111")
    before = (target / "webui-user.sh").read_bytes()
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, m, *a, **k: False if Path(p) == target and m & os.W_OK else real_access(p, m, *a, **k))
    r = cli("setup", "--dir", str(target))
    assert r.code == 1
    assert "not writable" in r.err
    assert (target / "webui-user.sh").read_bytes() == before


def test_too_little_disk_is_refused(cli, with_mirror: UiMirror, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 * 2**30, 10 * 2**30 - 50 * 2**20, 50 * 2**20))
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target))
    assert r.code == 1
    assert "only 50 MiB free" in r.err
    assert not target.exists()


def test_little_disk_for_the_first_start_is_only_a_warning(cli, with_mirror: UiMirror, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage(10 * 2**30, 0, 2 * 2**30))
    r = cli("setup", "--dir", str(tmp_path / "w"), "--json")
    assert r.code == 0, r.err
    assert any("first start needs about" in w for w in _json(r.out)["warnings"])


def test_no_gpu_is_a_warning_not_a_refusal(cli, with_mirror: UiMirror, tmp_path: Path) -> None:
    # This machine has no NVIDIA GPU: doctor fails its GPU check, setup goes on and says so.
    r = cli("setup", "--dir", str(tmp_path / "w"), "--json")
    assert r.code == 0, r.err
    warnings = " ".join(_json(r.out)["warnings"]).lower()
    assert "gpu" in warnings or "nvidia" in warnings


# --------------------------------------------------------------------------------------------
# Interrupted runs


def _setup_subprocess(target: Path, mirror: UiMirror, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"LOWVRAM_MIRROR": str(mirror.root), "LOWVRAM_HOME": os.environ["LOWVRAM_HOME"]}
    # An explicit profile without extensions: the subprocess cannot use the test registry's pins.
    return run_lowvram("setup", "--dir", str(target), "--profile", "cpu", "--json", env={**base, **env})


@pytest.mark.parametrize(("kill_at", "resumed"), [
    ("gitops:clone:after-fetch", False),  # objects fetched, nothing checked out: start clean
    ("gitops:clone:before-rename", True),  # a complete, verified clone beside the target: move it in
    ("gitops:clone:after-rename", True),  # cloned, not configured: configure it
])
def test_killed_clone_then_rerun(mirror: UiMirror, tmp_path: Path, kill_at: str, resumed: bool) -> None:
    target = tmp_path / "w"
    killed = _setup_subprocess(target, mirror, LOWVRAM_KILL_AT=kill_at)
    assert killed.returncode == -9
    again = _setup_subprocess(target, mirror)
    assert again.returncode == 0, again.stderr
    data = _json(again.stdout)
    assert data["resumed"] is resumed
    assert data["adopted"] is False
    assert data["ref"] == "v1.10.1"
    assert len(data["cleaned"]) == (0 if resumed else 1)
    assert git(target, "rev-parse", "HEAD") == mirror["a1111"].commit
    changed = [line.split()[-1] for line in git(target, "status", "--porcelain", "--untracked-files=no").splitlines()]
    assert changed == ["webui-user.sh"]
    assert (target / "webui-user.sh").read_text().count(markers.BLOCK_BEGIN) == 1
    _no_temps(tmp_path)


def test_killed_at_random_points_always_recovers(mirror: UiMirror, tmp_path: Path) -> None:
    import random

    trace = tmp_path / "trace"
    probe = _setup_subprocess(tmp_path / "probe", mirror, LOWVRAM_KILL_TRACE=str(trace))
    assert probe.returncode == 0, probe.stderr
    points = trace.read_text().splitlines()
    assert "setup:cloned" in points and "gitops:clone:before-rename" in points
    for n in sorted(random.Random(8).sample(range(1, len(points) + 1), k=min(2, len(points)))):
        target = tmp_path / f"w{n}"
        killed = _setup_subprocess(target, mirror, LOWVRAM_KILL_AT=str(n))
        assert killed.returncode == -9, (n, points[n - 1], killed.stderr)
        again = _setup_subprocess(target, mirror)
        assert again.returncode == 0, (points[n - 1], again.stderr)
        assert git(target, "rev-parse", "HEAD") == mirror["a1111"].commit
        assert (target / "webui-user.sh").read_text().count(markers.BLOCK_BEGIN) == 1
        _no_temps(tmp_path)


def test_killed_after_the_clone_then_rerun_resumes_configuring(mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "w"
    killed = _setup_subprocess(target, mirror, LOWVRAM_KILL_AT="setup:cloned")
    assert killed.returncode == -9
    assert (target / "webui.sh").exists()
    assert markers.BLOCK_BEGIN not in (target / "webui-user.sh").read_text()
    again = _setup_subprocess(target, mirror)
    assert again.returncode == 0, again.stderr
    data = _json(again.stdout)
    assert data["resumed"] is True and data["adopted"] is False
    assert markers.BLOCK_BEGIN in (target / "webui-user.sh").read_text()
    # A third run is an ordinary adoption of a finished setup.
    third = _setup_subprocess(target, mirror)
    assert third.returncode == 0, third.stderr
    assert _json(third.stdout)["adopted"] is True


def test_ctrl_c_mid_clone_leaves_nothing(cli, with_mirror: UiMirror, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(name: str) -> None:
        if name == "gitops:clone:after-fetch":
            raise KeyboardInterrupt

    monkeypatch.setattr(fsutil, "kill_point", interrupt)
    target = tmp_path / "w"
    r = cli("setup", "--dir", str(target))
    assert r.code == 130
    assert not target.exists()
    _no_temps(tmp_path)


def test_ctrl_c_keeps_an_empty_target_folder(cli, with_mirror: UiMirror, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(name: str) -> None:
        if name == "gitops:clone:after-fetch":
            raise KeyboardInterrupt

    monkeypatch.setattr(fsutil, "kill_point", interrupt)
    target = tmp_path / "empty"
    target.mkdir()
    r = cli("setup", "--dir", str(target))
    assert r.code == 130
    assert target.is_dir() and list(target.iterdir()) == []


# --------------------------------------------------------------------------------------------
# What the issue checks: setup, then doctor and launch --dry-run find it


def _setup_x(mirror: UiMirror, target: Path) -> dict[str, str]:
    env = {"LOWVRAM_MIRROR": str(mirror.root), "LOWVRAM_HOME": os.environ["LOWVRAM_HOME"]}
    done = run_lowvram("setup", "--ui", "a1111", "--dir", str(target), env=env)
    assert done.returncode == 0, done.stderr
    assert f"lowvram launch --webui {target}" in done.stdout
    return env


def _assert_launch_command(launch: subprocess.CompletedProcess[str], target: Path) -> None:
    assert launch.returncode == 0, launch.stderr
    plan = json.loads(launch.stdout)
    assert any(str(a).endswith("webui.sh") for a in plan["launch"]["argv"])
    assert Path(plan["launch"]["cwd"]) == target


def test_setup_then_doctor_finds_the_pinned_release_configured(mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "X"
    env = _setup_x(mirror, target)
    doctor = run_lowvram("doctor", "--webui", str(target), "--json", env=env)
    report = json.loads(doctor.stdout)
    assert report["webui"]["flavor"] == "a1111"
    assert report["webui"]["version"] in ("v1.10.1", "1.10.1")
    assert git(target, "describe", "--tags") == "v1.10.1"
    assert markers.BLOCK_BEGIN in (target / "webui-user.sh").read_text()
    # Remembered: a command with no --webui at all finds it.
    launch = run_lowvram("launch", "--dry-run", "--model", "sd15", "--json", env=env, cwd=tmp_path)
    _assert_launch_command(launch, target)


def test_setup_then_launch_dry_run_shows_the_command(mirror: UiMirror, tmp_path: Path) -> None:
    target = tmp_path / "X"
    env = _setup_x(mirror, target)
    launch = run_lowvram("launch", "--dry-run", "--webui", str(target), "--json", env=env)
    _assert_launch_command(launch, target)
