"""teacher_topk: the teacher's top-k log-probabilities (normalised over the full vocabulary) and ids.

One read of the teacher logits per row computes both the log-sum-exp (online max and sum) and the
exact top-k. The top-k is kept as packed int64 keys, ``(order-preserving float bits << 32) |
(0xFFFFFFFF - id)``: comparing keys compares values, and among equal values the lower id wins, so
ties have one defined order. Elements enter the running top-k only when they beat its current
k-th key, which after the first block is rare, so the row is mostly streamed at read speed.

Under tensor parallelism each rank takes the top-k of its vocab shard (global ids), the k x TP
candidates are all-gathered and merged, and the log-sum-exp is combined with a MAX then a SUM
all-reduce. No float32 copy of [T, V] is made: the kernel keeps one block of a row in registers;
the PyTorch path (CPU) handles at most ``ROW_CHUNK``-bounded slices.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from sdzero_kernels._common import (
    MAX_K,
    check_logits,
    check_temperature,
    combine_lse,
    next_power_of_2,
    rows_view,
    tp_size_rank,
    use_triton,
)

MIN_KEY = -(2**63)  # below every real key: an empty top-k slot
MAX_KEY = 2**63 - 1  # above every real key: a padding slot that is never replaced
LOW_MASK = 0xFFFFFFFF
_LOW_MASK = tl.constexpr(LOW_MASK)
# Kernels may read module globals only as constexpr.
_MIN_KEY = tl.constexpr(MIN_KEY)
_MAX_KEY = tl.constexpr(MAX_KEY)
CHUNK_ELEMENTS = 1 << 24  # PyTorch path: rows per chunk = CHUNK_ELEMENTS // V


# ------------------------------------------------------------------------------------------
# Key packing (shared by the Triton kernel and the PyTorch path)


@triton.jit
def _pack_keys(x, ids):
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # An explicit int64 constant: a bare 0xFFFFFFFF literal would be typed uint32.
    low = tl.full(ids.shape, _LOW_MASK, tl.int64) - ids.to(tl.int64)
    return (ordered.to(tl.int64) << 32) | low


def pack_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """float32 values and int64 ids -> int64 keys ordered by (value, then lower id first)."""
    bits = values.contiguous().view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(torch.int64) << 32) | (LOW_MASK - ids)


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    high = (keys >> 32).to(torch.int32)
    values = torch.where(high < 0, high ^ 0x7FFFFFFF, high).view(torch.float32)
    return values, LOW_MASK - (keys & LOW_MASK)


# ------------------------------------------------------------------------------------------
# Triton: one program per row


@triton.jit
def _topk_lse_kernel(
    logits_ptr,
    row_stride,
    vocab,
    inv_temp,
    id_offset,
    keys_ptr,
    max_ptr,
    sum_ptr,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    slots = tl.arange(0, K_PAD)
    top = tl.where(slots < K, _MIN_KEY, _MAX_KEY).to(tl.int64)
    kth = tl.min(top, axis=0)  # the key an element must beat to enter the top-k
    row_max = -float("inf")
    row_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        x = tl.load(row_ptr + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        # A row that is all -inf so far keeps sum 0; this shift never forms inf - inf.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(tl.exp(x - shift), axis=0)
        row_max = new_max
        keys = tl.where(valid, _pack_keys(x, cols + id_offset), _MIN_KEY)
        candidates = tl.where(keys > kth, keys, _MIN_KEY)
        best = tl.max(candidates, axis=0)
        while best > kth:
            top = tl.where(slots == tl.argmin(top, axis=0), best, top)
            kth = tl.min(top, axis=0)
            candidates = tl.where((candidates > kth) & (candidates != best), candidates, _MIN_KEY)
            best = tl.max(candidates, axis=0)
    tl.store(keys_ptr + row.to(tl.int64) * K + slots, top, mask=slots < K)
    tl.store(max_ptr + row, row_max)
    tl.store(sum_ptr + row, row_sum)


def _shard_topk_triton(rows: torch.Tensor, k: int, inv_temp: float, id_offset: int):
    num_rows, vocab = rows.shape
    keys = torch.empty(num_rows, k, dtype=torch.int64, device=rows.device)
    row_max = torch.empty(num_rows, dtype=torch.float32, device=rows.device)
    row_sum = torch.empty_like(row_max)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    # Small blocks under the interpreter so that tests cross many block boundaries.
    block_v = 128 if interpreting else 2048
    if num_rows:
        _topk_lse_kernel[(num_rows,)](
            rows, rows.stride(0), vocab, inv_temp, id_offset, keys, row_max, row_sum,
            K=k, K_PAD=next_power_of_2(k), BLOCK_V=block_v, num_warps=8,
        )
    return keys, row_max, row_sum


# ------------------------------------------------------------------------------------------
# PyTorch path (CPU): the same per-shard statistics, chunk by chunk


def _shard_topk_torch(rows: torch.Tensor, k: int, inv_temp: float, id_offset: int):
    num_rows, vocab = rows.shape
    keys, row_max, row_sum = [], [], []
    ids = torch.arange(vocab, device=rows.device) + id_offset
    local_k = min(k, vocab)
    for chunk in rows.split(max(1, CHUNK_ELEMENTS // vocab)):
        x = chunk.float()
        if inv_temp != 1.0:  # x * 1.0 is x: skip a pass over the chunk
            x = x * inv_temp
        top, chunk_max = _top_keys(x, ids, local_k)
        shifted = torch.where(torch.isneginf(chunk_max), 0.0, chunk_max)
        row_sum.append((x - shifted[:, None]).exp_().sum(dim=1))  # in place: one [rows, V] temporary, not two
        row_max.append(chunk_max)
        if local_k < k:  # a shard narrower than k: empty slots never win the merge
            top = torch.cat([top, top.new_full((top.shape[0], k - local_k), MIN_KEY)], dim=1)
        keys.append(top)
    if not num_rows:
        empty = torch.empty(0, device=rows.device)
        return torch.empty(0, k, dtype=torch.int64, device=rows.device), empty, empty
    return torch.cat(keys), torch.cat(row_max), torch.cat(row_sum)


def _top_keys(x: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the k largest packed keys of each row of ``x`` [T, V] with ids ``ids`` [V], sorted
    descending; the row max): ``pack_keys(x, ids).topk(k).values`` and ``x.max(dim=1).values``
    without packing all T x V elements.

    A float top-(k + 1) of the row: where its k-th value is strictly above its (k + 1)-th, the
    row's top-k set is fixed whatever the order of ties, and only those k elements are packed.
    The other rows (ties across the k-th value, -0.0 beside +0.0, NaN) are packed in full, so the
    keys are those of the full packing. The first value is the row max (NaN first, as ``max``)."""
    if k >= x.shape[1]:
        return pack_keys(x, ids.expand_as(x)).topk(k, dim=1).values, x.max(dim=1).values
    values, columns = x.topk(k + 1, dim=1)
    keys = pack_keys(values[:, :k], ids[columns[:, :k]]).sort(dim=1, descending=True).values
    ambiguous = ~(values[:, k - 1] > values[:, k]) | values.isnan().any(dim=1)
    rows = ambiguous.nonzero().squeeze(1)
    if rows.numel():
        keys[rows] = pack_keys(x[rows], ids.expand(len(rows), -1)).topk(k, dim=1).values
    return keys, values[:, 0]


