"""topk_kl: per-token KL between the student and the teacher's top-K distribution, exact gradient.

Definitions (z = student_logits / temperature, S = the teacher's K ids of the token, lt = the
teacher's log-probabilities on S, normalised over the full vocabulary):

* tail="renorm": student and teacher both renormalised over S (the paper's "zero outside top-K:
  False"). Only the K gathered logits enter, so the gradient is zero outside S.
* tail="bucket": the student's full-vocabulary softmax, plus one class holding the mass outside S
  for each distribution: a proper divergence over K + 1 classes with a dense gradient. Tail masses
  are floored at ``TAIL_MASS_FLOOR`` inside logarithms: float32 top-K sums cannot resolve less.
* kl="reverse" is KL(student || teacher) (paper Eq. 4), "forward" KL(teacher || student), "mixed"
  mixed_weight * forward + (1 - mixed_weight) * reverse.

How the work is split, and why:

* forward: gather the K student logits (all-reduced over TP); for "bucket" one streaming pass over
  the student row for its log-sum-exp. A per-row kernel over the K lanes then gives the loss and
  dLoss/dz on the K ids, and for "bucket" one coefficient c such that dLoss/dz_v = c * p_v for
  every id outside S.
* backward: "renorm" zero-fills the gradient and scatters the K values, scaled by the incoming
  per-token gradient: the dense gradient is written once. "bucket" streams the student row once
  more, writing c * p_v * grad_out directly in the student's dtype, then the K values. The K-sized
  gradient is what the forward keeps; a dense buffer computed in the forward would cost a second
  read and write of [T, V] in the backward to apply the per-token scaling, so the dense part is
  written once, in the backward, already scaled.

No float32 [T, V] temporary exists on the Triton path; the PyTorch path (CPU) works on row chunks.
Under TP each rank's gradient covers its vocab shard; the loss is the same on every rank.
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
    TAIL_MODES,
    check_choice,
    check_logits,
    check_mixed_weight,
    check_teacher_topk_inputs,
    check_temperature,
    combine_lse,
    forward_weight,
    gather_student_logits,
    next_power_of_2,
    rows_view,
    use_triton,
)

TAIL_MASS_FLOOR = 1e-6
_TAIL_MASS_FLOOR = tl.constexpr(TAIL_MASS_FLOOR)
CHUNK_ELEMENTS = 1 << 24  # PyTorch path: rows per chunk = CHUNK_ELEMENTS // V


def _block_v() -> int:
    # Small blocks under the interpreter so that tests cross many block boundaries.
    return 128 if os.environ.get("TRITON_INTERPRET") == "1" else 4096


# ------------------------------------------------------------------------------------------
# Per-row math over the K lanes: loss, dLoss/dz on the K ids, and the tail coefficient


@triton.jit
def _topk_rows_kernel(
    z_ptr,
    lt_ptr,
    lse_ptr,
    loss_ptr,
    grad_ptr,
    tail_coef_ptr,
    w_forward,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BUCKET: tl.constexpr,
):
    row = tl.program_id(0)
    lanes = tl.arange(0, K_PAD)
    valid = lanes < K
    offsets = row.to(tl.int64) * K + lanes
    # float64 for these K lanes: the tail masses 1 - sum(p) cancel, and float32 would leave
    # log(tail) with relative errors of 1e-4 when the top-K holds most of the mass.
    z = tl.load(z_ptr + offsets, mask=valid, other=-float("inf")).to(tl.float64)
    lt = tl.load(lt_ptr + offsets, mask=valid, other=-float("inf")).to(tl.float64)
    if BUCKET:
        log_p = z - tl.load(lse_ptr + row).to(tl.float64)
        log_q = lt
    else:
        z_max = tl.max(z, axis=0)
        log_p = z - z_max - tl.log(tl.sum(tl.exp(z - z_max), axis=0))
        lt_max = tl.max(lt, axis=0)
        log_q = lt - lt_max - tl.log(tl.sum(tl.exp(lt - lt_max), axis=0))
    p = tl.where(valid, tl.exp(log_p), 0.0)
    q = tl.where(valid, tl.exp(log_q), 0.0)
    diff = tl.where(valid, log_p, 0.0) - tl.where(valid, log_q, 0.0)
    reverse = tl.sum(tl.where(p > 0, p * diff, 0.0), axis=0)
    forward = -tl.sum(tl.where(q > 0, q * diff, 0.0), axis=0)
    if BUCKET:
        p_tail = tl.maximum(1.0 - tl.sum(p, axis=0), 0.0)
        q_tail = tl.maximum(1.0 - tl.sum(q, axis=0), 0.0)
        log_p_tail = tl.log(tl.maximum(p_tail, _TAIL_MASS_FLOOR))
        log_q_tail = tl.log(tl.maximum(q_tail, _TAIL_MASS_FLOOR))
        reverse += p_tail * (log_p_tail - log_q_tail)
        forward += q_tail * (log_q_tail - log_p_tail)
        above = p_tail > _TAIL_MASS_FLOOR
        # dLoss/dP_c for each class c, weighted by P_c for the K classes (h) and bare for the tail.
        h = (1.0 - w_forward) * tl.where(p > 0, p * (diff + 1.0), 0.0) - w_forward * q
        g_tail = (1.0 - w_forward) * (log_p_tail - log_q_tail + tl.where(above, 1.0, 0.0))
        g_tail -= w_forward * tl.where(above, q_tail / tl.maximum(p_tail, _TAIL_MASS_FLOOR), 0.0)
        g_mean = tl.sum(h, axis=0) + p_tail * g_tail
        grad = h - p * g_mean
        tl.store(tail_coef_ptr + row, (g_tail - g_mean).to(tl.float32))
    else:
        grad = w_forward * (p - q) + (1.0 - w_forward) * p * (diff - reverse)
    tl.store(loss_ptr + row, (w_forward * forward + (1.0 - w_forward) * reverse).to(tl.float32))
    tl.store(grad_ptr + offsets, grad.to(tl.float32), mask=valid)


def _topk_rows_torch(z, lt, lse, bucket: bool, w_forward: float):
    """The same math as _topk_rows_kernel, vectorised over rows (CPU path), also in float64."""
    z, lt = z.double(), lt.double()
    if bucket:
        log_p, log_q = z - lse[:, None], lt
    else:
        log_p, log_q = torch.log_softmax(z, dim=1), torch.log_softmax(lt, dim=1)
    p, q = log_p.exp(), log_q.exp()
    diff = log_p - log_q
    reverse = torch.where(p > 0, p * diff, 0.0).sum(dim=1)
    forward = -torch.where(q > 0, q * diff, 0.0).sum(dim=1)
    tail_coef = None
    if bucket:
        p_tail = (1.0 - p.sum(dim=1)).clamp_min(0.0)
        q_tail = (1.0 - q.sum(dim=1)).clamp_min(0.0)
        log_p_tail = p_tail.clamp_min(TAIL_MASS_FLOOR).log()
        log_q_tail = q_tail.clamp_min(TAIL_MASS_FLOOR).log()
        reverse = reverse + p_tail * (log_p_tail - log_q_tail)
        forward = forward + q_tail * (log_q_tail - log_p_tail)
        above = (p_tail > TAIL_MASS_FLOOR).float()
        h = (1.0 - w_forward) * torch.where(p > 0, p * (diff + 1.0), 0.0) - w_forward * q
        g_tail = (1.0 - w_forward) * (log_p_tail - log_q_tail + above)
        g_tail = g_tail - w_forward * above * q_tail / p_tail.clamp_min(TAIL_MASS_FLOOR)
        g_mean = h.sum(dim=1) + p_tail * g_tail
        grad = h - p * g_mean[:, None]
        tail_coef = (g_tail - g_mean).float()
    else:
        grad = w_forward * (p - q) + (1.0 - w_forward) * p * (diff - reverse[:, None])
    return (w_forward * forward + (1.0 - w_forward) * reverse).float(), grad.float(), tail_coef


def _topk_rows(z, lt, lse, bucket: bool, w_forward: float):
    if not use_triton(z):
        return _topk_rows_torch(z, lt, lse, bucket, w_forward)
    num_rows, k = z.shape
    loss = torch.empty(num_rows, dtype=torch.float32, device=z.device)
    grad = torch.empty_like(z)
    tail_coef = torch.empty_like(loss) if bucket else None
    if num_rows:
        _topk_rows_kernel[(num_rows,)](
            z, lt, lse if bucket else loss, loss, grad, tail_coef if bucket else loss, w_forward,
            K=k, K_PAD=next_power_of_2(k), BUCKET=bucket,
        )
    return loss, grad, tail_coef


# ------------------------------------------------------------------------------------------
# Streaming passes over the student row (tail="bucket")


@triton.jit
def _row_max_sum_kernel(x_ptr, row_stride, vocab, inv_temp, max_ptr, sum_ptr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = x_ptr + row.to(tl.int64) * row_stride
    row_max = -float("inf")
    row_sum = 0.0
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=-float("inf")).to(tl.float32) * inv_temp
        new_max = tl.maximum(row_max, tl.max(x, axis=0))
        # A row that is all -inf so far keeps sum 0; this shift never forms inf - inf.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        rescale = tl.exp(row_max - shift)
        row_sum = row_sum * rescale + tl.sum(tl.exp(x - shift), axis=0)
        row_max = new_max
    tl.store(max_ptr + row, row_max)
    tl.store(sum_ptr + row, row_sum)


@triton.jit
def _softmax_scale_kernel(
    x_ptr, row_stride, vocab, inv_temp, lse_ptr, coef_ptr, out_ptr, out_stride, BLOCK_V: tl.constexpr
):
    """out[v] = coef * softmax(x / T)[v], written in out's dtype."""
    row = tl.program_id(0)
    lse = tl.load(lse_ptr + row)
    coef = tl.load(coef_ptr + row)
    x_row = x_ptr + row.to(tl.int64) * row_stride
    out_row = out_ptr + row.to(tl.int64) * out_stride
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + cols, mask=cols < vocab, other=0.0).to(tl.float32) * inv_temp
        out = coef * tl.exp(x - lse)
        tl.store(out_row + cols, out.to(out_ptr.dtype.element_ty), mask=cols < vocab)


