#!/usr/bin/env bash
# Set up (if needed) and run the demo: `bash scripts/demo.sh [dotted.key=value ...]`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec prefopt demo "$@"
