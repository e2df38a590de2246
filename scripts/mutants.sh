#!/usr/bin/env bash
# One-line mutations of the core modules; each must make its tests fail (scripts/mutants.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" scripts/mutants.py "$@"
