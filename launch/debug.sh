#!/usr/bin/env bash
# One GPU or the CPU, no launcher: CONFIG (default the debug experiment) plus key=value overrides.
#   bash launch/debug.sh train.steps=50 train.device=cpu
set -euo pipefail
exec python -m pretrain train "${CONFIG:-configs/experiments/debug.yaml}" "$@"
