#!/usr/bin/env bash
# Multi-node launch with torchrun: run this script on every node with the same MASTER_ADDR.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch_torchrun.sh run examples/qwen3_4b_paper.yaml
# The first argument is the sdzero subcommand (srt-collect, srt-train, distill, run); the rest
# (config file, dotted overrides, --init-from) is passed through.
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core's TP communication overlap wants one stream

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m sdzero_mcore.cli "$@"
