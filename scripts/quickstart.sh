#!/usr/bin/env bash
# The main job on the embedded default: set up, tokenize the bundled corpus, train the debug LLaMA.
# Extra arguments are config overrides for the training run, e.g. train.steps=300.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m data_pipeline prepare configs/pipeline/sample.yaml
exec .venv/bin/python -m pretrain train configs/experiments/debug.yaml "$@"
