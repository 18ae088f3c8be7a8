#!/usr/bin/env bash
# torchrun, FSDP2 by default (train.strategy=deepspeed works too); CONFIG then key=value overrides.
#   one node, all GPUs:  bash launch/torchrun.sh configs/experiments/llama1-7b.yaml
#   N nodes, run on each node (c10d rendezvous at node 0, no ssh):
#     NNODES=4 MASTER_ADDR=node-0 bash launch/torchrun.sh configs/experiments/llama1-65b.yaml train.fsdp_shard_size=8
#   each layer split over a node's 8 GPUs (tensor + sequence parallel), FSDP2 over the rest:
#     bash launch/torchrun.sh configs/experiments/llama1-65b.yaml train.tensor_parallel=8
#   CPU test:            NGPU=2 bash launch/torchrun.sh configs/experiments/debug.yaml train.device=cpu
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}
shift
ngpu=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
nnodes=${NNODES:-1}
if [ "$nnodes" -gt 1 ]; then
  rdzv=(--nnodes "$nnodes" --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR to node 0}:${MASTER_PORT:-29500}"
    --rdzv_id "${RUN_ID:-llama-pretrain}")
else
  rdzv=(--standalone)
fi
exec torchrun "${rdzv[@]}" --nproc_per_node "$ngpu" -m pretrain train "$config" train.strategy=fsdp "$@"
