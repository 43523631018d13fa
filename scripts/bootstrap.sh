#!/usr/bin/env bash
# Idempotent set-up: a .venv with torch (CPU build 2.13.0 unless a torch is already there) and prefopt
# installed editable with its [dev] extra. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PREFOPT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[prefopt] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  # A plain `torch` requirement would pull a multi-GB CUDA wheel on CPU machines; pin the build first.
  echo "[prefopt] installing torch==${PREFOPT_TORCH:-2.13.0}"
  "$VENV/bin/python" -m pip install -q "torch==${PREFOPT_TORCH:-2.13.0}"
fi
STAMP="$VENV/.prefopt-installed"
HASH="$(sha1sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$HASH" ]; then
  echo "[prefopt] installing prefopt[dev] (editable)"
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  echo "$HASH" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
