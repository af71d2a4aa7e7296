"""Rollout engines: the RolloutEngine contract, the in-process ``hf`` backend, ``sglang`` and ``vllm``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from sdzero_mcore.rollout.base import Completion, RolloutEngine, SamplingParams
from sdzero_mcore.rollout.hf import HFRolloutEngine
from sdzero_mcore.rollout.sglang import RemoteSGLangEngine, SGLangRolloutEngine

__all__ = ["Completion", "RolloutEngine", "SamplingParams", "make_rollout_engine", "sampling_from_config"]


def sampling_from_config(rollout_cfg, *, stop_token_ids: Sequence[int] = (), n: int = 1, return_logprobs: bool = False,
                         seed: Optional[int] = None) -> SamplingParams:
    """The SamplingParams of a ``RolloutConfig`` section (``sdzero_mcore.config``)."""
    return SamplingParams(
        temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p,
        top_k=rollout_cfg.top_k,
        max_new_tokens=rollout_cfg.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
        n=n,
        seed=rollout_cfg.seed if seed is None else seed,
        return_logprobs=return_logprobs,
    )


def make_rollout_engine(rollout_cfg, hf_dir: str | Path, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                        device=None, load_weights: bool = False,
                        ipc_group: Optional[dist.ProcessGroup] = None) -> RolloutEngine:
    """The engine ``rollout_cfg.backend`` names, serving the architecture in ``hf_dir``.

    ``load_weights=False`` starts the engine without reading weights (SGLang on dummy ones): the
    trainer syncs them before the first generation, and an sdzero-mcore checkpoint's ``hf/`` folder
    holds none. ``device`` is the hf engine's; vLLM and SGLang place themselves. ``ipc_group``: the
    training ranks beside a colocated SGLang engine's TP ranks (``SGLangRolloutEngine``); each of
    them builds its part of the engine with it.
    """
    if rollout_cfg.backend == "hf":
        build = HFRolloutEngine.from_pretrained if load_weights else HFRolloutEngine.from_config
        return build(hf_dir, dtype=dtype, device=device)
    if rollout_cfg.backend == "sglang":
        if rollout_cfg.sglang_url:
            return RemoteSGLangEngine(rollout_cfg.sglang_url, tokenizer=tokenizer)
        return SGLangRolloutEngine(
            str(hf_dir),
            tp_size=rollout_cfg.sglang_tp_size,
            mem_fraction_static=rollout_cfg.sglang_mem_fraction_static,
            tokenizer=tokenizer,
            ipc_group=ipc_group,
            load_weights=load_weights,
        )
    if rollout_cfg.backend == "vllm":
        from sdzero_mcore.rollout.vllm import make_vllm_engine

        return make_vllm_engine(rollout_cfg, hf_dir, tokenizer=tokenizer, dtype=dtype, load_weights=load_weights)
    raise ValueError(f"rollout.backend must be one of hf, sglang, vllm; got {rollout_cfg.backend!r}")
