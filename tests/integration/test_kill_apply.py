"""apply killed (SIGKILL) at its kill points: every file is old or new, and the next run finishes.

A small driver runs `apply_plan` in a subprocess with LOWVRAM_KILL_AT=n; the re-run and the
revert happen in-process. The block-only apply is killed at every one of its points; the full
apply (hook + two clones + config.json) at every named git/hook point plus a few counted ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.world import fsutil, paths
from lowvram.world.apply import apply_plan, revert
from tests.conftest import REPO
from tests.fixtures.git_repos import Remotes, linux_facts, make_remotes, simple_plan, spec_for, tree_snapshot
from tests.fixtures.webui_trees import make_webui

DRIVER = """
import json, os, sys
from pathlib import Path
from lowvram.world.apply import apply_plan, extensions
from tests.fixtures.git_repos import linux_facts, simple_plan
from lowvram.core.plan import ExtensionSpec
extensions.REGISTRY_FILE = Path(os.environ["TEST_REGISTRY"])
specs = tuple(ExtensionSpec(**s) for s in json.loads(os.environ["TEST_SPECS"]))
plan = simple_plan(extensions=specs, hook=os.environ["TEST_HOOK"] == "1")
result = apply_plan(plan, Path(sys.argv[1]), linux_facts())
sys.exit(result.exit_code)
"""


def _specs(remotes: Remotes | None) -> list[dict[str, str]]:
    if remotes is None:
        return []
    return [{"name": r.key, "url": r.url, "ref": r.pin, "dir": r.dir} for r in (remotes.vram, remotes.kitten)]


def _drive(tree: Path, home: Path, registry: Path, specs: list[dict[str, str]], hook: bool,
           **extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LOWVRAM_HOME=str(home), TEST_REGISTRY=str(registry), TEST_SPECS=json.dumps(specs),
               TEST_HOOK="1" if hook else "0", PYTHONPATH=str(REPO), **extra)
    return subprocess.run([sys.executable, "-c", DRIVER, str(tree)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)


def _temps(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if fsutil.TEMP_MARK in p.name]


class Scenario:
    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_extensions: bool) -> None:
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch
        self.remotes = make_remotes(tmp_path / "remotes", monkeypatch) if with_extensions else None
        self.registry = self.remotes.registry if self.remotes else tmp_path / "none.json"
        self.hook = with_extensions
        config = {"disabled_extensions": ["stable-diffusion-webui-giant-kitten"]} if with_extensions else None
        self.pristine = make_webui(tmp_path / "pristine", config=config, venv=False)
        self.original = tree_snapshot(self.pristine)
        # the finished result, from one uninterrupted run (also counts the kill points)
        tree, home = self.fresh("reference")
        trace = tmp_path / "trace.txt"
        done = _drive(tree, home, self.registry, _specs(self.remotes), self.hook, LOWVRAM_KILL_TRACE=str(trace))
        assert done.returncode == 0, done.stderr
        self.points = trace.read_text().splitlines()
        self.final = self.normalised(tree, home)

    @staticmethod
    def normalised(tree: Path, home: Path) -> dict[str, bytes]:
        """The tree's files, with this run's state-dir path (in LOWVRAM_CONFIG) made generic."""
        state = str(home / "webuis" / paths.webui_id(tree)).encode()
        return {k: v.replace(state, b"<STATE>") for k, v in tree_snapshot(tree).items() if "/.git/" not in k}

    def fresh(self, name: str) -> tuple[Path, Path]:
        tree = self.tmp / "runs" / name / "webui"
        shutil.copytree(self.pristine, tree)
        home = self.tmp / "runs" / name / "home"
        home.mkdir()
        return tree, home

    def kill_and_recover(self, at: str) -> None:
        tree, home = self.fresh(f"kill-{at.replace(':', '_')}")
        killed = _drive(tree, home, self.registry, _specs(self.remotes), self.hook, LOWVRAM_KILL_AT=at)
        assert killed.returncode == -9, f"kill point {at} not reached: {killed.stderr}"
        state = str(home / "webuis" / paths.webui_id(tree)).encode()
        for name in ("webui-user.sh", "config.json"):
            data = (tree / name).read_bytes().replace(state, b"<STATE>")
            assert data in (self.original[name], self.final[name]), f"{name} half-written after a kill at {at}"
        self.monkeypatch.setenv("LOWVRAM_HOME", str(home))
        manifest = paths.manifest_path(tree.resolve())
        if manifest.exists():
            json.loads(manifest.read_text())  # never a torn manifest
        # the next run finishes the job and leaves no temp behind
        plan = simple_plan(extensions=tuple(spec_for(r) for r in (self.remotes.vram, self.remotes.kitten))
                           if self.remotes else (), hook=self.hook)
        result = apply_plan(plan, tree, linux_facts())
        assert result.exit_code == 0
        assert self.normalised(tree, home) == self.final, f"re-run after a kill at {at} did not finish the job"
        assert _temps(tree, paths.webui_state_dir(tree.resolve())) == []
        # and revert still takes everything out
        revert(tree)
        assert tree_snapshot(tree) == self.original, f"revert after a kill at {at} left changes"


@pytest.mark.slow
def test_block_only_apply_killed_at_every_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sc = Scenario(tmp_path, monkeypatch, with_extensions=False)
    assert len(sc.points) >= 6
    for n in range(1, len(sc.points) + 1):
        sc.kill_and_recover(str(n))


@pytest.mark.slow
def test_full_apply_killed_mid_clone_and_around_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sc = Scenario(tmp_path, monkeypatch, with_extensions=True)
    named = [p for p in dict.fromkeys(sc.points) if p.startswith(("gitops:", "hook:"))]
    assert {"gitops:clone:after-fetch", "gitops:clone:before-rename", "hook:before-rename"} <= set(named)
    for point in named:
        sc.kill_and_recover(point)
    # counted points too: the manifest write that records a clone right before its rename, and the
    # config.json write (bounded: the block-only test covers every write of the block itself)
    counted = [n for n, name in enumerate(sc.points, start=1)
               if name == "write:config.json:half-written"
               or (name == "write:manifest.json:before-rename" and n + 2 <= len(sc.points)
                   and sc.points[n + 1] == "gitops:clone:after-rename")]
    assert len(counted) >= 2
    for n in counted:
        sc.kill_and_recover(str(n))
