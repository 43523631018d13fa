#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): random-weight SD3-medium from configs/models/sd3-medium through
# `prefopt plan`, `prefopt cache` (1024 px) and `prefopt train` (1 worker, bf16, gradient checkpointing) on one
# GPU, in about 5-8 minutes on an H100/H200; appends a markdown block to benchmarks/results.md.
#
#   benchmarks/gpu_check.sh                  # on a GPU machine
#   benchmarks/gpu_check.sh --dry-run        # tiny sizes on the CPU: the same path end to end (a test runs it)
#   benchmarks/gpu_check.sh --workdir DIR --out FILE
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
