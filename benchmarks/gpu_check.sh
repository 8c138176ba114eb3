#!/usr/bin/env bash
# The whole GPU check in one command (benchmarks/gpu_check.py --help); --dry-run on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
