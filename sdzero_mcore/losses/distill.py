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

Two LM heads (``distill.lm_head``):

* ``dense`` (the reference): both models' full forward, logits [B, s_local, V/TP] at every
  position, then ``teacher_topk`` / ``topk_kl`` on them.
* ``sparse``: both models run to the final norm (:func:`~sdzero_mcore.models.forward.final_hidden_states`)
  and the output layer is applied inside the loss, only at the positions that predict response
  tokens (:func:`local_response_rows`): the teacher's top-K by ``fused_linear_teacher_topk``
  (vocabulary chunks, no [T, V] logits), the student's KL by ``fused_linear_topk_kl`` (renorm: K
  rows of the output weight per token; bucket: vocabulary chunks, recomputed in the backward).
  Same targets and losses as ``dense`` up to float rounding (tests/distributed/test_sparse_head.py).

At pipeline-parallel size > 1, :func:`teacher_targets_for` runs the teacher's micro-batches
through megatron-core's forward-only schedule and computes the top-K on its last stage. The
student (same layout) computes its loss on its last stage, the same ranks: the targets stay there,
and the other stages, which never run the loss, get None. Both heads run there alike: every stage
(every chunk, with virtual stages) runs its layers and hands its output to the schedule, and only
the last one's output (logits, or the final-norm hidden states) reaches the top-K or the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from sdzero_kernels import VOCAB_CHUNK, fused_linear_teacher_topk, fused_linear_topk_kl, teacher_topk, topk_kl

from sdzero_mcore.data.sample import Sample
from sdzero_mcore.losses.masked import masked_token_sum
from sdzero_mcore.models.forward import (
    cp_local_batch,
    cp_size_rank,
    final_hidden_states,
    gpt_model,
    output_weight,
    real_vocab_size,
    rows_at,
    vocab_parallel_logits,
)
from sdzero_mcore.parallel.context_parallel import gather_from_cp, padded_seq_len, split_for_cp
from sdzero_mcore.parallel.pipeline import forward_only_outputs, pipeline_parallel_size

LM_HEADS = ("sparse", "dense")


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


