#!/usr/bin/env bash
# Create .venv with Python >= 3.12 (JAX 0.12 needs it) and install gemma4-eqx with its test extra.
# Finds python3.12+ on PATH, or under pyenv, without changing the global Python.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for cand in python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  local root
  root=$( (pyenv root 2>/dev/null) || echo "$HOME/.pyenv")
  for cand in "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
    if [ -x "$cand" ]; then echo "$cand"; return 0; fi
  done
  echo "gemma4-eqx needs Python >= 3.12 (JAX 0.12 requires it); none found on PATH or under pyenv" >&2
  return 1
}
if [ ! -x .venv/bin/python ]; then
  PY=$(find_python)
  "$PY" -m venv .venv
fi
log=$(mktemp)
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "bootstrap: pip install failed (output above)" >&2
  exit 1
fi
rm -f "$log"
.venv/bin/python -c 'import gemma4_eqx, jax; print("gemma4-eqx", gemma4_eqx.__version__, "with jax", jax.__version__, "ready in .venv")'
