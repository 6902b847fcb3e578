#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LMFORGE_CACHE="${LMFORGE_CACHE:-$PWD/.pytest_cache/lmforge}"
exec .venv/bin/python -m pytest -q "$@"