def local_response_rows(start: torch.Tensor, length: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This CP rank's positions that predict a response token in a [B, seq_len] batch, as flat
    indices into its [B, s_local] layout (row-major) and into megatron's [s_local, B] layout, in
    the same order. Computed on the host from the batch's host tensors: no device read."""
    cp_size, cp_rank = cp_size_rank()
    full = response_mask(start.cpu(), length.cpu(), padded_seq_len(seq_len, cp_size))
    mask = split_for_cp(full, cp_size, cp_rank, dim=1)
    batch_size, local_len = mask.shape
    rows_bs = mask.reshape(-1).nonzero().squeeze(1)
    rows_sb = (rows_bs % local_len) * batch_size + rows_bs // local_len
    return rows_bs, rows_sb


def check_lm_head(lm_head: str) -> None:
    if lm_head not in LM_HEADS:
        raise ValueError(f"lm_head must be one of {', '.join(LM_HEADS)}; got {lm_head!r}")


def _sparse_teacher_topk(hidden: torch.Tensor, teacher, batch: DistillBatch, k: int, temperature: float,
                         tp_group, vocab_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-K [B, s_local, K] from its final-norm ``hidden`` states [s_local, B, H] on
    this CP rank's part of its sequence, computed only at the positions of the second y (elsewhere
    0: those positions are never read)."""
    rows, head = response_rows_and_head(
        teacher, hidden, *local_response_rows(batch.teacher_start, batch.response_len, batch.teacher_ids.shape[1]))
    logprobs, ids = fused_linear_teacher_topk(rows, head.weight, k, temperature=temperature, tp_group=tp_group,
                                              vocab_size=head.vocab_size, vocab_chunk=vocab_chunk)
    batch_size, local_len = head.local_shape
    logprobs = logprobs.new_zeros(batch_size * local_len, k).index_copy_(0, head.rows, logprobs)
    ids = ids.new_zeros(batch_size * local_len, k).index_copy_(0, head.rows, ids)
    return logprobs.view(batch_size, local_len, k), ids.view(batch_size, local_len, k)


@torch.no_grad()
def teacher_targets(teacher, batch: DistillBatch, *, k: int, temperature: float = 1.0,
                    output: Optional[torch.Tensor] = None, lm_head: str = "dense",
                    vocab_chunk: int = VOCAB_CHUNK) -> TeacherTargets:
    """Run the teacher on its sequences (or take its ``output`` on them, :func:`teacher_output`:
    what the last pipeline stage computed) and place its top-K log-probs at the student's positions.

    Positions without a loss (prompt, padding) get a harmless uniform distribution over ids 0..K-1,
    so the kernels see finite inputs everywhere and the mask alone decides what counts.
    ``lm_head="sparse"`` applies the output layer only at the response positions, one vocabulary
    chunk of ``vocab_chunk`` ids at a time (the module doc).
    """
    check_lm_head(lm_head)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    teacher_len = batch.teacher_ids.shape[1]
    if output is None:
        output = teacher_output(teacher, batch, lm_head)
    if lm_head == "sparse":
        logprobs, ids = _sparse_teacher_topk(output, teacher, batch, k, temperature, tp_group, vocab_chunk)
    else:
        logprobs, ids = teacher_topk(output, k, temperature=temperature, tp_group=tp_group)
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


def teacher_output(teacher, batch: DistillBatch, lm_head: str) -> torch.Tensor:
    """The teacher's stage output on this rank's CP part of its sequences: its vocab-parallel logits
    (``dense``) or its final-norm hidden states [s_local, B, H] (``sparse``); at PP > 1 on the
    stages before the last, the activation the schedule sends on."""
    local = cp_local_batch(batch.teacher_ids)
    return final_hidden_states(teacher, local) if lm_head == "sparse" else vocab_parallel_logits(teacher, local)


def teacher_targets_for(teacher, batches: Sequence[DistillBatch], *, k: int, temperature: float = 1.0,
                        lm_head: str = "dense") -> list[Optional[TeacherTargets]]:
    """:func:`teacher_targets` of each batch. At pipeline-parallel size > 1 the batches go through
    megatron-core's forward-only schedule as micro-batches, and the targets are computed on the
    last stage, where the student's loss runs; the other stages get None for each."""
    check_lm_head(lm_head)
    if pipeline_parallel_size() == 1:
        return [teacher_targets(teacher, batch, k=k, temperature=temperature, lm_head=lm_head) for batch in batches]
    targets = forward_only_outputs(
        teacher, batches, lambda stage, batch: teacher_output(stage, batch, lm_head),
        lambda output, batch: teacher_targets(teacher, batch, k=k, temperature=temperature, output=output,
                                              lm_head=lm_head),
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


@dataclass
class StudentHead:
    """A model's side of the sparse head for one micro-batch (the student's, or a frozen model's
    in the teacher's top-K and GRPO's fixed passes): the output weight (a parameter, tied or not)
    and where this rank's response positions sit in its [B, s_local] layout."""

    weight: torch.Tensor  # [V_padded / TP, H]
    rows: torch.Tensor  # [T_local] flat indices into [B, s_local], row-major
    local_shape: tuple[int, int]  # (B, s_local)
    vocab_size: Optional[int]  # real ids; the rows above are megatron's padding


def response_hidden(model, local, rows_bs: torch.Tensor,
                    rows_sb: torch.Tensor) -> tuple[torch.Tensor, Optional[StudentHead]]:
    """The model's final-norm hidden states [T_local, H] at the rows ``rows_bs`` / ``rows_sb`` (as
    :func:`local_response_rows` gives them) of a batch prepared by ``cp_local_batch``, and the
    :class:`StudentHead` that applies the output layer to them.

    ``model`` is what a forward step receives: at pipeline-parallel size > 1 one stage (one chunk,
    with virtual stages). One without the output layer (not ``post_process``) returns its whole
    output [s_local, B, H], which the schedule sends to the next stage, and no head: the loss
    function never runs there."""
    hidden = final_hidden_states(model, local)  # [s_local, B, H]
    if not gpt_model(model).post_process:
        return hidden, None
    return response_rows_and_head(model, hidden, rows_bs, rows_sb)


def response_rows_and_head(model, hidden: torch.Tensor, rows_bs: torch.Tensor,
                           rows_sb: torch.Tensor) -> tuple[torch.Tensor, StudentHead]:
    """The final-norm ``hidden`` states [s_local, B, H] of ``model`` (at PP > 1: what its last stage
    computed) at the rows ``rows_bs`` / ``rows_sb``, [T_local, H], and their :class:`StudentHead`."""
    local_len, batch_size = hidden.shape[:2]
    head = StudentHead(weight=output_weight(model), rows=rows_bs.to(hidden.device),
                       local_shape=(batch_size, local_len), vocab_size=real_vocab_size(model))
    return rows_at(hidden, rows_sb), head


def student_response_hidden(student, batch: DistillBatch) -> tuple[torch.Tensor, Optional[StudentHead]]:
    """The student's final-norm hidden states [T_local, H] at this rank's positions that predict
    response tokens (x + y, its CP part), and the :class:`StudentHead` its loss needs (before the
    last pipeline stage: the stage's output and None, :func:`response_hidden`)."""
    rows_bs, rows_sb = local_response_rows(batch.student_start, batch.response_len, batch.student_ids.shape[1])
    return response_hidden(student, cp_local_batch(batch.student_ids), rows_bs, rows_sb)


def sparse_distill_loss(
    hidden: torch.Tensor,
    head: StudentHead,
    targets: TeacherTargets,
    *,
    kl: str = "reverse",
    mixed_weight: float = 0.5,
    tail: str = "renorm",
    temperature: float = 1.0,
    vocab_chunk: int = VOCAB_CHUNK,
) -> DistillLoss:
    """:func:`distill_loss` from the student's hidden states at its response positions
    (:func:`student_response_hidden`): ``fused_linear_topk_kl`` on those rows only, the per-token
    loss placed back in the [B, s_local] layout (0 elsewhere)."""
    cp_size, cp_rank = cp_size_rank()
    mask = split_for_cp(targets.loss_mask, cp_size, cp_rank, dim=1)
    k = targets.ids.shape[-1]

    def at_rows(full: torch.Tensor) -> torch.Tensor:
        return split_for_cp(full, cp_size, cp_rank, dim=1).reshape(-1, k).index_select(0, head.rows)

    per_row = fused_linear_topk_kl(
        hidden,
        head.weight,
        at_rows(targets.logprobs),
        at_rows(targets.ids),
        kl=kl,
        mixed_weight=mixed_weight,
        tail=tail,
        temperature=temperature,
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        vocab_size=head.vocab_size,
        vocab_chunk=vocab_chunk,
    )
    batch_size, local_len = head.local_shape
    per_token = per_row.new_zeros(batch_size * local_len).index_copy(0, head.rows, per_row).view(batch_size, local_len)
    loss_sum, num_tokens = masked_token_sum(per_token, mask)
    return DistillLoss(loss_sum=loss_sum, num_tokens=num_tokens, per_token=per_token.detach() * mask, loss_mask=mask)
