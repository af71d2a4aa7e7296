"""Run a function in N local processes that form one torch.distributed job (what torchrun does).

The converters use it to write a checkpoint at tensor-parallel size N from a single command, and
the tests use it for multi-rank runs over gloo. Each worker sees the same variables torchrun sets,
so code under it runs unchanged under torchrun or SLURM.
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import socket
import warnings
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(local_rank: int, fn_ref: tuple[str, str], nprocs: int, port: int, warning_filters: list,
            pickled_args: bytes) -> None:
    warnings.filters[:] = warning_filters  # a spawned process starts with default filters
    # ``fn`` and its arguments are imported only now, under the caller's filters: their modules may
    # import megatron-core, whose import-time notices would otherwise reach the user's terminal
    module, qualname = fn_ref
    fn = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
    args = pickle.loads(pickled_args)
    os.environ.update(
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(nprocs),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if not torch.cuda.is_available():
        # N workers share the machine's cores instead of each starting one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    fn(*args)


def run_local_workers(fn: Callable, nprocs: int, *args: Any) -> None:
    """Call ``fn(*args)`` in ``nprocs`` spawned processes with torchrun-style variables.

    ``fn`` must be importable (a module-level function). A worker's exception is re-raised here
    with its traceback. Callers that reach this from a script need an
    ``if __name__ == "__main__":`` guard, as for any spawn-based multiprocessing.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    mp.start_processes(
        _worker,
        args=((fn.__module__, fn.__qualname__), nprocs, free_port(), list(warnings.filters), pickle.dumps(tuple(args))),
        nprocs=nprocs,
        join=True,
        start_method="spawn",
    )
