"""The Phase 2 distillation loss on megatron-core models, correct at any TP x CP x DP layout.

A sample is the student's context x, its own response y, and the teacher's context before y
(x + y + sep + P_r + sep in SD-Zero). All of it is token ids: y is never re-tokenised, so the
teacher scores exactly the tokens the student produced.

* Student sequence: x + y. The logit at position ``s0 - 1 + j`` predicts y_j (``s0 = len(x)``).
* Teacher sequence: prefix + y. The logit at ``t0 - 1 + j`` predicts y_j (``t0 = len(prefix)``).

The teacher runs on its own (longer) sequence, split over CP; its top-K per position is gathered
back to sequence order (K values per token, not V), moved to the student's positions, and split
again in the student's CP order. The loss is a token mean over every response token of the
global batch (:func:`sdzero_mcore.parallel.context_parallel.token_mean_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sdzero_mcore.models.forward import cp_local_batch, cp_size_rank, vocab_parallel_logits
from sdzero_mcore.parallel.context_parallel import (
    gather_from_cp,
    global_token_count,
    padded_seq_len,
    split_for_cp,
    token_mean_loss,
)


@dataclass(frozen=True)
class DistillSample:
    """One distillation example, as token ids."""

    prompt_ids: Sequence[int]  # x, the student's context
    response_ids: Sequence[int]  # y, sampled from the student
    teacher_prefix_ids: Sequence[int]  # what the teacher reads before y


@dataclass
class DistillBatch:
    """Right-padded student and teacher sequences and where each response sits in them."""

    student_ids: torch.Tensor  # [B, S] x + y
    teacher_ids: torch.Tensor  # [B, S_t] prefix + y
    student_start: torch.Tensor  # [B] index of y_0 in student_ids
    teacher_start: torch.Tensor  # [B] index of y_0 in teacher_ids
    response_len: torch.Tensor  # [B]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_len.sum())


def collate_distill(samples: Sequence[DistillSample], pad_id: int) -> DistillBatch:
    """Pad a list of samples into a :class:`DistillBatch`; errors name the sample and the field."""
    if not samples:
        raise ValueError("collate_distill needs at least one sample")
    for i, sample in enumerate(samples):
        for field in ("prompt_ids", "response_ids", "teacher_prefix_ids"):
            if len(getattr(sample, field)) == 0:
                raise ValueError(f"sample {i}: {field} is empty (the first response token needs a context)")
    student = [list(s.prompt_ids) + list(s.response_ids) for s in samples]
    teacher = [list(s.teacher_prefix_ids) + list(s.response_ids) for s in samples]

    def pad(rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)

    return DistillBatch(
        student_ids=pad(student),
        teacher_ids=pad(teacher),
        student_start=torch.tensor([len(s.prompt_ids) for s in samples]),
        teacher_start=torch.tensor([len(s.teacher_prefix_ids) for s in samples]),
        response_len=torch.tensor([len(s.response_ids) for s in samples]),
    )


def response_mask(start: torch.Tensor, length: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, seq_len] bool: True at the positions whose logits predict a response token."""
    positions = torch.arange(seq_len, device=start.device)[None, :]
    first = (start - 1)[:, None]
    return (positions >= first) & (positions < first + length[:, None])


@dataclass
class TeacherTargets:
    """The teacher's top-K at the student's positions, full sequence (padded to 2 x CP), every rank."""

    logprobs: torch.Tensor  # [B, S_pad, K] float32
    ids: torch.Tensor  # [B, S_pad, K] int64
    loss_mask: torch.Tensor  # [B, S_pad] bool


@torch.no_grad()
def teacher_targets(teacher, batch: DistillBatch, *, k: int, temperature: float = 1.0) -> TeacherTargets:
    """Run the teacher on its sequences and place its top-K log-probs at the student's positions.

    Positions without a loss (prompt, padding) get a harmless uniform distribution over ids 0..K-1,
    so the kernels see finite inputs everywhere and the mask alone decides what counts.
    """
    from megatron.core import parallel_state
    from sdzero_kernels import teacher_topk

    tp_group = parallel_state.get_tensor_model_parallel_group()
    teacher_len = batch.teacher_ids.shape[1]
    logits = vocab_parallel_logits(teacher, cp_local_batch(batch.teacher_ids))
    logprobs, ids = teacher_topk(logits, k, temperature=temperature, tp_group=tp_group)
    logprobs = gather_from_cp(logprobs, dim=1)[:, :teacher_len]
    ids = gather_from_cp(ids, dim=1)[:, :teacher_len]

    cp_size, _ = cp_size_rank()
    student_len = padded_seq_len(batch.student_ids.shape[1], cp_size)
    device = logprobs.device
    mask = response_mask(batch.student_start.to(device), batch.response_len.to(device), student_len)
    # Student position p reads teacher position p - s0 + t0 (both predict the same y_j).
    shift = (batch.teacher_start - batch.student_start).to(device)[:, None]
    source = (torch.arange(student_len, device=device)[None, :] + shift).clamp(0, teacher_len - 1)
    index = source[:, :, None].expand(-1, -1, k)
    filler_logprobs = torch.full((), -math.log(k), device=device)
    filler_ids = torch.arange(k, device=device).expand(*mask.shape, k)
    return TeacherTargets(
        logprobs=torch.where(mask[..., None], logprobs.gather(1, index), filler_logprobs),
        ids=torch.where(mask[..., None], ids.gather(1, index), filler_ids),
        loss_mask=mask,
    )


@dataclass
class DistillLoss:
    objective: torch.Tensor  # backward this (scaled for DDP's averaging over DP x CP)
    value: torch.Tensor  # the global token-mean KL of this micro-batch, for logging
    num_tokens: torch.Tensor  # response tokens of the global batch
    per_token: torch.Tensor  # [B, s_local] this rank's per-token KL (0 where masked)


def distill_loss(
    student,
    batch: DistillBatch,
    targets: TeacherTargets,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
    num_tokens: Optional[torch.Tensor] = None,
) -> DistillLoss:
    """Student forward on this rank's CP part and ``topk_kl`` against the teacher's targets.

    ``num_tokens`` is the response-token count of the whole global batch when the step
    accumulates several micro-batches; by default this micro-batch's count (all-reduced).
    """
    from megatron.core import parallel_state
    from sdzero_kernels import topk_kl

    cp_size, cp_rank = cp_size_rank()
    local = cp_local_batch(batch.student_ids)
    logprobs = split_for_cp(targets.logprobs, cp_size, cp_rank, dim=1)
    ids = split_for_cp(targets.ids, cp_size, cp_rank, dim=1)
    mask = split_for_cp(targets.loss_mask, cp_size, cp_rank, dim=1)
    logits = vocab_parallel_logits(student, local)
    per_token = topk_kl(
        logits,
        logprobs,
        ids,
        kl=kl,
        mixed_weight=mixed_weight,
        tail=tail,
        temperature=temperature,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
    )
    if num_tokens is None:
        num_tokens = global_token_count(mask)
    objective, value = token_mean_loss(per_token, mask, num_tokens)
    return DistillLoss(objective=objective, value=value, num_tokens=num_tokens, per_token=per_token.detach() * mask)
