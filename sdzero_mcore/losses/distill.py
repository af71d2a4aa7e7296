"""The Phase 2 distillation loss on megatron-core models, correct at any TP x CP x DP layout.

A sample is the student's context x, its own response y, and the teacher's context before y
(x + y + sep + P_r + sep in SD-Zero). All of it is token ids: y is never re-tokenised, so the
teacher scores exactly the tokens the student produced.

* Student sequence: x + y. The logit at position ``s0 - 1 + j`` predicts y_j (``s0 = len(x)``).
* Teacher sequence: prefix + y. The logit at ``t0 - 1 + j`` predicts y_j (``t0 = len(prefix)``).

The teacher runs on its own (longer) sequence, split over CP; its top-K per position is gathered
back to sequence order (K values per token, not V), moved to the student's positions, and split
again in the student's CP order. :func:`distill_loss` returns the masked KL sum over this rank's
response tokens and their count: the trainer's per-token contract turns that into the token mean
over the global batch (:mod:`sdzero_mcore.trainer`).

At pipeline-parallel size > 1, :func:`teacher_targets_for` runs the teacher's micro-batches
through megatron-core's forward-only schedule and computes the top-K on its last stage. The
student (same layout) computes its loss on its last stage, the same ranks: the targets stay there,
and the other stages, which never run the loss, get None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from sdzero_kernels import teacher_topk, topk_kl

from sdzero_mcore.data.sample import Sample
from sdzero_mcore.losses.masked import masked_token_sum
from sdzero_mcore.models.forward import cp_local_batch, cp_size_rank, vocab_parallel_logits
from sdzero_mcore.parallel.context_parallel import gather_from_cp, padded_seq_len, split_for_cp
from sdzero_mcore.parallel.pipeline import forward_only_outputs, pipeline_parallel_size


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


def collate_distill(samples: Sequence[Sample], pad_id: int) -> DistillBatch:
    """Pad samples (with their teacher prefixes) into a :class:`DistillBatch`; errors name the sample and the field."""
    if not samples:
        raise ValueError("collate_distill needs at least one sample")
    for i, sample in enumerate(samples):
        for field in ("prompt_ids", "response_ids", "teacher_prefix_ids"):
            if not getattr(sample, field):
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
def teacher_targets(teacher, batch: DistillBatch, *, k: int, temperature: float = 1.0,
                    logits: Optional[torch.Tensor] = None) -> TeacherTargets:
    """Run the teacher on its sequences (or take its vocab-parallel ``logits`` on them) and place
    its top-K log-probs at the student's positions.

    Positions without a loss (prompt, padding) get a harmless uniform distribution over ids 0..K-1,
    so the kernels see finite inputs everywhere and the mask alone decides what counts.
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    teacher_len = batch.teacher_ids.shape[1]
    if logits is None:
        logits = teacher_logits(teacher, batch)
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


def teacher_logits(teacher, batch: DistillBatch) -> torch.Tensor:
    """The teacher's vocab-parallel logits on this rank's CP part of its sequences (at PP > 1: the
    stage's output)."""
    return vocab_parallel_logits(teacher, cp_local_batch(batch.teacher_ids))


def teacher_targets_for(teacher, batches: Sequence[DistillBatch], *, k: int,
                        temperature: float = 1.0) -> list[Optional[TeacherTargets]]:
    """:func:`teacher_targets` of each batch. At pipeline-parallel size > 1 the batches go through
    megatron-core's forward-only schedule as micro-batches, and the targets are computed on the
    last stage, where the student's loss runs; the other stages get None for each."""
    if pipeline_parallel_size() == 1:
        return [teacher_targets(teacher, batch, k=k, temperature=temperature) for batch in batches]
    targets = forward_only_outputs(
        teacher, batches, teacher_logits,
        lambda logits, batch: teacher_targets(teacher, batch, k=k, temperature=temperature, logits=logits),
    )
    return targets or [None] * len(batches)


@dataclass
class DistillLoss:
    loss_sum: torch.Tensor  # the KL summed over this rank's response tokens (backward through this)
    num_tokens: torch.Tensor  # this rank's response tokens
    per_token: torch.Tensor  # [B, s_local] this rank's per-token KL (0 where masked), detached
    loss_mask: torch.Tensor  # [B, s_local] this rank's response positions


def student_logits(student, batch: DistillBatch) -> torch.Tensor:
    """The student's vocab-parallel logits on this rank's CP part of x + y."""
    return vocab_parallel_logits(student, cp_local_batch(batch.student_ids))


def distill_loss(
    logits: torch.Tensor,
    targets: TeacherTargets,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
) -> DistillLoss:
    """``topk_kl`` of the student's logits (:func:`student_logits`) against the teacher's targets,
    summed over this rank's response tokens."""
    cp_size, cp_rank = cp_size_rank()
    logprobs = split_for_cp(targets.logprobs, cp_size, cp_rank, dim=1)
    ids = split_for_cp(targets.ids, cp_size, cp_rank, dim=1)
    mask = split_for_cp(targets.loss_mask, cp_size, cp_rank, dim=1)
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
    loss_sum, num_tokens = masked_token_sum(per_token, mask)
    return DistillLoss(loss_sum=loss_sum, num_tokens=num_tokens, per_token=per_token.detach() * mask, loss_mask=mask)
