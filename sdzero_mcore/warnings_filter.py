"""Silence dependency warnings that a user of the `sdzero` command cannot act on.

Applied by the command-line entry point (and inherited by the workers it spawns), never on
import, so library users keep their own warning settings.
"""

from __future__ import annotations

import warnings

import torch


def quiet_dependency_warnings() -> None:
    # megatron-core announces at import that apex / TransformerEngine are absent; the README says
    # which implementation runs where.
    warnings.filterwarnings("ignore", message=r".*(Apex is|Transformer Engine and Apex are) not installed")
    warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
    # Deprecations inside megatron-core's checkpoint code and the torch APIs it calls.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.c10d_logger")
    if not torch.cuda.is_available():
        # Advice about CUDA streams for overlapping TP communication; meaningless on CPU.
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")
