"""Losses on megatron-core models: Phase 2 distillation (on sdzero_kernels), GRPO's policy terms,
and the masked token sum every loss function hands the trainer."""

from sdzero_mcore.losses.distill import (
    LM_HEADS,
    DistillBatch,
    DistillLoss,
    StudentHead,
    TeacherTargets,
    collate_distill,
    distill_loss,
    local_response_rows,
    response_hidden,
    response_mask,
    sparse_distill_loss,
    student_logits,
    student_response_hidden,
    teacher_output,
    teacher_targets,
    teacher_targets_for,
)
from sdzero_mcore.losses.masked import masked_token_sum

__all__ = [
    "LM_HEADS",
    "DistillBatch",
    "DistillLoss",
    "StudentHead",
    "TeacherTargets",
    "collate_distill",
    "distill_loss",
    "local_response_rows",
    "masked_token_sum",
    "response_hidden",
    "response_mask",
    "sparse_distill_loss",
    "student_logits",
    "student_response_hidden",
    "teacher_output",
    "teacher_targets",
    "teacher_targets_for",
]
