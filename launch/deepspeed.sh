#!/usr/bin/env bash
# DeepSpeed ZeRO through the `deepspeed` launcher; CONFIG then key=value overrides (ZeRO-3 by default).
#   one node, 8 GPUs:   bash launch/deepspeed.sh configs/experiments/llama1-7b.yaml
#   N nodes (ssh/pdsh): HOSTFILE=hostfile bash launch/deepspeed.sh configs/experiments/llama1-65b.yaml
#     where `hostfile` lists one node a line as `node-1 slots=8`; the first is the master.
#   CPU test:           NGPU=2 bash launch/deepspeed.sh configs/experiments/debug.yaml train.device=cpu
set -euo pipefail
config=${1:?usage: launch/deepspeed.sh CONFIG [key=value ...]}
shift
args=(--no_local_rank --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
  args+=(--hostfile "$HOSTFILE")
else
  ngpu=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
  args+=(--num_gpus "$ngpu")
fi
exec deepspeed "${args[@]}" --module pretrain train "$config" train.strategy=deepspeed "$@"
