"""Work that one rank does for all: rank-0 checks, hand-overs of Python objects, the DP shard of a step.

Rank 0 owns the rollout engine and the reward workers; the other ranks either receive its result
in the hand-off group (:func:`broadcast_object`: gloo, ``parallel.handoff_timeout_minutes``, so
that a long rollout holds no NCCL collective open) or poll for a file it writes
(:func:`run_on_rank0`, for work that may take longer still: collecting, evaluating).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.parallel.state import handoff_group


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, through the hand-off group once the parallel state exists
    (the other ranks may wait in it for the whole of rank 0's rollout)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=handoff_group())  # None: the default group
    return box[0]


def data_parallel_shard(items: Sequence) -> list:
    """This data-parallel rank's share of a step's items (round robin)."""
    size = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    return list(items[rank::size])


def collective_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU with NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def run_on_rank0(fn, signal_dir: Path, poll_s: float = 2.0):
    """``fn()`` on global rank 0, its (JSON-able) result on every rank.

    The other ranks wait by polling for a result file rather than in a collective: rank 0's work
    (collecting, evaluating) can outlast the process group's timeout. If rank 0 fails, the
    launcher (torchrun / srun) ends the other ranks.
    """
    token = broadcast_object(uuid.uuid4().hex)
    signal = Path(signal_dir) / f".rank0-result-{token}.json"
    if is_rank0():
        result = fn()
        signal.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(signal, json.dumps({"result": result}))
    else:
        while not signal.is_file():
            time.sleep(poll_s)
        result = json.loads(signal.read_text())["result"]
    barrier()  # everyone has read the result
    if is_rank0():
        signal.unlink(missing_ok=True)
    return result
