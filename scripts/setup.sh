#!/usr/bin/env bash
# Create or refresh .venv (Python 3.12, pinned torch and megatron-core, this package with its
# test extra). Sourced by demo.sh and test.sh; safe to run again: it only reinstalls when
# pyproject.toml or the pins changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

find_python312() {
    local candidates=("${PYTHON:-}" python3.12 python3)
    local root
    for root in "${PYENV_ROOT:-$HOME/.pyenv}" /root/.pyenv; do
        candidates+=("$root"/versions/3.12*/bin/python3.12)
    done
    candidates+=(/usr/bin/python3.12 /usr/local/bin/python3.12)
    local py
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        if "$py" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 12) else 1)' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    PY="$(find_python312)" || {
        echo "error: Python >= 3.12 not found (megatron-core >= 0.17 needs it)." >&2
        echo "Install python3.12 or set PYTHON=/path/to/python3.12 and run again." >&2
        exit 1
    }
    echo "[setup] creating .venv with $PY"
    "$PY" -m venv "$VENV"
fi

stamp="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/pins.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.mhc-stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "[setup] installing pinned torch, megatron-core and mhc-megatron into .venv (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$ROOT/scripts/pins.txt"
    "$VENV/bin/python" -m pip install --quiet -c "$ROOT/scripts/pins.txt" -e "$ROOT[test]"
    echo "$stamp" > "$VENV/.mhc-stamp"
fi
