"""Stream a live megatron-core model's weights as full HF-named tensors, in size-bounded buckets.

The rollout engine (transformers in-process, or SGLang) wants the model it serves in HF layout:
whole tensors, q/k/v and gate/up separate, no vocabulary padding. Every TP rank calls
:func:`iter_hf_buckets` together (each parameter is all-gathered over the TP group); every rank
receives the same buckets, and the caller decides which rank hands them to an engine.

The TP gathering and the HF split use the converters' mapping (``checkpoint/mapping.py``), so the
engine's weights and an exported checkpoint cannot disagree. Tensors keep the model's dtype. At
most one bucket of HF tensors is held at a time, plus the one parameter in flight (its gathered TP
shards and its global tensor): a bucket is yielded as soon as the next tensor would overflow it,
and the caller drops it before asking for the next (tests/test_rollout_hf.py measures this).

At pipeline-parallel size > 1 each stage holds its own layers: the stages take turns, in order,
each broadcasting its TP-gathered global tensors over the pipeline group (their names, at global
layer indices, and shapes first), so that every rank still receives every tensor in the order of
the unsplit model: the embedding from the first stage, the final norm and the output layer from
the last. With tied embeddings the last stage's copy of the embedding is not sent (HF has no
``lm_head`` then; the first stage's embedding is the one weight). With virtual pipeline stages
the turns go chunk by chunk, stage by stage within each (chunk 0 of every stage, then chunk 1, ...):
the order of the global layers.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sdzero_mcore.checkpoint.mapping import (
    gather_shards,
    global_to_hf,
    is_tied_output_copy,
    mappings_by_param_name,
    model_param_mappings,
)
from sdzero_mcore.parallel.pipeline import broadcast_tensor_from_stage, pipeline_parallel_size

DEFAULT_BUCKET_BYTES = 512 * 2**20

Bucket = list[tuple[str, torch.Tensor]]


def _tp_group() -> Optional[dist.ProcessGroup]:
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(model, "hf_arch") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "hf_arch"):
        raise ValueError("resharding needs a model built by sdzero_mcore (it carries hf_arch); got " + type(model).__name__)
    return model


def _gather_tp(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> list[torch.Tensor]:
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return shards


@torch.no_grad()
def iter_hf_tensors(model, tp_group: Optional[dist.ProcessGroup] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight, in the model's parameter order; a collective over TP
    (and over the pipeline stages at PP > 1)."""
    group = tp_group if tp_group is not None else _tp_group()
    if isinstance(model, list):  # model chunks: virtual stage after virtual stage
        for chunk in model:
            yield from _iter_pipeline_hf_tensors(_unwrap(chunk), group)
        return
    model = _unwrap(model)
    if pipeline_parallel_size() > 1:
        yield from _iter_pipeline_hf_tensors(model, group)
        return
    table = mappings_by_param_name(model.hf_arch)
    for name, param in model.named_parameters():
        mapping = table.get(name)
        if mapping is None:
            raise ValueError(f"parameter {name!r} has no HF mapping for {model.hf_arch.architecture}")
        full = gather_shards(mapping, _gather_tp(param.detach(), group))
        yield from global_to_hf(mapping, full, model.hf_arch).items()
        del full


def _iter_pipeline_hf_tensors(model, group: Optional[dist.ProcessGroup]) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`iter_hf_tensors` at PP > 1: stage after stage, each tensor broadcast from its stage
    (``model``: this stage's GPTModel, or its chunk of the virtual stage every stage is at)."""
    table = model_param_mappings(model)
    tp_size = dist.get_world_size(group) if group is not None else 1
    device = next(model.parameters()).device
    # this stage's parameters as (name, global mapping, global shape, dtype); shapes from meta tensors
    mine = [
        (name, table[name], tuple(gather_shards(table[name], [param.detach().to("meta")] * tp_size).shape), param.dtype)
        for name, param in model.named_parameters()
        if not is_tied_output_copy(model, name)
    ]
    params = dict(model.named_parameters())
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    my_stage = parallel_state.get_pipeline_model_parallel_rank()
    for stage in range(pipeline_parallel_size()):
        listing = [[(mapping, shape, dtype) for _, mapping, shape, dtype in mine] if stage == my_stage else None]
        dist.broadcast_object_list(listing, src=dist.get_global_rank(pp_group, stage), group=pp_group)
        for index, (mapping, shape, dtype) in enumerate(listing[0]):
            full = None
            if stage == my_stage:
                full = gather_shards(mapping, _gather_tp(params[mine[index][0]].detach(), group))
            full = broadcast_tensor_from_stage(full, stage, shape, dtype, device)
            yield from global_to_hf(mapping, full, model.hf_arch).items()
            del full


def iter_hf_buckets(
    model, bucket_bytes: int = DEFAULT_BUCKET_BYTES, tp_group: Optional[dist.ProcessGroup] = None
) -> Iterator[Bucket]:
    """Lists of (HF name, tensor) of at most ``bucket_bytes`` each (one larger tensor goes alone).

    Drop each bucket before asking for the next one, or memory grows by a bucket per step.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: Bucket = []
    size = 0
    for name, tensor in iter_hf_tensors(model, tp_group):
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket
