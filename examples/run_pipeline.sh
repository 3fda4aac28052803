#!/usr/bin/env bash
# Stage 0: the whole SFT -> RM -> PPO job on the built-in task. Usage: examples/run_pipeline.sh [FLAGS]
# (the flags of `python -m coati.pipeline --help`). Runs from any directory with this checkout's coati;
# relative paths, like the default --output_dir ./coati_pipeline, are taken from where you run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m coati.pipeline "$@"
