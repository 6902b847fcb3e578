#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export LMFORGE_CACHE="${LMFORGE_CACHE:-$PWD/.pytest_cache/lmforge}"
# Two workers, one test file each at a time (--dist loadfile keeps a file's module-scoped fixtures in
# one process). Many tests wait on subprocesses (DDP, ZeRO, CLI runs), so 2 workers roughly halve the
# wall time on 2 cores. LMFORGE_TEST_WORKERS=0 runs everything in this process.
WORKERS="${LMFORGE_TEST_WORKERS:-2}"
if [ "$WORKERS" = "0" ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