# ------------------------------------------------------------------------------------------
# Public function


def check_k(k, vocab: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > vocab:
        raise ValueError(f"k={k} is larger than the vocabulary size {vocab}")
    if k > MAX_K:
        raise ValueError(f"k={k} is larger than the supported maximum {MAX_K}")


def teacher_topk(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` log-probabilities of softmax(logits / temperature) over the full vocabulary.

    ``logits`` is [T, V_local] or [..., V_local] (bf16, fp16 or fp32); under tensor parallelism
    each rank passes its vocab shard and ``tp_group``. Returns (logprobs [..., k] float32, ids
    [..., k] int64 global), sorted by descending probability, equal values by ascending id.
    No gradient flows (the teacher is frozen).
    """
    check_logits("logits", logits)
    temperature = check_temperature(temperature)
    tp_size, tp_rank = tp_size_rank(tp_group)
    check_k(k, logits.shape[-1] * tp_size)
    lead = logits.shape[:-1]
    with torch.no_grad():
        rows = rows_view(logits.detach())
        keys, row_max, row_sum = shard_topk_for(rows)(rows, k, 1.0 / temperature, tp_rank * rows.shape[1])
        logprobs, ids = merge_shard_topk(keys, row_max, row_sum, k, tp_group)
    return logprobs.reshape(*lead, k), ids.reshape(*lead, k)


def shard_topk_for(rows: torch.Tensor):
    """The per-shard statistics function for ``rows``' backend: (rows, k, inv_temp, id_offset) ->
    (packed top-k keys [T, k], row max [T], row sum of exp(x - max) [T])."""
    return _shard_topk_triton if use_triton(rows) else _shard_topk_torch


def merge_shard_topk(keys, row_max, row_sum, k: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Each TP rank's shard statistics -> (log-probabilities [T, k] float32, global ids [T, k] int64):
    the k x TP candidate keys all-gathered and merged, the log-sum-exp combined over the group."""
    tp_size = tp_size_rank(tp_group)[0]
    if tp_size > 1:
        gathered = [torch.empty_like(keys) for _ in range(tp_size)]
        dist.all_gather(gathered, keys.contiguous(), group=tp_group)
        keys = torch.cat(gathered, dim=1)
    keys = keys.topk(k, dim=1, sorted=True).values
    values, ids = unpack_keys(keys)
    (lse,) = combine_lse(row_max, row_sum, tp_group)
    return values - lse[:, None], ids


def teacher_topk_reference(logits: torch.Tensor, k: int, *, temperature: float = 1.0, dtype=torch.float64):
    """Test oracle: full log-softmax in ``dtype``, then a stable descending sort (ties: lower id first)."""
    logprobs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)
    values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]