def _row_max_sum(rows: torch.Tensor, inv_temp: float):
    num_rows, vocab = rows.shape
    if use_triton(rows):
        row_max = torch.empty(num_rows, dtype=torch.float32, device=rows.device)
        row_sum = torch.empty_like(row_max)
        if num_rows:
            _row_max_sum_kernel[(num_rows,)](rows, rows.stride(0), vocab, inv_temp, row_max, row_sum, BLOCK_V=_block_v())
        return row_max, row_sum
    maxes, sums = [], []
    for chunk in rows.split(max(1, CHUNK_ELEMENTS // vocab)):
        x = chunk.float() * inv_temp
        chunk_max = x.max(dim=1).values
        maxes.append(chunk_max)
        sums.append(torch.exp(x - torch.where(torch.isneginf(chunk_max), 0.0, chunk_max)[:, None]).sum(dim=1))
    if not num_rows:
        return torch.empty(0, device=rows.device), torch.empty(0, device=rows.device)
    return torch.cat(maxes), torch.cat(sums)


def _softmax_scaled(rows: torch.Tensor, inv_temp: float, lse: torch.Tensor, coef: torch.Tensor,
                    out: torch.Tensor) -> torch.Tensor:
    """coef[:, None] * softmax(rows / T) into ``out`` (rows' shape and dtype, unit stride along V):
    one read of rows, one write of the result."""
    num_rows, vocab = rows.shape
    if use_triton(rows):
        if num_rows:
            _softmax_scale_kernel[(num_rows,)](
                rows, rows.stride(0), vocab, inv_temp, lse, coef, out, out.stride(0), BLOCK_V=_block_v()
            )
        return out
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, num_rows, step):
        stop = start + step
        x = rows[start:stop].float() * inv_temp
        out[start:stop] = (coef[start:stop, None] * torch.exp(x - lse[start:stop, None])).to(out.dtype)
    return out


# ------------------------------------------------------------------------------------------
# autograd


class _TopKKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher_logprobs, teacher_ids, w_forward, bucket, inv_temp, tp_group):
        z, local_ids, owned = gather_student_logits(student, teacher_ids, tp_group, inv_temp)
        lse = None
        if bucket:
            (lse,) = combine_lse(*_row_max_sum(student, inv_temp), tp_group)
        loss, grad_z, tail_coef = _topk_rows(z, teacher_logprobs.float().contiguous(), lse, bucket, w_forward)
        ctx.bucket, ctx.inv_temp, ctx.student_shape, ctx.student_dtype = bucket, inv_temp, student.shape, student.dtype
        if bucket:
            ctx.save_for_backward(grad_z, local_ids, owned, student, lse, tail_coef)
        else:
            ctx.save_for_backward(grad_z, local_ids, owned)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scale = grad_loss.float() * ctx.inv_temp  # d(student logit) = d(z) / temperature
        num_rows, vocab = ctx.student_shape
        # one row more than the gradient: the teacher ids another TP rank owns are written there and
        # dropped, so that the scatter keeps a fixed shape (selecting the owned ids with a boolean
        # mask would make it data-dependent, a host sync per call on a GPU)
        with_spill_row = (num_rows + 1, vocab)
        if ctx.bucket:
            grad_z, local_ids, owned, student, lse, tail_coef = ctx.saved_tensors
            grad = torch.empty(with_spill_row, dtype=ctx.student_dtype, device=grad_z.device)
            _softmax_scaled(student, ctx.inv_temp, lse, scale * tail_coef, out=grad[:num_rows])
        else:
            grad_z, local_ids, owned = ctx.saved_tensors
            grad = torch.zeros(with_spill_row, dtype=ctx.student_dtype, device=grad_z.device)
        rows = torch.arange(num_rows, device=grad.device)[:, None].expand_as(local_ids)
        rows = torch.where(owned, rows, num_rows)
        values = (grad_z * scale[:, None]).to(grad.dtype)
        grad.index_put_((rows, local_ids), values)  # owned ids are unique per row; only the spill row repeats
        return grad[:num_rows], None, None, None, None, None, None


