"""The wheel ships profiles/ and patches/ (force-included) and lowvram finds them once installed."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    wheels = list(out.glob("lowvram-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def test_wheel_contains_bundled_profiles_and_patches(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    profiles = [n for n in names if n.startswith("lowvram/_bundled/profiles/") and n.endswith(".yaml")]
    patches = [n for n in names if n.startswith("lowvram/_bundled/patches/") and n.endswith(".py")]
    assert profiles, "no profile YAML in the wheel"
    assert patches, "no hook file in the wheel"
    assert sorted(Path(n).name for n in profiles) == sorted(p.name for p in (REPO / "profiles").glob("*.yaml"))


def test_installed_wheel_finds_its_bundled_files(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    probe = (
        "from lowvram.world import paths; "
        "p = paths.bundled_profiles_dir(); h = paths.bundled_patches_dir(); "
        "print(p); print(h); print(len(list(p.glob('*.yaml')))); print(len(list(h.rglob('*.py'))))"
    )
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True,
                         cwd=tmp_path, timeout=60).stdout.split("\n")
    assert "site-packages" in out[0] and out[0].endswith("_bundled/profiles")
    assert "site-packages" in out[1] and out[1].endswith("_bundled/patches")
    assert int(out[2]) >= 1
    assert int(out[3]) >= 1
