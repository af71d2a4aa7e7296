"""The arguments of ``sdzero plan`` (``sdzero_mcore.planner``), apart so that building the CLI's parser
imports neither torch's model code nor megatron-core."""

from __future__ import annotations

import argparse

RECOMPUTE = ("none", "selective", "full")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config (e.g. examples/qwen2.5_72b_release.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tensor_model_parallel_size=8")
    parser.add_argument("--gpus", type=int, help="GPUs of the run: sets DP and lists the smallest layouts that fit")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (H100 80, H200 141)")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="held outside tensors: CUDA context, NCCL buffers, allocator fragmentation")
    parser.add_argument("--hf-config", help="a config.json (or its directory) for the model's shape")
    parser.add_argument("--recompute", choices=RECOMPUTE, help="plan with this recompute instead of the config's")
