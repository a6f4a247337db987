#!/usr/bin/env bash
# One command that sets everything up on a fresh machine: a venv in .venv with lowvram (editable),
# its test tools, the CPU build of torch the hook's tests need, wine for the .bat tests, and one
# venv per torch of TORCH_MATRIX for the hook's tests (below). Safe to run again: what is there stays.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v wine >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wine >/dev/null) \
      || echo "setup: could not install wine; the .bat tests will be skipped" >&2
  else
    echo "setup: wine is not installed (apt-get install wine); the .bat tests will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned (a CPU build): an unpinned torch pulls several GB of CUDA packages.
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/lowvram --version

# The hook runs on the UI's torch, not ours: tests/unit/test_torch_matrix.py runs the hook's tests
# under each version here (it reads this line). 2.1.2 is what A1111 1.8–1.10 install; the other is
# the newest this machine's pip allows. PyPI's Linux torch brings its CUDA libraries (about 2.5 GB
# for 2.1.2) and runs on the CPU. LOWVRAM_SKIP_TORCH_MATRIX=1 skips these venvs and that test.
TORCH_MATRIX="2.1.2 2.14.1"
MATRIX_PY=${TORCH_MATRIX_PYTHON:-python3.11}  # torch 2.1.2 has wheels up to CPython 3.11

torch_venv() {
  local version=$1 dir=.venv-torch/$1 stamp
  stamp="torch==$version $(sha256sum pyproject.toml | cut -c1-16)"
  if [ "$(cat "$dir/.lowvram-setup" 2>/dev/null)" = "$stamp" ] \
    && "$dir/bin/python" -c "import torch, pytest, hypothesis, typer" >/dev/null 2>&1; then
    return 0
  fi
  echo "setup: $dir: installing torch $version, pytest and lowvram (a few GB the first time)" >&2
  rm -f "$dir/.lowvram-setup"
  if { [ -x "$dir/bin/python" ] || "$MATRIX_PY" -m venv "$dir"; } \
    && "$dir/bin/python" -m pip install -q --progress-bar off "torch==$version" "pytest>=8" "hypothesis>=6.100" -e .; then
    echo "$stamp" > "$dir/.lowvram-setup"
  else
    echo "setup: could not set up $dir; tests/unit/test_torch_matrix.py fails until it is" >&2
  fi
}

if [ "${LOWVRAM_SKIP_TORCH_MATRIX:-}" = 1 ]; then
  echo "setup: LOWVRAM_SKIP_TORCH_MATRIX=1: no .venv-torch venvs" >&2
elif ! command -v "$MATRIX_PY" >/dev/null 2>&1; then
  echo "setup: $MATRIX_PY not found (set TORCH_MATRIX_PYTHON); no .venv-torch venvs" >&2
else
  for version in $TORCH_MATRIX; do torch_venv "$version"; done
fi