def topk_kl(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
) -> torch.Tensor:
    """Per-token KL between the student and the teacher's top-K distribution (see the module doc).

    ``student_logits`` [..., V_local] (bf16/fp16/fp32, this rank's vocab shard under TP);
    ``teacher_logprobs``/``teacher_ids`` [..., K] as returned by ``teacher_topk``. Returns the
    per-token loss [...] in float32, differentiable w.r.t. ``student_logits`` only.
    """
    check_logits("student_logits", student_logits)
    check_choice("kl", kl, KL_MODES)
    check_choice("tail", tail, TAIL_MODES)
    mixed_weight = check_mixed_weight(mixed_weight)
    temperature = check_temperature(temperature)
    check_teacher_topk_inputs(student_logits, teacher_logprobs, teacher_ids, tp_group)
    lead = student_logits.shape[:-1]
    k = teacher_ids.shape[-1]
    loss = _TopKKL.apply(
        rows_view(student_logits),
        teacher_logprobs.detach().reshape(-1, k),
        teacher_ids.detach().reshape(-1, k).long(),
        forward_weight(kl, mixed_weight),
        tail == "bucket",
        1.0 / temperature,
        tp_group,
    )
    return loss.reshape(lead)


def topk_kl_reference(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_ids: torch.Tensor,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Test oracle: the definitions written directly in ``dtype``, full vocabulary, autograd gradients.

    The tail mass is the explicit sum of the student's probabilities outside the top-K ids.
    """
    w = forward_weight(kl, mixed_weight)
    z = student_logits.to(dtype) / temperature
    lt = teacher_logprobs.to(dtype)
    ids = teacher_ids.long()
    if tail == "renorm":
        log_p = torch.log_softmax(torch.gather(z, -1, ids), dim=-1)
        log_q = torch.log_softmax(lt, dim=-1)
        reverse = (log_p.exp() * (log_p - log_q)).sum(-1)
        forward = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_probs = torch.log_softmax(z, dim=-1)
        log_p = torch.gather(log_probs, -1, ids)
        outside = torch.ones_like(z, dtype=torch.bool).scatter(-1, ids, False)
        p_tail = (log_probs.exp() * outside).sum(-1)
        q_tail = (1.0 - lt.exp().sum(-1)).clamp_min(0.0)
        log_p_tail = p_tail.clamp_min(TAIL_MASS_FLOOR).log()
        log_q_tail = q_tail.clamp_min(TAIL_MASS_FLOOR).log()
        reverse = (log_p.exp() * (log_p - lt)).sum(-1) + p_tail * (log_p_tail - log_q_tail)
        forward = (lt.exp() * (lt - log_p)).sum(-1) + q_tail * (log_q_tail - log_p_tail)
    return w * forward + (1.0 - w) * reverse
