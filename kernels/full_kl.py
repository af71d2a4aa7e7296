"""full_kl: per-token KL between student and teacher over the full vocabulary, exact gradient.

For small vocabularies, and as an exactness reference for the top-K path. With z_s, z_t the
logits divided by the temperature, L_s, L_t their log-sum-exps, p and q the softmaxes:

    reverse = KL(p || q) = E_p[z_s - z_t] - (L_s - L_t)
    forward = KL(q || p) = E_q[z_t - z_s] - (L_t - L_s)
    d reverse / d z_s = p * ((z_s - z_t) - (L_s - L_t) - reverse),   d forward / d z_s = p - q

The forward pass streams both rows once, keeping an online max and sum for each softmax and the
two expectations rescaled alongside (under TP: MAX then SUM all-reduces). The backward streams
them once more and writes the gradient, already scaled by the incoming per-token gradient, in the
student's dtype. The teacher gets no gradient.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from sdzero_kernels._common import (
    KL_MODES,
    check_choice,
    check_logits,
    check_mixed_weight,
    check_same_device,
    check_temperature,
    combine_lse,
    forward_weight,
    rows_view,
    use_triton,
)

CHUNK_ELEMENTS = 1 << 23  # PyTorch path: rows per chunk = CHUNK_ELEMENTS // V (two inputs)


def _block_v() -> int:
    return 128 if os.environ.get("TRITON_INTERPRET") == "1" else 2048


@triton.jit
def _online_update(row_max, row_sum, row_weighted, x, f):
    """Fold a block into (max, sum exp(x - max), sum exp(x - max) * f); x is -inf where masked."""
    new_max = tl.maximum(row_max, tl.max(x, axis=0))
    shift = tl.where(new_max == -float("inf"), 0.0, new_max)  # never forms inf - inf
    rescale = tl.exp(row_max - shift)
    e = tl.exp(x - shift)
    row_sum = row_sum * rescale + tl.sum(e, axis=0)
    row_weighted = row_weighted * rescale + tl.sum(tl.where(e > 0, e * f, 0.0), axis=0)
    return new_max, row_sum, row_weighted


@triton.jit
def _full_kl_stats_kernel(
    s_ptr, s_stride, t_ptr, t_stride, vocab, inv_temp, stats_ptr, num_rows, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0)
    s_row = s_ptr + row.to(tl.int64) * s_stride
    t_row = t_ptr + row.to(tl.int64) * t_stride
    s_max, s_sum, s_weighted = -float("inf"), 0.0, 0.0
    t_max, t_sum, t_weighted = -float("inf"), 0.0, 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        zs = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        zt = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        diff = zs - zt
        s_max, s_sum, s_weighted = _online_update(s_max, s_sum, s_weighted, tl.where(valid, zs, -float("inf")), diff)
        t_max, t_sum, t_weighted = _online_update(t_max, t_sum, t_weighted, tl.where(valid, zt, -float("inf")), -diff)
    # stats is [6, num_rows]: the layout combine_lse takes without copies.
    tl.store(stats_ptr + row, s_max)
    tl.store(stats_ptr + num_rows + row, s_sum)
    tl.store(stats_ptr + 2 * num_rows + row, s_weighted)
    tl.store(stats_ptr + 3 * num_rows + row, t_max)
    tl.store(stats_ptr + 4 * num_rows + row, t_sum)
    tl.store(stats_ptr + 5 * num_rows + row, t_weighted)


@triton.jit
def _full_kl_grad_kernel(
    s_ptr, s_stride, t_ptr, t_stride, vocab, inv_temp, lse_s_ptr, lse_t_ptr, reverse_ptr, scale_ptr,
    w_forward, out_ptr, out_stride, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    reverse = tl.load(reverse_ptr + row)
    scale = tl.load(scale_ptr + row)
    s_row = s_ptr + row.to(tl.int64) * s_stride
    t_row = t_ptr + row.to(tl.int64) * t_stride
    out_row = out_ptr + row.to(tl.int64) * out_stride
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < vocab
        # Masked lanes load 0: computed, never stored, and free of inf - inf.
        zs = tl.load(s_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        zt = tl.load(t_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(zs - lse_s)
        q = tl.exp(zt - lse_t)
        rev_grad = tl.where(p > 0, p * ((zs - zt) - (lse_s - lse_t) - reverse), 0.0)
        grad = scale * (w_forward * (p - q) + (1.0 - w_forward) * rev_grad)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=valid)


def _stats(student: torch.Tensor, teacher: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """[6, T]: student max, sum, weighted sum; teacher max, sum, weighted sum (this shard)."""
    num_rows, vocab = student.shape
    if use_triton(student):
        stats = torch.empty(6, num_rows, dtype=torch.float32, device=student.device)
        if num_rows:
            _full_kl_stats_kernel[(num_rows,)](
                student, student.stride(0), teacher, teacher.stride(0), vocab, inv_temp, stats, num_rows,
                BLOCK_V=_block_v(),
            )
        return stats
    chunks = []
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, num_rows, step):
        zs = student[start : start + step].float() * inv_temp
        zt = teacher[start : start + step].float() * inv_temp
        row = []
        for x, f in ((zs, zs - zt), (zt, zt - zs)):
            x_max = x.max(dim=1).values
            e = torch.exp(x - torch.where(torch.isneginf(x_max), 0.0, x_max)[:, None])
            row += [x_max, e.sum(dim=1), torch.where(e > 0, e * f, 0.0).sum(dim=1)]
        chunks.append(torch.stack(row))
    return torch.cat(chunks, dim=1) if chunks else torch.empty(6, 0, device=student.device)


def _grad(student, teacher, inv_temp, lse_s, lse_t, reverse, scale, w_forward) -> torch.Tensor:
    out = torch.empty_like(student)
    num_rows, vocab = student.shape
    if use_triton(student):
        if num_rows:
            _full_kl_grad_kernel[(num_rows,)](
                student, student.stride(0), teacher, teacher.stride(0), vocab, inv_temp, lse_s, lse_t, reverse,
                scale, w_forward, out, out.stride(0), BLOCK_V=_block_v(),
            )
        return out
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, num_rows, step):
        rows = slice(start, start + step)
        zs = student[rows].float() * inv_temp
        zt = teacher[rows].float() * inv_temp
        p = torch.exp(zs - lse_s[rows, None])
        q = torch.exp(zt - lse_t[rows, None])
        rev_grad = torch.where(p > 0, p * ((zs - zt) - (lse_s - lse_t)[rows, None] - reverse[rows, None]), 0.0)
        out[rows] = (scale[rows, None] * (w_forward * (p - q) + (1.0 - w_forward) * rev_grad)).to(out.dtype)
    return out


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, w_forward, inv_temp, tp_group):
        s_max, s_sum, s_weighted, t_max, t_sum, t_weighted = _stats(student, teacher, inv_temp)
        lse_s, mean_s_diff = combine_lse(s_max, s_sum, tp_group, s_weighted)
        lse_t, mean_t_diff = combine_lse(t_max, t_sum, tp_group, t_weighted)
        reverse = mean_s_diff - (lse_s - lse_t)
        forward = mean_t_diff - (lse_t - lse_s)
        ctx.save_for_backward(student, teacher, lse_s, lse_t, reverse)
        ctx.w_forward, ctx.inv_temp = w_forward, inv_temp
        return w_forward * forward + (1.0 - w_forward) * reverse

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher, lse_s, lse_t, reverse = ctx.saved_tensors
        scale = (grad_loss.float() * ctx.inv_temp).contiguous()
        grad = _grad(student, teacher, ctx.inv_temp, lse_s, lse_t, reverse, scale, ctx.w_forward)
        return grad, None, None, None, None


def full_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token full-vocabulary KL (see the module doc); both inputs are [..., V_local] shards."""
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_choice("kl", kl, KL_MODES)
    mixed_weight = check_mixed_weight(mixed_weight)
    temperature = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}; "
            f"got {tuple(teacher_logits.shape)}"
        )
    if student_logits.dtype != teacher_logits.dtype:
        raise ValueError(
            f"teacher_logits must have the dtype of student_logits ({student_logits.dtype}); got {teacher_logits.dtype}"
        )
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    loss = _FullKL.apply(
        rows_view(student_logits),
        rows_view(teacher_logits.detach()),
        forward_weight(kl, mixed_weight),
        1.0 / temperature,
        tp_group,
    )
    return loss.reshape(student_logits.shape[:-1])


def full_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Test oracle: log-softmaxes in ``dtype`` and the KL sums written out; autograd gradients."""
    w = forward_weight(kl, mixed_weight)
    log_p = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    reverse = (log_p.exp() * (log_p - log_q)).sum(-1)
    forward = (log_q.exp() * (log_q - log_p)).sum(-1)
    return w * forward + (1.0 - w) * reverse
