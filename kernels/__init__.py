"""Fused Triton kernels for SD-Zero's distillation loss (installed as ``sdzero_kernels``).

    teacher_topk(logits, k, *, temperature=1.0, tp_group=None) -> (logprobs [.., k] fp32, ids [.., k] int64)
    topk_kl(student_logits, teacher_logprobs, teacher_ids, *, kl="reverse", mixed_weight=0.5,
            tail="renorm", temperature=1.0, tp_group=None) -> per-token loss [..] fp32 (autograd)
    full_kl(student_logits, teacher_logits, *, kl="reverse", mixed_weight=0.5, temperature=1.0,
            tp_group=None) -> per-token loss [..] fp32 (autograd)

Logits are [T, V_local] or [..., V_local] in bf16, fp16 or fp32; under tensor parallelism each rank
passes its vocab shard and the TP group. CUDA tensors run the Triton kernels; CPU tensors run a
chunked PyTorch path (or the Triton kernels under TRITON_INTERPRET=1, as the tests do). Each op
has a ``*_reference`` beside it: the definition written directly, the oracle of the tests.
"""

from sdzero_kernels._common import KL_MODES, MAX_K, TAIL_MODES
from sdzero_kernels.full_kl import full_kl, full_kl_reference
from sdzero_kernels.teacher_topk import teacher_topk, teacher_topk_reference
from sdzero_kernels.topk_kl import TAIL_MASS_FLOOR, topk_kl, topk_kl_reference

__all__ = [
    "KL_MODES",
    "MAX_K",
    "TAIL_MASS_FLOOR",
    "TAIL_MODES",
    "full_kl",
    "full_kl_reference",
    "teacher_topk",
    "teacher_topk_reference",
    "topk_kl",
    "topk_kl_reference",
]
