"""Process groups: torch.distributed from torchrun/SLURM variables, megatron parallel_state on top.

All parallel state of the trainer lives in megatron-core's ``parallel_state``; this module only
decides how to start it (backend, rendezvous, sizes) and refuses layouts it cannot run. Beside
megatron's groups it creates one of its own, the hand-off group (:func:`handoff_group`): gloo over
all ranks with a long timeout, in which ranks wait for rank 0's rollouts (``parallel.rank0``).

A phase's groups are its own: re-initialising (the next phase of ``sdzero run``) or
:func:`release_model_parallel` destroys them, communicators included. megatron's
``destroy_model_parallel`` only forgets them, which would leave every phase's NCCL communicators
(and their GPU buffers) alive until the process ends.
"""

from __future__ import annotations

import datetime
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from torch.distributed.distributed_c10d import _world

from sdzero_mcore.parallel.cpu_compat import apply_cpu_compat
from sdzero_mcore.parallel.launch import free_port

DEFAULT_MASTER_PORT = 29500
# a rollout of a whole step (generation and scoring on rank 0) may take hours on a slow engine
DEFAULT_HANDOFF_TIMEOUT_MINUTES = 24 * 60

# the process groups the current initialize_model_parallel created (megatron's and the hand-off group)
_PHASE_GROUPS: list[dist.ProcessGroup] = []
_HANDOFF_GROUP: Optional[dist.ProcessGroup] = None


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class ParallelSizes:
    tensor: int
    context: int
    data: int
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None


def _int_env(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,9],cpu1' -> 'gpu03'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_dist_env(environ: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read rank/world/rendezvous from torchrun (RANK, WORLD_SIZE) or SLURM (SLURM_PROCID, ...).

    torchrun's variables win when both are set (torchrun inside an salloc). A process started by
    neither is a single-process job.
    """
    environ = os.environ if environ is None else environ
    port = int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT))
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=_int_env(environ, "RANK"),
            world_size=_int_env(environ, "WORLD_SIZE"),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=port,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        addr = environ.get("MASTER_ADDR") or first_slurm_host(
            environ.get("SLURM_JOB_NODELIST", environ.get("SLURM_NODELIST", "127.0.0.1"))
        )
        return DistEnv(
            rank=_int_env(environ, "SLURM_PROCID"),
            world_size=_int_env(environ, "SLURM_NTASKS"),
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def resolve_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be one of auto, nccl, gloo; got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA, and no GPU is visible; use 'gloo' or 'auto'")
    return backend


def init_distributed(backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Start torch.distributed for this process (idempotent) and return where it sits."""
    env = detect_dist_env()
    if not torch.cuda.is_available():
        apply_cpu_compat()
    if dist.is_initialized():
        return env
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    port = env.master_port
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        port = free_port()  # nobody else joins, so any free port will do
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return env


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    timeout_minutes: int = 30,
    seed: int = 1234,
    hierarchical_context_parallel_sizes: Optional[Sequence[int]] = None,
    handoff_timeout_minutes: int = DEFAULT_HANDOFF_TIMEOUT_MINUTES,
) -> ParallelSizes:
    """Create megatron's TP/PP/CP/DP groups over the running process group, and seed the RNGs
    (megatron's layers fork the model-parallel RNG even with dropout off).

    ``hierarchical_context_parallel_sizes`` (their product is the CP size) also creates the
    hierarchical CP groups that TransformerEngine's ``a2a+p2p`` scheme runs in.
    ``virtual_pipeline_model_parallel_size`` (None: off) is the number of model chunks per pipeline
    stage (megatron-core's interleaved schedule; needs PP >= 2). The hand-off group
    gets ``handoff_timeout_minutes``. Groups of a previous call are destroyed first."""
    if tensor_model_parallel_size < 1 or context_parallel_size < 1 or pipeline_model_parallel_size < 1:
        raise ValueError(
            f"parallel sizes must be >= 1; got tensor_model_parallel_size={tensor_model_parallel_size}, "
            f"context_parallel_size={context_parallel_size}, "
            f"pipeline_model_parallel_size={pipeline_model_parallel_size}"
        )
    if hierarchical_context_parallel_sizes is not None and math.prod(hierarchical_context_parallel_sizes) != context_parallel_size:
        raise ValueError(
            f"hierarchical_context_parallel_sizes={list(hierarchical_context_parallel_sizes)} must multiply to "
            f"context_parallel_size={context_parallel_size}"
        )
    if virtual_pipeline_model_parallel_size is not None and (
            virtual_pipeline_model_parallel_size < 2 or pipeline_model_parallel_size < 2):
        raise ValueError(
            f"virtual_pipeline_model_parallel_size={virtual_pipeline_model_parallel_size} needs a value >= 2 and "
            f"pipeline_model_parallel_size >= 2 (got {pipeline_model_parallel_size}); None turns it off"
        )
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * context_parallel_size * pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size="
            f"{tensor_model_parallel_size} x context_parallel_size={context_parallel_size}"
            + (f" x pipeline_model_parallel_size={pipeline_model_parallel_size}" if pipeline_model_parallel_size > 1 else "")
        )
    release_model_parallel()
    existing = set(_world.pg_map)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        hierarchical_context_parallel_sizes=(
            list(hierarchical_context_parallel_sizes) if hierarchical_context_parallel_sizes else None
        ),
        distributed_timeout_minutes=timeout_minutes,
    )
    global _HANDOFF_GROUP
    if world > 1:
        # gloo, whatever the default backend: waiting in it holds no NCCL collective open, and its
        # timeout, not the NCCL one, bounds how long the other ranks wait for rank 0's work
        _HANDOFF_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=handoff_timeout_minutes))
    _PHASE_GROUPS[:] = [group for group in _world.pg_map if group not in existing]
    set_seed(seed)
    return ParallelSizes(
        tensor=tensor_model_parallel_size,
        context=context_parallel_size,
        data=world // model_parallel,
        pipeline=pipeline_model_parallel_size,
        virtual_pipeline=virtual_pipeline_model_parallel_size,
    )


def handoff_group() -> Optional[dist.ProcessGroup]:
    """The gloo group with a long timeout for handing rank 0's results to the others (None
    before :func:`initialize_model_parallel` and in a one-rank job)."""
    return _HANDOFF_GROUP


def release_model_parallel() -> None:
    """Destroy the groups of the last :func:`initialize_model_parallel` (communicators included)
    and megatron's parallel state; the default process group stays."""
    global _HANDOFF_GROUP
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()  # forgets its groups (destroys only its gloo ones)
    for group in _PHASE_GROUPS:
        if group in _world.pg_map:
            dist.destroy_process_group(group)
    _PHASE_GROUPS.clear()
    _HANDOFF_GROUP = None


def set_seed(seed: int) -> None:
    """Seed Python, torch, and megatron's model-parallel RNG tracker (distinct per TP rank)."""
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group, if they exist."""
    if dist.is_initialized():
        release_model_parallel()
        dist.destroy_process_group()
