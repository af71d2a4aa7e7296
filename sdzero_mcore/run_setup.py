"""What every phase sets up the same way from the run config: process groups, models, tokenizer.

A phase resolves its :class:`~sdzero_mcore.checkpoint.source.ModelSource`, checks the layout
against config.json before any process group exists, then calls :func:`setup_parallel` and
:func:`build_model`. A process that runs several phases (``sdzero run``, the demo) calls
:func:`release_phase` after each.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from sdzero_mcore.checkpoint.loading import build_model_from_hf, build_model_from_mcore
from sdzero_mcore.checkpoint.source import ModelSource
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import RunPrompts, default_stop_ids
from sdzero_mcore.models.builder import recompute_config
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.parallel import init_distributed, initialize_model_parallel, release_model_parallel
from sdzero_mcore.rollout.colocation import release_cached_blocks
from sdzero_mcore.rollout.stop_strings import stop_string_ids


def params_dtype(cfg: SDZeroConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def check_layout(cfg: SDZeroConfig, source: ModelSource) -> None:
    """TP must divide the heads, PP the layers, VPP each stage's layers, and full recompute cannot span more layers than the
    model has: checked from config.json before any process group exists."""
    arch = ModelArch.from_hf_dir(source.hf_files_dir)
    try:
        arch.check_tensor_parallel(cfg.parallel.tensor_model_parallel_size)
    except ValueError as error:
        raise ConfigError(f"parallel.tensor_model_parallel_size: {error}") from None
    try:
        arch.check_pipeline_parallel(cfg.parallel.pipeline_model_parallel_size)
    except ValueError as error:
        raise ConfigError(f"parallel.pipeline_model_parallel_size: {error}") from None
    try:
        arch.check_virtual_pipeline_parallel(cfg.parallel.pipeline_model_parallel_size,
                                             cfg.parallel.virtual_pipeline_model_parallel_size)
    except ValueError as error:
        raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size: {error} "
                          f"({source.hf_files_dir / 'config.json'})") from None
    try:
        recompute_config(cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers, arch.num_layers)
    except ValueError as error:
        raise ConfigError(f"model.{error} ({source.hf_files_dir / 'config.json'})") from None


def setup_parallel(cfg: SDZeroConfig):
    init_distributed(cfg.parallel.backend, timeout_minutes=cfg.parallel.timeout_minutes)
    return initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        context_parallel_size=cfg.parallel.context_parallel_size,
        pipeline_model_parallel_size=cfg.parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.parallel.virtual_pipeline_model_parallel_size,
        timeout_minutes=cfg.parallel.timeout_minutes,
        seed=cfg.seed,
        hierarchical_context_parallel_sizes=cfg.parallel.hierarchical_context_parallel_sizes,
        handoff_timeout_minutes=cfg.parallel.handoff_timeout_minutes,
    )


def free_finished_models() -> None:
    """Free the models, DDP wrappers and optimizer states that nothing uses any more, now, and give
    the allocator's cached blocks back to the device.

    Reference counting alone never frees a trained model: megatron's DDP wrapper and its model
    reference each other (hooks, ``config.no_sync_func``), so they wait for Python's cyclic
    collector, which runs whenever allocation counts say so, possibly after the next phase has
    built its model beside them."""
    gc.collect()
    release_cached_blocks()


def release_phase() -> None:
    """After a phase, before the next one in the same process: its models and optimizer are freed
    (:func:`free_finished_models`) and its process groups destroyed, communicators included (the
    next phase's :func:`setup_parallel` creates them again)."""
    free_finished_models()
    if dist.is_initialized():
        release_model_parallel()


def build_model(cfg: SDZeroConfig, source: ModelSource):
    build = build_model_from_mcore if source.kind == "mcore" else build_model_from_hf
    return build(
        source.path,
        params_dtype=params_dtype(cfg),
        transformer_impl=cfg.model.transformer_impl,
        local_attention=cfg.model.local_attention,
        cp_comm_type=cfg.parallel.cp_comm_type,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        recompute=cfg.model.recompute,
        recompute_method=cfg.model.recompute_method,
        recompute_num_layers=cfg.model.recompute_num_layers,
    )


def load_tokenizer(source: ModelSource):
    return AutoTokenizer.from_pretrained(source.hf_files_dir)


def config_architecture(hf_dir: Path) -> Optional[str]:
    """``architectures[0]`` of ``hf_dir/config.json`` (None when it names none); read as plain JSON so
    that a model this package cannot build yet still gets its family's phrases."""
    path = Path(hf_dir) / "config.json"
    try:
        architectures = json.loads(path.read_text()).get("architectures") or [None]
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: cannot read the model's architecture ({error})") from None
    return architectures[0]


def run_prompts(cfg: SDZeroConfig, source: ModelSource, tokenizer, **kwargs) -> RunPrompts:
    """The run's prompts and P_r phrases; ``data.p_r_preset=auto`` reads the architecture from the
    model's config.json (never from its path)."""
    architecture = config_architecture(source.hf_files_dir) if cfg.data.p_r_preset == "auto" else None
    # a Phase 1 sample may end with a special-token stop string instead of the end token: strip it too
    kwargs.setdefault("stop_token_ids", default_stop_ids(tokenizer, stop_string_ids(tokenizer, cfg.srt_collect.stop_strings)))
    try:
        return RunPrompts.from_config(cfg, tokenizer, architecture, **kwargs)
    except ValueError as error:
        raise ConfigError(f"{source.hf_files_dir / 'config.json'}: {error}") from None


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
