#!/usr/bin/env bash
# One GPU or the CPU, no launcher: [CONFIG] (default the debug experiment) then key=value overrides.
#   bash launch/debug.sh train.steps=50 train.device=cpu
#   bash launch/debug.sh configs/experiments/llama1-7b.yaml model.n_layers=4
set -euo pipefail
config=configs/experiments/debug.yaml
if [[ "${1:-}" == *.yaml ]]; then
  config=$1
  shift
fi
exec python -m pretrain train "$config" "$@"
