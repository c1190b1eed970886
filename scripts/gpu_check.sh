#!/usr/bin/env bash
# GPU acceptance check (issue 18): on a CUDA machine, run checks 1-6 and write
# benchmarks/results/gpu_check.json and .md (about 5-8 minutes on one H100/H200).
#
#   scripts/gpu_check.sh                      # everything
#   scripts/gpu_check.sh --only host_syncs    # one check again, after a fix
#   scripts/gpu_check.sh --dry-run-cpu        # the same code on CPU at tiny sizes
#
# Needs only the README's test install. Exit codes: 0 every check that ran passed,
# 1 a check failed, 77 no CUDA device (prints exactly "no CUDA device"), 2 bad
# arguments. What each check does: expert_parallel/gpu_check/__init__.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m expert_parallel.gpu_check "$@"
