"""What the fork server of :func:`~sdzero_mcore.parallel.launch.run_local_workers` imports once:
megatron-core (and through it torch and triton), the bulk of a worker's start-up.

The server does not know the warning filters of the callers it will serve, so the warnings this
import raises are recorded, not shown; each worker replays them under its caller's filters
(:func:`replay_import_warnings`), which is what a worker importing megatron-core itself would show.
"""

from __future__ import annotations

import importlib
import sys
import warnings

PRELOADED = (
    "megatron.core",
    "megatron.core.distributed",
    "megatron.core.models.gpt",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
)

with warnings.catch_warnings(record=True) as IMPORT_WARNINGS:
    warnings.simplefilter("always")
    for name in PRELOADED:
        importlib.import_module(name)


def replay_import_warnings() -> None:
    """Issue the recorded import warnings again, through the current filters (module-based
    filters see the module that raised each one)."""
    module_of_file = {getattr(module, "__file__", None): name for name, module in list(sys.modules.items())}
    for caught in IMPORT_WARNINGS:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno,
                               module=module_of_file.get(caught.filename), source=caught.source)
