"""fused_linear_topk_kl: ``topk_kl`` from the student's hidden states and output weight, without a
[T, V] logit tensor.

* ``tail="renorm"`` needs the K logits at the teacher's ids only: ``sparse_topk_kl``.
* ``tail="bucket"`` needs the student's full softmax (the tail class): a chunked fused-linear pass.

  forward: for each vocabulary chunk of this TP rank's shard, the chunk's logits [T, chunk] (one
  matmul in the model's dtype), folded into a running (max, sum of exp: float64) and read at the
  teacher's ids that fall in the chunk; then the log-sum-exp combined over TP, the K logits summed over TP
  (each id lives on one rank), and ``topk_kl``'s per-row math over the K lanes (``_topk_rows``:
  the loss, dLoss/dz on the K ids and the tail coefficient c with dLoss/dz_v = c p_v outside them).
  backward: the chunk's logits recomputed, its gradient c p_v (the K ids' own values written over
  it), then dh += g @ W_chunk and dW_chunk = g.T @ h (``_common.fused_linear_grads``; into
  megatron DDP's ``main_grad`` when the weight has one). dh is summed over the TP group, as the
  output layer's input gradient is.

  Saved for the backward: h, the weight (the parameter itself), the log-sum-exp, dLoss/dz [T, K]
  and c [T]. At most one [T, chunk] block of logits (and its gradient) is alive.

Rows of the weight from ``vocab_size`` on (megatron's vocabulary padding) are skipped: the dense
path gives them the lowest logit, zero probability and zero gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from sdzero_kernels._common import (
    TAIL_MODES,
    VOCAB_CHUNK,
    all_reduce_sum,
    check_choice,
    check_fused_topk_loss_args,
    check_vocab_chunk,
    chunk_logits,
    combine_lse,
    fused_linear_grads,
    local_teacher_ids,
    main_grad_of,
    merge_max_sum,
    row_max_sum,
    shard_vocab_rows,
    vocab_chunks,
)
from sdzero_kernels.sparse_topk_kl import sparse_topk_kl
from sdzero_kernels.topk_kl import _topk_rows, topk_kl_reference


class _FusedLinearBucketKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_logprobs, teacher_ids, w_forward, inv_temp, tp_group, vocab_size,
                vocab_chunk):
        rows, owned = local_teacher_ids(teacher_ids, weight.shape[0], tp_group)
        _, real_rows = shard_vocab_rows(weight.shape[0], vocab_size, tp_group)
        num_rows, device = hidden.shape[0], hidden.device
        z = torch.zeros(rows.shape, device=device)
        row_max = torch.full((num_rows,), float("-inf"), device=device)
        row_sum = torch.zeros(num_rows, dtype=torch.float64, device=device)
        chunks = vocab_chunks(real_rows, vocab_chunk)
        for start, stop in chunks:
            x = chunk_logits(hidden, weight, start, stop).float() * inv_temp
            in_chunk = owned & (rows >= start) & (rows < stop)
            z = torch.where(in_chunk, x.gather(1, (rows - start).clamp(0, stop - start - 1)), z)
            row_max, row_sum = merge_max_sum(row_max, row_sum, *row_max_sum(x))
            del x
        z = all_reduce_sum(z, tp_group)
        (lse,) = combine_lse(row_max, row_sum, tp_group)
        loss, grad_z, tail_coef = _topk_rows(z, teacher_logprobs.float().contiguous(), lse, True, w_forward)
        ctx.save_for_backward(hidden, weight, rows, owned, grad_z, tail_coef, lse.float())
        ctx.inv_temp, ctx.tp_group, ctx.chunks = inv_temp, tp_group, chunks
        ctx.main_grad = main_grad_of(weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, rows, owned, grad_z, tail_coef, lse = ctx.saved_tensors
        scale = grad_loss.float() * ctx.inv_temp  # d(student logit) = d(z) / temperature
        coef, values = (scale * tail_coef)[:, None], grad_z * scale[:, None]

        def chunk_grad(start, stop):
            x = chunk_logits(hidden, weight, start, stop).float() * ctx.inv_temp
            grad = coef * torch.exp(x - lse[:, None])  # c p_v, right outside the teacher's ids
            # the teacher's ids in this chunk take their own gradient instead: clear their columns
            # (counted by scatter_add: ids outside the chunk, clamped onto a column, add 0), then add it
            in_chunk = owned & (rows >= start) & (rows < stop)
            columns = (rows - start).clamp(0, stop - start - 1)
            hits = x.zero_().scatter_add_(1, columns, in_chunk.float())
            grad.masked_fill_(hits > 0, 0.0).scatter_add_(1, columns, torch.where(in_chunk, values, 0.0))
            del x, hits
            return grad.to(weight.dtype)

        grad_hidden, grad_weight = fused_linear_grads(hidden, weight, ctx.chunks, chunk_grad, ctx.tp_group,
                                                      main_grad=ctx.main_grad,
                                                      weight_grad_needed=ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_linear_topk_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """Per-token ``topk_kl(hidden @ weight.T, teacher_logprobs, teacher_ids, ...)`` without the logits.

    ``hidden`` [T, H]; ``weight`` this TP rank's output-weight shard [V_local, H]; ``vocab_size``
    the number of real ids (None: every row); the teacher's top-K [T, K] with global ids. Returns
    the loss [T] float32, the same on every TP rank, differentiable w.r.t. ``hidden`` (gradient
    summed over TP) and ``weight``.
    """
    check_choice("tail", tail, TAIL_MODES)
    if tail == "renorm":
        return sparse_topk_kl(hidden, weight, teacher_logprobs, teacher_ids, kl=kl, mixed_weight=mixed_weight,
                              temperature=temperature, tp_group=tp_group)
    w_forward, inv_temp = check_fused_topk_loss_args(hidden, weight, teacher_logprobs, teacher_ids, kl, mixed_weight,
                                                     temperature, tp_group)
    vocab_chunk = check_vocab_chunk(vocab_chunk)
    return _FusedLinearBucketKL.apply(
        hidden, weight, teacher_logprobs.detach(), teacher_ids.detach().long(), w_forward, inv_temp, tp_group,
        vocab_size, vocab_chunk,
    )


def fused_linear_topk_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Test oracle: the full logits hidden @ weight.T (real rows only) into ``topk_kl_reference``."""
    rows = weight if vocab_size is None else weight[:vocab_size]
    return topk_kl_reference(hidden.to(dtype) @ rows.to(dtype).t(), teacher_logprobs, teacher_ids, kl=kl,
                             mixed_weight=mixed_weight, tail=tail, temperature=temperature, dtype=dtype)
