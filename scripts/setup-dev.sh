#!/usr/bin/env bash
# One command that sets everything up on a fresh machine: a venv in .venv with lowvram (editable),
# its test tools, the CPU build of torch the hook's tests need, wine for the .bat tests, and one
# venv per torch of TORCH_MATRIX for the hook's tests (below). Safe to run again: what is there stays.
#
# torch comes from PyTorch's CPU index: on Linux, PyPI's torch is a CUDA build that brings ~20
# nvidia packages (2-3 GB a venv). LOWVRAM_TORCH_INDEX=URL names another index for torch (a mirror
# of the CPU index); LOWVRAM_TORCH_INDEX= (empty) leaves torch to pip's own indexes and wheel caches.
# Where the CPU index does not answer, the script says so and falls back to pip's own indexes.
# PYTHON picks the Python for .venv (default python3, >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_INDEX=${LOWVRAM_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
PYPI=https://pypi.org/simple  # the rest of torch's dependencies, next to the CPU index

say() { echo "setup: $*" >&2; }

# <python> <venv dir> <the variable that picks that python>: make the venv (or mend one without pip),
# or say in one line why it cannot be made and how to fix that. Debian/Ubuntu keep venv's ensurepip in
# a package of its own, pythonX.Y-venv: installed here as root (as wine is below), named otherwise.
make_venv() {
  local py=$1 dir=$2 var=$3 info version prefix fix
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v "$py" >/dev/null 2>&1; then
    say "$py not found: install Python >= 3.10, or name one with $var=/path/to/python3"
    return 1
  fi
  info=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2], sys.base_prefix)') || return 1
  version=${info%% *} prefix=${info#* }
  if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    say "$py is Python $version; lowvram needs >= 3.10: $var=/path/to/python3.11 bash scripts/setup-dev.sh"
    return 1
  fi
  if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    fix="$var=/path/to/another/python3 (one with the venv module)"
    if [ "$prefix" = /usr ] && command -v apt-get >/dev/null 2>&1; then
      fix="apt-get install python$version-venv (as root), or $fix"
      if [ "$(id -u)" = 0 ]; then
        say "$py cannot make a venv (no ensurepip): installing python$version-venv (a few MB, apt-get)"
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "python$version-venv"; } >&2 \
          || true
      fi
    fi
    if ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
      say "$py cannot make a venv (its ensurepip module is missing): $fix"
      return 1
    fi
  fi
  if [ -e "$dir" ]; then say "$dir: no working pip in it; making the venv again over it"; fi
  say "$dir: a venv of $py (Python $version)"
  "$py" -m venv "$dir" || { say "could not make $dir with $py (its message is above)"; return 1; }
}

# <python> <url>: does the index answer within 15 s? Only http(s) is asked; other schemes are assumed.
reachable() {
  case $2 in http://* | https://*) ;; *) return 0 ;; esac
  "$1" -c 'import os, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
urllib.request.urlopen(sys.argv[1], timeout=15, context=ctx).close()' "$2" >/dev/null 2>&1
}

# Where torch comes from, decided once, the first time a torch must be installed.
TORCH_ARGS=()
TORCH_FROM=""
torch_source() {
  local py=$1
  [ -z "$TORCH_FROM" ] || return 0
  if [ -z "$TORCH_INDEX" ]; then
    TORCH_FROM="pip's own indexes (LOWVRAM_TORCH_INDEX is empty)"
  elif reachable "$py" "${TORCH_INDEX%/}/torch/"; then
    TORCH_ARGS=(--index-url "$TORCH_INDEX" --extra-index-url "$PYPI")
    TORCH_FROM="$TORCH_INDEX"
  else
    TORCH_FROM="pip's own indexes"
    say "$TORCH_INDEX does not answer: torch comes from pip's own indexes, where on Linux it is the CUDA" \
      "build (2-3 GB a venv) unless a CPU wheel is at hand; LOWVRAM_TORCH_INDEX=URL names another index"
  fi
}

