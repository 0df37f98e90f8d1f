#!/usr/bin/env bash
# Sets up a fresh checkout: system packages (scripts/setup-host.sh), then a virtual
# environment in .venv with pyvmm installed in editable mode (this compiles the C shim
# with cffi) and its test dependencies. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.pyvmm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ native/shim.c -nt "$stamp" ] || [ native/shim.h -nt "$stamp" ] \
   || ! .venv/bin/python -c "import vmm._shim" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # compat: a plain .pth path entry, no import-hook finder (faster start-up)
  .venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
  touch "$stamp"
fi
# Byte-compile pyvmm's own modules. pip does this for a regular install, not for an
# editable one; without it every `pyvmm` start compiles ~40 modules (~25 ms) whenever
# PYTHONDONTWRITEBYTECODE is set (as on CI containers), since nothing is cached then.
# Cheap when nothing changed: compileall skips up-to-date .pyc files.
.venv/bin/python -m compileall -q vmm
