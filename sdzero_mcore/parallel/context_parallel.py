"""Context parallelism for token-level tensors: the load-balanced split, its inverse, and CP-aware loss sums.

Megatron splits a sequence of length S (a multiple of 2 x CP) into 2 x CP equal chunks and gives rank
``r`` chunks ``r`` and ``2*CP - 1 - r``. Under a causal mask the first chunks are cheap and the last
are expensive, so pairing them evens out the attention work. Everything that lines up with tokens
(ids, positions, loss masks, the teacher's top-K targets) must be split the same way, and merged
back the same way. RoPE positions are split by megatron-core itself with this exact order.

The loss: each rank sees only its tokens. A token mean over the global batch is the sum over all
DP x CP ranks of the masked loss divided by the total token count; the trainer's per-token
contract (megatron-core's ``calculate_per_token_loss``) does that division in one place, so a
loss function returns only its rank's masked sum and count.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def cp_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two sequence chunks (out of 2 x cp_size) that rank ``cp_rank`` holds, in its local order."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank} (cp_size={cp_size})")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def sequence_chunk_order(cp_size: int) -> list[int]:
    """For each global chunk m (in sequence order), its index in the all-gathered rank-major layout.

    All-gathering the local tensors over CP gives chunks in the order
    [rank 0 first, rank 0 second, rank 1 first, ...]; indexing that layout with this list restores
    sequence order.
    """
    order = []
    for m in range(2 * cp_size):
        order.append(2 * m if m < cp_size else 2 * (2 * cp_size - 1 - m) + 1)
    return order


def padded_seq_len(seq_len: int, cp_size: int) -> int:
    """``seq_len`` rounded up to a multiple of 2 x cp_size (what the split needs)."""
    multiple = 2 * cp_size
    return -(-seq_len // multiple) * multiple


def pad_seq(tensor: torch.Tensor, length: int, *, dim: int = 1, value=0) -> torch.Tensor:
    """Right-pad ``tensor`` along ``dim`` to ``length`` with ``value``."""
    dim = dim % tensor.dim()
    have = tensor.shape[dim]
    if have > length:
        raise ValueError(f"cannot pad a sequence of length {have} down to {length} (dim={dim})")
    if have == length:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = length - have
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=dim)


def _chunks(tensor: torch.Tensor, cp_size: int, dim: int) -> tuple[torch.Tensor, ...]:
    seq = tensor.shape[dim]
    if seq % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq} (dim={dim}) is not a multiple of 2 x context_parallel_size = "
            f"{2 * cp_size}; pad it first (pad_seq / padded_seq_len)"
        )
    return tensor.chunk(2 * cp_size, dim=dim)


def split_for_cp(tensor: torch.Tensor, cp_size: int, cp_rank: int, *, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-sequence tensor: chunks r and 2*CP-1-r, concatenated along ``dim``."""
    if cp_size == 1:
        return tensor
    dim = dim % tensor.dim()
    chunks = _chunks(tensor, cp_size, dim)
    first, second = cp_chunk_ids(cp_size, cp_rank)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def merge_from_cp(pieces: Sequence[torch.Tensor], *, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`split_for_cp`: ``pieces[r]`` is rank r's part; returns the full sequence."""
    cp_size = len(pieces)
    if cp_size == 1:
        return pieces[0]
    dim = dim % pieces[0].dim()
    halves = []
    for piece in pieces:
        if piece.shape[dim] % 2:
            raise ValueError(f"a CP rank's part must hold two equal chunks; got length {piece.shape[dim]}")
        halves.extend(piece.chunk(2, dim=dim))
    return torch.cat([halves[i] for i in sequence_chunk_order(cp_size)], dim=dim)


def gather_from_cp(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None, *, dim: int = 1) -> torch.Tensor:
    """All-gather every CP rank's part and return the full sequence (no autograd; for outputs and targets)."""
    group = group if group is not None else _cp_group()
    cp_size = dist.get_world_size(group) if group is not None else 1
    if cp_size == 1:
        return tensor
    pieces = [torch.empty_like(tensor) for _ in range(cp_size)]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return merge_from_cp(pieces, dim=dim)


def split_batch_for_cp(
    batch: Mapping[str, torch.Tensor],
    cp_size: int,
    cp_rank: int,
    *,
    pad_values: Optional[Mapping[str, object]] = None,
    dim: int = 1,
) -> dict[str, torch.Tensor]:
    """Pad every token-level tensor of ``batch`` to a multiple of 2 x CP and take this rank's part.

    All tensors must share the sequence length along ``dim``; ``pad_values`` gives the fill per key
    (0 by default, which masks padded tokens out of a loss mask).
    """
    pad_values = dict(pad_values or {})
    lengths = {name: t.shape[dim] for name, t in batch.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"token-level tensors have different sequence lengths along dim {dim}: {lengths}")
    unknown = set(pad_values) - set(batch)
    if unknown:
        raise ValueError(f"pad_values names keys that are not in the batch: {sorted(unknown)}")
    out = {}
    for name, tensor in batch.items():
        full = pad_seq(tensor, padded_seq_len(tensor.shape[dim], cp_size), dim=dim, value=pad_values.get(name, 0))
        out[name] = split_for_cp(full, cp_size, cp_rank, dim=dim)
    return out


def _cp_group() -> Optional[dist.ProcessGroup]:
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_context_parallel_group()


def _dp_cp_group() -> Optional[dist.ProcessGroup]:
    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def global_sum(values: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``values`` (any shape) summed over the DP x CP group, in float64 (counts exact to 2^53)."""
    group = group if group is not None else _dp_cp_group()
    total = values.detach().to(torch.float64)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return total


def global_token_count(loss_mask: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """The number of loss tokens summed over the DP x CP group (float64 scalar)."""
    return global_sum(loss_mask.detach().sum(), group)
