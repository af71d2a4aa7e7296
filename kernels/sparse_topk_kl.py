"""sparse_topk_kl: ``topk_kl`` with ``tail="renorm"`` from the student's hidden states and output
weight, computing only the K logits the loss reads.

In renorm mode the loss of a token depends on the student's logits at the teacher's K ids alone:
z_k = h . W[id_k] / temperature. So instead of [T, V] logits:

* forward: for each row, gather the K rows of the weight shard that this TP rank owns and take
  their dot products with h (ids another rank owns contribute 0); one SUM all-reduce of [T, K]
  makes z complete on every rank. The per-row math over the K lanes is ``topk_kl``'s own
  (``_topk_rows``: float64, the loss and dLoss/dz).
* backward: g = dLoss/dz x grad_out / temperature on the owned ids; dh = sum_k g_k W[id_k], summed
  over the TP group (as the output layer's input gradient is); dW[id_k] += g_k h, an ``index_add_``
  into a float32 buffer of the shard's shape, cast to the weight's dtype at the end; or, when the
  weight has megatron-core DDP's ``main_grad`` (``_common.main_grad_of``), straight into it, and
  no [V_local, H] gradient is allocated (gradient-accumulation fusion).

FLOPs: 2 x T x K x H forward and 4 x T x K x H backward, against 2 x T x V x H and 4 x T x V x H
for the dense head. The gathered rows [rows, K, H] exist for one chunk of rows at a time
(``ROW_ELEMENTS`` elements), never for all T.

Determinism: on CPU ``index_add_`` is deterministic; on CUDA it accumulates with atomic adds, so
the weight gradient's last bits can vary between runs unless ``torch.use_deterministic_algorithms``
is on (then PyTorch uses its deterministic index_add_).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from sdzero_kernels._common import (
    all_reduce_sum,
    check_fused_topk_loss_args,
    local_teacher_ids,
    main_grad_of,
)
from sdzero_kernels.topk_kl import _topk_rows, topk_kl_reference

# Elements of the gathered weight rows [rows, K, H] alive at once on the PyTorch path.
ROW_ELEMENTS = 1 << 21


def _row_chunks(num_rows: int, k: int, hidden_size: int):
    step = max(1, ROW_ELEMENTS // (k * hidden_size))
    return [slice(start, min(num_rows, start + step)) for start in range(0, num_rows, step)]


def gathered_dots(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[T, K]: hidden[t] . weight[rows[t, k]] in the model's dtype, one chunk of T at a time."""
    out = torch.empty(rows.shape, dtype=hidden.dtype, device=hidden.device)
    for chunk in _row_chunks(*rows.shape, hidden.shape[1]):
        out[chunk] = torch.bmm(weight[rows[chunk]], hidden[chunk, :, None])[:, :, 0]
    return out


class _SparseTopKKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_logprobs, teacher_ids, w_forward, inv_temp, tp_group):
        rows, owned = local_teacher_ids(teacher_ids, weight.shape[0], tp_group)
        z = gathered_dots(hidden, weight, rows).float() * inv_temp
        z = all_reduce_sum(torch.where(owned, z, 0.0), tp_group)
        loss, grad_z, _ = _topk_rows(z, teacher_logprobs.float().contiguous(), None, False, w_forward)
        ctx.save_for_backward(hidden, weight, rows, owned, grad_z)
        ctx.inv_temp, ctx.tp_group = inv_temp, tp_group
        ctx.main_grad = main_grad_of(weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, rows, owned, grad_z = ctx.saved_tensors
        g = torch.where(owned, grad_z * (grad_loss.float() * ctx.inv_temp)[:, None], 0.0)
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        # the weight gradient: straight into megatron DDP's main_grad when the weight has one
        # (gradient-accumulation fusion, _common.main_grad_of), else into a float32 buffer
        main_grad = ctx.main_grad if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[1] and main_grad is None:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        accumulator = main_grad if main_grad is not None else grad_weight
        for chunk in _row_chunks(*rows.shape, hidden.shape[1]):
            gathered = weight[rows[chunk]].float()  # [rows, K, H]
            grad_hidden[chunk] = torch.bmm(g[chunk, None, :], gathered)[:, 0]
            del gathered
            if accumulator is not None:
                outer = g[chunk, :, None] * hidden[chunk, None, :].float()  # [rows, K, H]
                # ids another rank owns carry g = 0: adding them to their clamped row changes nothing
                accumulator.index_add_(0, rows[chunk].reshape(-1),
                                       outer.reshape(-1, hidden.shape[1]).to(accumulator.dtype))
                del outer
        all_reduce_sum(grad_hidden, ctx.tp_group)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None


def sparse_topk_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token renormalised top-K KL (``topk_kl(hidden @ weight.T, ..., tail="renorm")``) from
    ``hidden`` [T, H] and this TP rank's output-weight shard ``weight`` [V_local, H].

    ``teacher_logprobs``/``teacher_ids`` [T, K] as ``teacher_topk`` returns them (global ids).
    Returns the loss [T] float32, the same on every TP rank; differentiable w.r.t. ``hidden`` (its
    gradient summed over the TP group) and ``weight`` (this shard's rows).
    """
    w_forward, inv_temp = check_fused_topk_loss_args(hidden, weight, teacher_logprobs, teacher_ids, kl, mixed_weight,
                                                     temperature, tp_group)
    return _SparseTopKKL.apply(
        hidden, weight, teacher_logprobs.detach(), teacher_ids.detach().long(), w_forward, inv_temp, tp_group
    )


def sparse_topk_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Test oracle: the full logits hidden @ weight.T into ``topk_kl_reference`` (renorm), autograd."""
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    return topk_kl_reference(logits, teacher_logprobs, teacher_ids, kl=kl, mixed_weight=mixed_weight, tail="renorm",
                             temperature=temperature, dtype=dtype)
