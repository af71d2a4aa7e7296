"""Process groups, CPU compatibility for megatron-core, and local multi-process launching."""

from sdzero_mcore.parallel.cpu_compat import apply_cpu_compat
from sdzero_mcore.parallel.launch import run_local_workers
from sdzero_mcore.parallel.state import (
    DistEnv,
    ParallelSizes,
    destroy_distributed,
    detect_dist_env,
    init_distributed,
    initialize_model_parallel,
    set_seed,
)

__all__ = [
    "DistEnv",
    "ParallelSizes",
    "apply_cpu_compat",
    "destroy_distributed",
    "detect_dist_env",
    "init_distributed",
    "initialize_model_parallel",
    "run_local_workers",
    "set_seed",
]
