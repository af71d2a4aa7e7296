"""Weights from the trainer into the rollout engine: resharded megatron tensors, streamed in HF-named buckets.

Every rank takes part in resharding (tensor-parallel gathers); global rank 0, which owns the
engine, feeds the buckets to it. A remote SGLang server first joins a weight-sync group with
rank 0. A colocated SGLang engine with engine TP > 1 runs its TP rank i on GPU i, beside training
rank i: each of those ranks hands the engine the bucket copy on its own GPU (its IPC group), so
that no engine worker maps rank 0's GPU memory (a CUDA context on GPU 0 per worker).
"""

from __future__ import annotations

import socket
import weakref
from typing import Optional

import torch.distributed as dist

from sdzero_mcore.checkpoint.source import ModelSource
from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.parallel.launch import free_port
from sdzero_mcore.parallel.rank0 import is_rank0
from sdzero_mcore.parallel.resharding import iter_hf_buckets
from sdzero_mcore.rollout import make_rollout_engine
from sdzero_mcore.rollout.sglang import RemoteSGLangEngine
from sdzero_mcore.run_setup import build_model, params_dtype, setup_parallel

# The phases hold rank 0's engine and None on the other ranks. The other ranks of a colocated SGLang
# engine's IPC group still take part in every sync of the model they stream: their part of the
# engine is kept here, for as long as that model lives.
_ipc_members: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sync_engine(engine, model, bucket_mb: int) -> None:
    """Stream ``model``'s weights into the engine: every rank streams (TP collectives), rank 0 feeds
    it, and the other ranks of a colocated SGLang engine's IPC group hand it their copies."""
    buckets = iter_hf_buckets(model, bucket_mb * 2**20)
    if engine is None:
        engine = _ipc_members.get(model)
    if engine is not None:
        engine.update_weights(buckets)
    else:
        for _ in buckets:
            pass


def colocated_ipc_group(rollout_cfg) -> Optional[dist.ProcessGroup]:
    """On global ranks 0..tp-1, the group of the training ranks beside a colocated SGLang engine's
    TP ranks (engine TP rank i on GPU i of rank 0's node, as is training rank i); None on the other
    ranks, and where there is no such engine. Every rank calls it (creating a group is collective).

    With fewer training ranks than engine TP ranks, some engine GPUs have no training rank beside
    them, and rank 0's payload serves every engine TP rank (None here).
    """
    tp_size = rollout_cfg.sglang_tp_size
    if rollout_cfg.backend != "sglang" or rollout_cfg.sglang_url or tp_size == 1 or not dist.is_initialized():
        return None
    if dist.get_world_size() < tp_size:
        return None
    group = dist.new_group(list(range(tp_size)))
    return group if dist.get_rank() < tp_size else None


def _engine_part(cfg: SDZeroConfig, source: ModelSource, tokenizer):
    """Rank 0's engine, or this rank's part of a colocated SGLang engine (its IPC group), or None.
    Every rank calls it."""
    ipc_group = colocated_ipc_group(cfg.rollout)
    if not is_rank0() and ipc_group is None:
        return None
    return make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=params_dtype(cfg),
                               ipc_group=ipc_group)


def connect_remote_weight_sync(engine, rollout_cfg) -> None:
    """A remote SGLang server joins a weight-sync group with this rank (rank 0 of it) once."""
    if not isinstance(engine, RemoteSGLangEngine):
        return
    address = rollout_cfg.sglang_sync_address or socket.gethostbyname(socket.gethostname())
    engine.init_weights_update_group(address, rollout_cfg.sglang_sync_port or free_port(), rollout_cfg.sglang_tp_size)


def training_engine(cfg: SDZeroConfig, source: ModelSource, tokenizer, model):
    """Rank 0's engine for an on-policy phase (None elsewhere), holding ``model``'s current weights."""
    engine = _engine_part(cfg, source, tokenizer)
    if engine is not None and not is_rank0():
        _ipc_members[model] = engine  # this rank's part in every sync of ``model`` (see _ipc_members)
        engine = None
    if engine is not None:
        connect_remote_weight_sync(engine, cfg.rollout)
    sync_engine(engine, model, cfg.rollout.weight_sync_bucket_mb)
    return engine


def serving_engine(cfg: SDZeroConfig, source: ModelSource, tokenizer):
    """Rank 0's rollout engine serving ``source`` (None on other ranks). A HF directory loads
    directly; an sdzero-mcore checkpoint is read by megatron at the configured layout and streamed
    in (every rank joins), so both formats serve the same weights."""
    setup_parallel(cfg)  # also when rank 0 alone loads a HF directory: it must know it is rank 0
    if source.kind == "hf":
        if not is_rank0():
            return None
        return make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=params_dtype(cfg),
                                   load_weights=True)
    model = build_model(cfg, source)
    engine = _engine_part(cfg, source, tokenizer)
    sync_engine(engine, model, cfg.rollout.weight_sync_bucket_mb)
    return engine if is_rank0() else None
