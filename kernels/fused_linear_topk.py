"""fused_linear_teacher_topk: the teacher's top-k from its final hidden states and output weight,
without a [T, V] logit tensor.

The output layer is applied one vocabulary chunk at a time: the logits of a chunk, [T, chunk] in
the model's dtype, go through ``teacher_topk``'s per-shard statistics (the same packed keys, so
ties resolve the same way: equal values, lower id first; the same Triton kernel on a GPU); the
chunk's top-k keys are merged into the running top-k (k + k keys per row) and its (max, sum) into
the running log-sum-exp (online softmax). Then the shard's statistics go through the same TP merge
as ``teacher_topk``. At most one chunk of logits is alive. The ids are those of ``teacher_topk``
on the full logits; the log-probabilities differ only by the order of the log-sum-exp's additions
(float32 rounding, ~1e-7).

Rows of the weight from ``vocab_size`` on (megatron's vocabulary padding) are skipped: the dense
path gives them the lowest logit, which neither enters a top-k nor adds to a sum.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from sdzero_kernels._common import (
    VOCAB_CHUNK,
    check_hidden_and_weight,
    check_temperature,
    check_vocab_chunk,
    chunk_logits,
    merge_max_sum,
    shard_vocab_rows,
    tp_size_rank,
    vocab_chunks,
)
from sdzero_kernels.teacher_topk import (
    MIN_KEY,
    check_k,
    merge_shard_topk,
    shard_topk_for,
    teacher_topk_reference,
)


def fused_linear_teacher_topk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` log-probabilities and global ids of softmax(hidden @ weight.T / temperature).

    ``hidden`` [T, H] (the final-norm hidden states at the positions wanted), ``weight`` this TP
    rank's output-weight shard [V_local, H] (rows ``rank * V_local`` on), ``vocab_size`` the
    number of real ids (None: every row). Returns (logprobs [T, k] float32, ids [T, k] int64), as
    ``teacher_topk`` does on the logits. No gradient flows.
    """
    check_hidden_and_weight(hidden, weight)
    temperature = check_temperature(temperature)
    vocab_chunk = check_vocab_chunk(vocab_chunk)
    tp_size = tp_size_rank(tp_group)[0]
    check_k(k, min(weight.shape[0] * tp_size, vocab_size or weight.shape[0] * tp_size))
    offset, real_rows = shard_vocab_rows(weight.shape[0], vocab_size, tp_group)
    num_rows, device = hidden.shape[0], hidden.device
    inv_temp = 1.0 / temperature
    with torch.no_grad():
        hidden, weight = hidden.detach(), weight.detach()
        keys = torch.full((num_rows, k), MIN_KEY, dtype=torch.int64, device=device)
        row_max = torch.full((num_rows,), float("-inf"), device=device)
        row_sum = torch.zeros(num_rows, device=device)
        for start, stop in vocab_chunks(real_rows, vocab_chunk):
            logits = chunk_logits(hidden, weight, start, stop)
            chunk_keys, chunk_max, chunk_sum = shard_topk_for(logits)(logits, k, inv_temp, offset + start)
            keys = torch.cat([keys, chunk_keys], dim=1).topk(k, dim=1).values
            row_max, row_sum = merge_max_sum(row_max, row_sum, chunk_max, chunk_sum)
            del logits
        return merge_shard_topk(keys, row_max, row_sum, k, tp_group)


def fused_linear_teacher_topk_reference(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, *, temperature: float = 1.0, vocab_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
):
    """Test oracle: the full logits hidden @ weight.T (real rows only) into ``teacher_topk_reference``."""
    rows = weight if vocab_size is None else weight[:vocab_size]
    return teacher_topk_reference(hidden.to(dtype) @ rows.to(dtype).t(), k, temperature=temperature, dtype=dtype)