# <venv dir> <version> <what the CPU build costs>: torch==version there, with pip's own progress.
install_torch() {
  local dir=$1 version=$2 cost=$3 have
  have=$("$dir/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null) || have=""
  if [ "${have%%+*}" = "$version" ]; then
    return 0
  fi
  torch_source "$dir/bin/python"
  if [ "$TORCH_FROM" = "$TORCH_INDEX" ]; then
    say "$dir: torch $version, the CPU build, from $TORCH_FROM ($cost)"
  else
    say "$dir: torch $version from $TORCH_FROM"
  fi
  "$dir/bin/python" -m pip install "torch==$version" ${TORCH_ARGS[@]+"${TORCH_ARGS[@]}"}
}

TORCH_PIN=$(sed -n 's/^ *"torch==\([0-9][0-9.]*\)",\{0,1\} *$/\1/p' pyproject.toml)
if [ -z "$TORCH_PIN" ]; then
  say "pyproject.toml's test extra has no \"torch==X.Y.Z\" line; the script installs that torch first"
  exit 1
fi

make_venv "$PY" .venv PYTHON || exit 1

if ! command -v wine >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing wine for the .bat tests (apt-get; on Debian 12 about 150 MB to download, 850 MB on disk)"
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wine; } >&2 \
      || say "could not install wine; the .bat tests will be skipped"
  else
    say "wine is not installed (apt-get install wine); the .bat tests will be skipped"
  fi
fi

.venv/bin/python -m pip install -q --upgrade pip
# torch first, from the CPU index; the test extra's torch==X.Y.Z pin is then already satisfied.
install_torch .venv "$TORCH_PIN" "about 190 MB to download, 750 MB on disk"
say ".venv: lowvram (editable) and its test tools: pytest, hypothesis, ruff, mypy (about 35 MB)"
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/lowvram --version

# The hook runs on the UI's torch, not ours: tests/unit/test_torch_matrix.py runs the hook's tests
# under each version here (it reads this line). 2.1.2 is what A1111 1.8–1.10 install; the other is
# the newest this machine's pip allows. Each is the CPU build from the index above (about 200 MB to
# download each, under 1 GB on disk). LOWVRAM_SKIP_TORCH_MATRIX=1 skips these venvs and that test.
TORCH_MATRIX="2.1.2 2.14.1"
MATRIX_PY=${TORCH_MATRIX_PYTHON:-python3.11}  # torch 2.1.2 has wheels up to CPython 3.11

torch_venv() {
  local version=$1 dir=.venv-torch/$1 stamp
  stamp="torch==$version $(sha256sum pyproject.toml | cut -c1-16)"
  if [ "$(cat "$dir/.lowvram-setup" 2>/dev/null)" = "$stamp" ] \
    && "$dir/bin/python" -c "import torch, pytest, hypothesis, typer" >/dev/null 2>&1; then
    return 0
  fi
  rm -f "$dir/.lowvram-setup"
  if make_venv "$MATRIX_PY" "$dir" TORCH_MATRIX_PYTHON \
    && install_torch "$dir" "$version" "about 200 MB to download, under 1 GB on disk" \
    && say "$dir: pytest, hypothesis and lowvram (editable)" \
    && "$dir/bin/python" -m pip install -q "pytest>=8" "hypothesis>=6.100" -e .; then
    echo "$stamp" > "$dir/.lowvram-setup"
  else
    say "could not set up $dir; tests/unit/test_torch_matrix.py fails until it is"
  fi
}

if [ "${LOWVRAM_SKIP_TORCH_MATRIX:-}" = 1 ]; then
  say "LOWVRAM_SKIP_TORCH_MATRIX=1: no .venv-torch venvs"
elif ! command -v "$MATRIX_PY" >/dev/null 2>&1; then
  say "$MATRIX_PY not found (set TORCH_MATRIX_PYTHON); no .venv-torch venvs"
else
  for version in $TORCH_MATRIX; do torch_venv "$version"; done
fi
