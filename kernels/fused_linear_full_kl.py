"""fused_linear_full_kl: ``full_kl`` from both models' hidden states and output weights, without a
[T, V] logit tensor.

The formulas are ``full_kl``'s. forward: for each vocabulary chunk of this TP rank's shard, the
student's and the teacher's logits of the chunk (one matmul each, in the model's dtype), folded
into each side's running (max, sum of exp, sum of exp x logit difference), in float64: the KL
E_p[z_s - z_t] - (L_s - L_t) is a small difference of terms of size log V, which float32 leaves
with relative errors of 1e-5 at KL ~ 0.03 (``full_kl``, float32, has them); then the log-sum-exps
and expectations combined over TP (MAX then SUM all-reduces). backward: the chunk's logits
recomputed, the gradient of the chunk's logits, then dh += g @ W_chunk and dW_chunk = g.T @ h for
the student; dh is summed over TP. The teacher gets no gradient. At most one [T, chunk] block of
each model's logits is alive.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from sdzero_kernels._common import (
    KL_MODES,
    VOCAB_CHUNK,
    OnlineSoftmax,
    check_choice,
    check_hidden_and_weight,
    check_mixed_weight,
    check_temperature,
    check_vocab_chunk,
    chunk_logits,
    forward_weight,
    fused_linear_grads,
    main_grad_of,
    shard_vocab_rows,
    vocab_chunks,
)
from sdzero_kernels.full_kl import full_kl_reference


class _FusedLinearFullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, w_forward, inv_temp, tp_group, vocab_size,
                vocab_chunk):
        _, real_rows = shard_vocab_rows(weight.shape[0], vocab_size, tp_group)
        # float64 statistics: the KL is a small difference of O(log V) terms
        student, teacher = (OnlineSoftmax(hidden.shape[0], 1, hidden.device, max_dtype=torch.float64) for _ in "st")
        chunks = vocab_chunks(real_rows, vocab_chunk)
        for start, stop in chunks:
            zs = chunk_logits(hidden, weight, start, stop).double() * inv_temp
            zt = chunk_logits(teacher_hidden, teacher_weight, start, stop).double() * inv_temp
            student.add(zs, zs - zt)
            teacher.add(zt, zt - zs)
            del zs, zt
        lse_s, mean_s_diff = student.combine(tp_group)
        lse_t, mean_t_diff = teacher.combine(tp_group)
        reverse = mean_s_diff - (lse_s - lse_t)
        forward = mean_t_diff - (lse_t - lse_s)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, lse_s.float(), lse_t.float(),
                              reverse.float())
        ctx.w_forward, ctx.inv_temp, ctx.tp_group, ctx.chunks = w_forward, inv_temp, tp_group, chunks
        ctx.main_grad = main_grad_of(weight)
        return (w_forward * forward + (1.0 - w_forward) * reverse).float()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, teacher_hidden, teacher_weight, lse_s, lse_t, reverse = ctx.saved_tensors
        scale = (grad_loss.float() * ctx.inv_temp)[:, None]
        w_forward = ctx.w_forward

        def chunk_grad(start, stop):
            zs = chunk_logits(hidden, weight, start, stop).float() * ctx.inv_temp
            zt = chunk_logits(teacher_hidden, teacher_weight, start, stop).float() * ctx.inv_temp
            p = torch.exp(zs - lse_s[:, None])
            q = torch.exp(zt - lse_t[:, None])
            rev_grad = torch.where(p > 0, p * ((zs - zt) - (lse_s - lse_t)[:, None] - reverse[:, None]), 0.0)
            del zs, zt
            return scale * (w_forward * (p - q) + (1.0 - w_forward) * rev_grad)

        grad_hidden, grad_weight = fused_linear_grads(hidden, weight, ctx.chunks, chunk_grad, ctx.tp_group,
                                                      main_grad=ctx.main_grad,
                                                      weight_grad_needed=ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def fused_linear_full_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    vocab_chunk: int = VOCAB_CHUNK,
) -> torch.Tensor:
    """Per-token ``full_kl(hidden @ weight.T, teacher_hidden @ teacher_weight.T, ...)`` without the logits.

    ``hidden``/``teacher_hidden`` [T, H]; ``weight``/``teacher_weight`` each model's output-weight
    shard [V_local, H] on this TP rank (one layout); ``vocab_size`` the number of real ids (None:
    every row). Returns the loss [T] float32, the same on every TP rank, differentiable w.r.t. the
    student's ``hidden`` (gradient summed over TP) and ``weight``.
    """
    check_hidden_and_weight(hidden, weight)
    check_hidden_and_weight(teacher_hidden, teacher_weight, "teacher_hidden", "teacher_weight")
    if teacher_hidden.shape[0] != hidden.shape[0] or teacher_weight.shape != weight.shape:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and teacher_weight {tuple(teacher_weight.shape)} must "
            f"match hidden {tuple(hidden.shape)} rows and weight {tuple(weight.shape)}"
        )
    check_choice("kl", kl, KL_MODES)
    mixed_weight = check_mixed_weight(mixed_weight)
    temperature = check_temperature(temperature)
    vocab_chunk = check_vocab_chunk(vocab_chunk)
    return _FusedLinearFullKL.apply(
        hidden, weight, teacher_hidden.detach(), teacher_weight.detach(), forward_weight(kl, mixed_weight),
        1.0 / temperature, tp_group, vocab_size, vocab_chunk,
    )


def fused_linear_full_kl_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Test oracle: both models' full logits (real rows only) into ``full_kl_reference``."""
    rows = slice(None) if vocab_size is None else slice(0, vocab_size)
    return full_kl_reference(hidden.to(dtype) @ weight[rows].to(dtype).t(),
                             teacher_hidden.to(dtype) @ teacher_weight[rows].to(dtype).t(),
                             kl=kl, mixed_weight=mixed_weight, temperature=temperature, dtype=dtype)
