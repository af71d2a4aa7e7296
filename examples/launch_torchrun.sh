#!/usr/bin/env bash
# Multi-node launch with torchrun: run this script on every node with the same MASTER_ADDR.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch_torchrun.sh run examples/qwen3_4b_paper.yaml
# The first argument is the sdzero subcommand (srt-collect, srt-train, distill, run); the rest
# (config file, dotted overrides, --init-from) is passed through.
# Qwen2.5-72B on 4 nodes x 8 GPUs (run on each node i = 0..3):
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash examples/launch_torchrun.sh run examples/qwen2.5_72b_release.yaml
# SDZERO_PLAN=1 first prints `sdzero plan` for the config at this world size (node 0) and stops if
# the plan says a phase does not fit (GPU_MEMORY_GIB, default 80).
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron-core's TP communication overlap wants one stream

if [[ "${SDZERO_PLAN:-0}" == 1 && "$NODE_RANK" == 0 && $# -ge 2 ]]; then
    plan_args=("$2")  # the config and its key=value overrides (not --init-from)
    for arg in "${@:3}"; do [[ "$arg" == *=* && "$arg" != -* ]] && plan_args+=("$arg"); done
    plan=$(python -m sdzero_mcore.cli plan "${plan_args[@]}" --gpus $((NNODES * GPUS_PER_NODE)) --gpu-memory-gib "${GPU_MEMORY_GIB:-80}")
    echo "$plan"
    if grep -q OVER <<<"$plan"; then echo "sdzero plan: a phase does not fit; see the layouts listed above" >&2; exit 2; fi
fi

exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    -m sdzero_mcore.cli "$@"
