"""The hook's tests under every torch of scripts/setup-dev.sh's TORCH_MATRIX (issue 13 §1).

The hook runs inside the UI's venv, on the UI's torch (A1111 1.8–1.10: 2.1.2; the newest UIs: the
newest torch), not the dev venv's. Each version has its own venv, .venv-torch/<version>, made by
scripts/setup-dev.sh; this runs the hook's tests there in a subprocess and checks that the torch it
imported is that version. A missing venv fails (one line: run scripts/setup-dev.sh) unless
LOWVRAM_SKIP_TORCH_MATRIX=1 says to skip on purpose.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "scripts" / "setup-dev.sh"
SKIP_VAR = "LOWVRAM_SKIP_TORCH_MATRIX"
HOOK_IMPORT = re.compile(r"^\s*(?:from|import)\s+lowvram_hook\b", re.MULTILINE)

# Runs pytest in the venv after importing torch first, so the version printed is the one the
# tests get (one torch per process: sys.modules); writes the ids of the tests that passed to argv[1].
_RUNNER = """
import sys
import torch
import pytest

class Passed:
    def __init__(self):
        self.ids = []

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed:
            self.ids.append(report.nodeid)

print(f"lowvram-matrix torch={torch.__version__} file={torch.__file__}", flush=True)
passed = Passed()
code = pytest.main(sys.argv[2:], plugins=[passed])
with open(sys.argv[1], "w") as f:
    f.write("\\n".join(passed.ids))
sys.exit(code)
"""
# What must have run under every torch: the real copy path, not only the simulated device.
MUST_PASS = ("tests/unit/test_layout.py::test_the_real_mover_lays_out_every_dtype_and_view_and_keeps_them",
             "tests/unit/test_layout.py::test_the_real_mover_rolls_a_failure_back_with_every_tensor_intact")
TEST_NAME = "test_the_hook_tests_pass_under_torch"


def torch_matrix() -> list[str]:
    """The versions setup-dev.sh installs: one list, kept there."""
    match = re.search(r'^TORCH_MATRIX="([^"]+)"', SETUP.read_text(), re.MULTILINE)
    assert match, "scripts/setup-dev.sh must set TORCH_MATRIX=\"<version> ...\""
    return match.group(1).split()


def hook_tests() -> list[str]:
    """Every unit test module that imports the hook package (patches/lowvram_hook)."""
    return sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests" / "unit").glob("test_*.py")
                  if HOOK_IMPORT.search(p.read_text(encoding="utf-8")))


def venv_python(version: str) -> Path:
    return REPO / ".venv-torch" / version / "bin" / "python"


@dataclass
class Run:
    proc: subprocess.Popen[str]
    passed_file: Path

    def finish(self) -> tuple[int, str, list[str]]:
        out, _ = self.proc.communicate(timeout=600)
        ids = self.passed_file.read_text().split() if self.passed_file.exists() else []
        return self.proc.returncode, out, ids


@pytest.fixture(scope="module")
def matrix_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Every selected version's run, started at once: each is mostly one core, CI has two."""
    selected = {item.callspec.params["version"] for item in request.session.items
                if getattr(item, "originalname", None) == TEST_NAME and hasattr(item, "callspec")}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    runs: dict[str, Run] = {}
    if os.environ.get(SKIP_VAR) != "1":
        for version in sorted(selected):
            if venv_python(version).exists():
                passed_file = tmp_path_factory.mktemp(f"torch-{version}") / "passed.txt"
                proc = subprocess.Popen([str(venv_python(version)), "-c", _RUNNER, str(passed_file), "-q",
                                         "-p", "no:cacheprovider", *hook_tests()], cwd=REPO, env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                runs[version] = Run(proc, passed_file)
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.communicate()


def test_the_matrix_covers_the_oldest_ui_torch_and_the_hook_tests() -> None:
    versions = torch_matrix()
    assert "2.1.2" in versions, "A1111 1.8–1.10 install torch 2.1.2: the hook must be tested on it"
    assert len(versions) >= 2
    tests = hook_tests()
    assert {"tests/unit/test_layout.py", "tests/unit/test_hook.py"} <= set(tests)
    assert "tests/unit/test_torch_matrix.py" not in tests


@pytest.mark.slow
@pytest.mark.parametrize("version", torch_matrix())
def test_the_hook_tests_pass_under_torch(version: str, matrix_runs: dict[str, Run]) -> None:
    if os.environ.get(SKIP_VAR) == "1":
        pytest.skip(f"{SKIP_VAR}=1: hook tests under torch {version} not run")
    venv = venv_python(version).parents[1]
    if version not in matrix_runs:
        pytest.fail(f"no {venv.relative_to(REPO)}: run scripts/setup-dev.sh (or set {SKIP_VAR}=1 to skip)",
                    pytrace=False)
    code, out, passed = matrix_runs[version].finish()
    seen = re.search(r"^lowvram-matrix torch=(\S+) file=(.+)$", out, re.MULTILINE)
    assert seen, f"the venv's python did not import torch:\n{out[-3000:]}"
    assert seen.group(1).split("+")[0] == version, f"{venv} has torch {seen.group(1)}, not {version}"
    assert Path(seen.group(2)).resolve().is_relative_to(venv.resolve()), f"torch came from {seen.group(2)}"
    assert code == 0, f"hook tests under torch {version} failed:\n{out[-6000:]}"
    for path in hook_tests():
        assert any(p.startswith(f"{path}::") for p in passed), f"no test of {path} passed under torch {version}"
    for must in MUST_PASS:
        assert any(p.startswith(must) for p in passed), f"{must} did not pass under torch {version}"
