#!/usr/bin/env bash
# Set up (if needed) and run the test suite: `bash scripts/test.sh [pytest args ...]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ruff check .
# Two pytest-xdist workers, one test file each at a time (module fixtures are built once): run serially,
# the suite leaves a core idle through its many single-threaded process start-ups and imports; two files
# in parallel keep both busy. PREFOPT_TEST_WORKERS=0 runs everything in this process.
exec python -m pytest -q -n "${PREFOPT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
