#!/usr/bin/env bash
# Set up (if needed) and run the test suite: `bash scripts/test.sh [pytest args ...]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
ruff check .
# Two pytest-xdist workers, one test file each at a time (module fixtures are built once): most of the
# suite waits on Ray and process start-up, so two files in parallel use both cores. PREFOPT_TEST_WORKERS=0
# runs everything in this process.
exec python -m pytest -q -n "${PREFOPT_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
