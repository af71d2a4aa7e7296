"""Weights from the trainer into the rollout engine: resharded megatron tensors, streamed in HF-named buckets.

Every rank takes part in resharding (tensor-parallel gathers); global rank 0, which owns the
engine, feeds the buckets to it. A remote SGLang server first joins a weight-sync group with
rank 0.
"""

from __future__ import annotations

import socket

from sdzero_mcore.checkpoint.source import ModelSource
from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.parallel.launch import free_port
from sdzero_mcore.parallel.rank0 import is_rank0
from sdzero_mcore.parallel.resharding import iter_hf_buckets
from sdzero_mcore.rollout import make_rollout_engine
from sdzero_mcore.rollout.sglang import RemoteSGLangEngine
from sdzero_mcore.run_setup import build_model, params_dtype, setup_parallel


def sync_engine(engine, model, bucket_mb: int) -> None:
    """Stream ``model``'s weights into the engine: every rank streams (TP collectives), rank 0 feeds it."""
    buckets = iter_hf_buckets(model, bucket_mb * 2**20)
    if engine is not None:
        engine.update_weights(buckets)
    else:
        for _ in buckets:
            pass


def connect_remote_weight_sync(engine, rollout_cfg) -> None:
    """A remote SGLang server joins a weight-sync group with this rank (rank 0 of it) once."""
    if not isinstance(engine, RemoteSGLangEngine):
        return
    address = rollout_cfg.sglang_sync_address or socket.gethostbyname(socket.gethostname())
    engine.init_weights_update_group(address, rollout_cfg.sglang_sync_port or free_port(), rollout_cfg.sglang_tp_size)


def training_engine(cfg: SDZeroConfig, source: ModelSource, tokenizer, model):
    """Rank 0's engine for an on-policy phase (None elsewhere), holding ``model``'s current weights."""
    engine = None
    if is_rank0():
        engine = make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=params_dtype(cfg))
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
    engine = make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=params_dtype(cfg)) if is_rank0() else None
    sync_engine(engine, model, cfg.rollout.weight_sync_bucket_mb)
    return engine
