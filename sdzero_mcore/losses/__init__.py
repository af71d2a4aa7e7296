"""Losses: the Phase 2 distillation loss (on sdzero_kernels); SRT and baseline terms join it later."""

from sdzero_mcore.losses.distill import (
    DistillBatch,
    DistillLoss,
    DistillSample,
    TeacherTargets,
    collate_distill,
    distill_loss,
    response_mask,
    teacher_targets,
)

__all__ = [
    "DistillBatch",
    "DistillLoss",
    "DistillSample",
    "TeacherTargets",
    "collate_distill",
    "distill_loss",
    "response_mask",
    "teacher_targets",
]
