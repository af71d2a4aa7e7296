"""Losses on megatron-core models: Phase 2 distillation (on sdzero_kernels), GRPO's policy terms,
and the masked token sum every loss function hands the trainer."""

from sdzero_mcore.losses.distill import (
    DistillBatch,
    DistillLoss,
    TeacherTargets,
    collate_distill,
    distill_loss,
    response_mask,
    student_logits,
    teacher_targets,
)
from sdzero_mcore.losses.masked import masked_token_sum

__all__ = [
    "DistillBatch",
    "DistillLoss",
    "TeacherTargets",
    "collate_distill",
    "distill_loss",
    "masked_token_sum",
    "response_mask",
    "student_logits",
    "teacher_targets",
]
