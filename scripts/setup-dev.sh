#!/usr/bin/env bash
# One command that sets everything up on a fresh machine: a venv in .venv with lowvram (editable),
# its test tools, the CPU build of torch the hook's tests need, and wine for the .bat tests.
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
