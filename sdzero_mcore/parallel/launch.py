"""Run a function in N local processes that form one torch.distributed job (what torchrun does).

The converters use it to write a checkpoint at tensor-parallel size N from a single command, and
the tests use it for multi-rank runs over gloo. Each worker sees the same variables torchrun sets,
so code under it runs unchanged under torchrun or SLURM.

The workers start from a fork server that has imported megatron-core once (multiprocessing's
"forkserver" method with a preload): a freshly spawned worker spends about 7 s of CPU importing it
(torch, triton, megatron-core's own modules), which dominated short multi-rank jobs. The server is
a clean process, started on first use and kept until the caller exits; it imports only, so it
holds no threads, no CUDA context and no process groups when it forks. Each worker gets the
caller's environment as it is at the call (the server's is that of its start).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import socket
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.multiprocessing as mp

# Imported once by the fork server: megatron-core, its import warnings recorded for the workers
# to replay under their caller's filters
FORKSERVER_PRELOAD = ("sdzero_mcore.parallel.forkserver_preload",)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A free local port, kept bound (SO_REUSEADDR, not listening) until the block ends. A port
    from :func:`free_port` is free again until rank 0's TCPStore listens on it, and another
    process binding port 0 meanwhile (a concurrent job, gloo's own connections) can take it:
    EADDRINUSE in the workers. Held, no other bind to port 0 gets it, while the TCPStore, which
    sets SO_REUSEADDR too, can still listen on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _worker(local_rank: int, fn_ref: tuple[str, str], nprocs: int, port: int, environ: dict, warning_filters: list,
            pickled_args: bytes) -> None:
    os.environ.clear()
    os.environ.update(environ)  # the caller's, not the fork server's
    warnings.filters[:] = warning_filters  # a new process starts with default filters
    # ``fn`` and its arguments are imported only now, under the caller's filters: their modules
    # import megatron-core, whose import-time notices would otherwise reach the user's terminal
    # (the fork server imported it already, recording those notices: shown now, or not, as filtered)
    importlib.import_module(FORKSERVER_PRELOAD[0]).replay_import_warnings()
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
    """Call ``fn(*args)`` in ``nprocs`` worker processes with torchrun-style variables.

    ``fn`` must be importable (a module-level function). A worker's exception is re-raised here
    with its traceback. Callers that reach this from a script need an
    ``if __name__ == "__main__":`` guard, as for spawn-based multiprocessing (a forkserver worker
    prepares ``__main__`` as a spawned one does).
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    mp.set_forkserver_preload(list(FORKSERVER_PRELOAD))  # no effect once the server runs
    with reserved_port() as port:
        mp.start_processes(
            _worker,
            args=((fn.__module__, fn.__qualname__), nprocs, port, dict(os.environ), list(warnings.filters),
                  pickle.dumps(tuple(args))),
            nprocs=nprocs,
            join=True,
            start_method="forkserver",
        )
