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
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from sdzero_mcore.checkpoint.mapping import gather_shards, global_to_hf, mappings_by_param_name

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
    """(HF name, full tensor) for every weight, in the model's parameter order; a collective over TP."""
    model = _unwrap(model)
    group = tp_group if tp_group is not None else _tp_group()
    table = mappings_by_param_name(model.hf_arch)
    for name, param in model.named_parameters():
        mapping = table.get(name)
        if mapping is None:
            raise ValueError(f"parameter {name!r} has no HF mapping for {model.hf_arch.architecture}")
        full = gather_shards(mapping, _gather_tp(param.detach(), group))
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
