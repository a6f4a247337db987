"""The contributor's set-up (README "For contributors", issue 16): scripts/setup-dev.sh on a fresh machine.

The script runs for real, in a copy of the repository's set-up files, against a fake python, pip and
apt-get that write down what they are asked to do instead of downloading GBs: what a contributor
would see is what gets installed from where, and the lines the script prints.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_PIN = re.findall(r'^ *"torch==([0-9.]+)",?$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)[0]

# A python (and, copied into each venv it makes, that venv's python, pip and lowvram) that logs its
# arguments and answers the script's questions from FAKE_* variables.
FAKE_PYTHON = r"""#!/usr/bin/env bash
here=$(cd "$(dirname "$0")" && pwd)
echo "$here/$(basename "$0") $*" >> "$FAKE_LOG"
ensurepip_ok() { [ -z "${FAKE_NO_ENSUREPIP:-}" ] || [ -e "$FAKE_ROOT/ensurepip-installed" ]; }
if [ "${1:-}" = -c ]; then
  case $2 in
    *base_prefix*) echo "${FAKE_PYVER:-3.11} ${FAKE_PREFIX:-/usr}"; exit 0 ;;
    *version_info*) [ "${FAKE_PYVER:-3.11}" != 3.8 ]; exit ;;
    *ensurepip*) ensurepip_ok; exit ;;
    *urlopen*) exit "${FAKE_INDEX_DOWN:-0}" ;;
    *) exit 1 ;;  # torch's version, `import torch`: nothing is installed
  esac
fi
if [ "${1:-} ${2:-}" = "-m venv" ]; then
  mkdir -p "$3/bin"
  cp "$0" "$3/bin/python"; cp "$0" "$3/bin/lowvram"
  if ! ensurepip_ok; then
    echo "The virtual environment was not created successfully because ensurepip is not"
    echo "available.  On Debian/Ubuntu systems, you need to install the python3-venv"
    echo "package using the following command."
    exit 1
  fi
  touch "$3/pip-ok"; exit 0
fi
if [ "${1:-} ${2:-}" = "-m pip" ]; then
  [ -e "$here/../pip-ok" ] || { echo "$0: No module named pip" >&2; exit 1; }
fi
exit 0
"""

FAKE_APT = r"""#!/usr/bin/env bash
echo "apt-get $*" >> "$FAKE_LOG"
case " $* " in *" install "*venv*) touch "$FAKE_ROOT/ensurepip-installed" ;; esac
exit "${FAKE_APT_RC:-0}"
"""

FAKE_ID = r"""#!/usr/bin/env bash
[ "${1:-}" = -u ] && { echo "${FAKE_UID:-1000}"; exit 0; }
exec /usr/bin/id "$@"
"""


@dataclass
class Run:
    code: int
    err: str
    log: list[str]
    root: Path

    def pip_installs(self, venv: str) -> list[str]:
        """The arguments of every `pip install` run by VENV's python, in order."""
        prefix = f"{self.root / venv}/bin/python -m pip install "
        return [line[len(prefix):] for line in self.log if line.startswith(prefix)]

    def setup_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("setup: ")]


@pytest.fixture
def setup_dev(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Run a copy of scripts/setup-dev.sh with the fakes; keyword arguments set FAKE_* variables."""
    if shutil.which("bash") is None:
        pytest.fail("the set-up script is bash; these tests need bash")
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup-dev.sh", root / "scripts")
    shutil.copy(REPO / "pyproject.toml", root)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for name, text in {"python-fake": FAKE_PYTHON, "apt-get": FAKE_APT, "id": FAKE_ID, "wine": "#!/bin/sh\n",
                       "python3.11": FAKE_PYTHON}.items():
        (fakebin / name).write_text(text)
        (fakebin / name).chmod(0o755)
    log = tmp_path / "log"

    def run(**fake: str) -> Run:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LOWVRAM_", "PIP_", "FAKE_")) and k not in {"PYTHON", "TORCH_MATRIX_PYTHON"}}
        env.update({"PATH": f"{fakebin}{os.pathsep}{env.get('PATH', '')}", "PYTHON": str(fakebin / "python-fake"),
                    "FAKE_LOG": str(log), "FAKE_ROOT": str(tmp_path)})
        env.update({f"FAKE_{k.upper()}": v for k, v in fake.items()})
        log.write_text("")
        proc = subprocess.run(["bash", str(root / "scripts" / "setup-dev.sh")], capture_output=True, text=True,
                              env=env, timeout=60)
        return Run(proc.returncode, proc.stderr, log.read_text().splitlines(), root)

    return run


def test_torch_comes_from_the_cpu_index_in_every_venv(setup_dev) -> None:
    run = setup_dev()
    assert run.code == 0, run.err
    main = run.pip_installs(".venv")
    torch_cmd = f"torch=={TORCH_PIN} --index-url {CPU_INDEX} --extra-index-url https://pypi.org/simple"
    assert torch_cmd in main
    assert main.index(torch_cmd) < main.index("-q -e .[test]"), "torch must be in before the test extra asks for it"
    for version in ("2.1.2", "2.14.1"):
        installs = run.pip_installs(f".venv-torch/{version}")
        assert f"torch=={version} --index-url {CPU_INDEX} --extra-index-url https://pypi.org/simple" in installs
    # Each big step is announced with what it costs.
    torch_lines = [line for line in run.setup_lines() if "torch" in line and "CPU build" in line]
    assert len(torch_lines) == 3 and all("MB" in line for line in torch_lines), run.err


def test_an_unreachable_cpu_index_is_said_once_and_pip_falls_back(setup_dev) -> None:
    run = setup_dev(index_down="1")
    assert run.code == 0, run.err
    assert f"torch=={TORCH_PIN}" in run.pip_installs(".venv")
    said = [line for line in run.setup_lines() if "does not answer" in line]
    assert len(said) == 1 and CPU_INDEX in said[0] and "LOWVRAM_TORCH_INDEX" in said[0], run.err
    assert not any("--index-url" in line for line in run.log)


def test_a_python_without_ensurepip_stops_with_one_line_and_the_fix(setup_dev) -> None:
    run = setup_dev(no_ensurepip="1", uid="1000")
    assert run.code == 1
    assert "Traceback" not in run.err
    assert run.setup_lines() == [line for line in run.err.splitlines() if line.strip()], run.err
    assert len(run.setup_lines()) == 1
    assert "ensurepip" in run.err and "apt-get install python3.11-venv" in run.err
    assert not (run.root / ".venv").exists(), "no half-made venv is left behind"
    assert not any(line.startswith("apt-get") for line in run.log), "not root: nothing is installed"


def test_as_root_the_missing_venv_package_is_installed_like_wine(setup_dev) -> None:
    run = setup_dev(no_ensurepip="1", uid="0")
    assert run.code == 0, run.err
    assert any(re.fullmatch(r"apt-get install -y -q python3\.11-venv", line) for line in run.log), run.log
    assert any("installing python3.11-venv" in line for line in run.setup_lines())
    assert run.pip_installs(".venv"), "the set-up goes on once the package is in"


def test_a_half_made_venv_is_mended_not_trusted(setup_dev, tmp_path: Path) -> None:
    # What `python3 -m venv .venv` leaves on Debian without python3-venv: a python, no pip.
    fake = tmp_path / "bin" / "python-fake"
    (tmp_path / "repo" / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(fake, tmp_path / "repo" / ".venv" / "bin" / "python")
    run = setup_dev()
    assert run.code == 0, run.err
    assert f"{fake} -m venv .venv" in run.log
    assert any("no working pip" in line for line in run.setup_lines())


def test_too_old_a_python_is_one_line(setup_dev) -> None:
    run = setup_dev(pyver="3.8")
    assert run.code == 1
    assert len(run.setup_lines()) == 1 and ">= 3.10" in run.err and "PYTHON=" in run.err, run.err


def test_ci_runs_readmes_set_up_and_test_commands_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## For contributors", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    commands = [line for block in blocks[:2] for line in block.splitlines() if line.strip()]
    assert commands[0] == "bash scripts/setup-dev.sh"
    assert commands[1].startswith(".venv/bin/python -m pytest")
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    for command in commands:
        assert command in ci, f".ci/run does not run README's `{command}`"


def test_bash_parses_the_scripts() -> None:
    for script in (REPO / "scripts" / "setup-dev.sh", REPO / ".ci" / "run"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script.name}: {proc.stderr}"
