#!/usr/bin/env bash
# One node, NGPU processes (default: every visible GPU), FSDP2 across them; overrides pass through.
#   NGPU=8 bash launch/torchrun.sh configs/experiments/llama1-7b.yaml data.root=/data/tokens
# On CPU for testing: NGPU=2 bash launch/torchrun.sh configs/experiments/debug.yaml train.device=cpu
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}
shift
ngpu=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec torchrun --standalone --nproc_per_node "$ngpu" -m pretrain train "$config" train.strategy=fsdp "$@"
