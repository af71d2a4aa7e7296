"""Process groups, CPU compatibility for megatron-core, and local multi-process launching.

The names below load their module on first use (PEP 562): a spawned worker imports
``parallel.launch`` to start, and must not import megatron-core before it has applied the
caller's warning filters.
"""

from sdzero_mcore.lazy_exports import lazy_getattr

_HOME = {
    "apply_cpu_compat": "cpu_compat",
    "run_local_workers": "launch",
    "DistEnv": "state",
    "ParallelSizes": "state",
    "destroy_distributed": "state",
    "detect_dist_env": "state",
    "handoff_group": "state",
    "init_distributed": "state",
    "initialize_model_parallel": "state",
    "release_model_parallel": "state",
    "set_seed": "state",
}

__all__ = sorted(_HOME)

__getattr__ = lazy_getattr(__name__, _HOME)
