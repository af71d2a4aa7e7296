"""Fused Triton kernels for SD-Zero's distillation loss (installed as ``sdzero_kernels``).

    teacher_topk(logits, k, *, temperature=1.0, tp_group=None) -> (logprobs [.., k] fp32, ids [.., k] int64)
    topk_kl(student_logits, teacher_logprobs, teacher_ids, *, kl="reverse", mixed_weight=0.5,
            tail="renorm", temperature=1.0, tp_group=None) -> per-token loss [..] fp32 (autograd)
    full_kl(student_logits, teacher_logits, *, kl="reverse", mixed_weight=0.5, temperature=1.0,
            tp_group=None) -> per-token loss [..] fp32 (autograd)

The fused-linear ops take the final hidden states [T, H] and this TP rank's output-weight shard
[V_local, H] instead of logits, and never hold more than [T, vocab_chunk] logits:

    fused_linear_teacher_topk(hidden, weight, k, *, temperature=1.0, tp_group=None, vocab_size=None,
                              vocab_chunk=VOCAB_CHUNK) -> (logprobs [T, k] fp32, ids [T, k] int64)
    sparse_topk_kl(hidden, weight, teacher_logprobs, teacher_ids, *, kl, mixed_weight, temperature,
                   tp_group) -> per-token loss [T] (renorm; K rows of the weight per token; autograd)
    fused_linear_topk_kl(hidden, weight, teacher_logprobs, teacher_ids, *, kl, mixed_weight, tail,
                         temperature, tp_group, vocab_size, vocab_chunk) -> per-token loss [T] (autograd)
    fused_linear_full_kl(hidden, weight, teacher_hidden, teacher_weight, *, kl, mixed_weight,
                         temperature, tp_group, vocab_size, vocab_chunk) -> per-token loss [T] (autograd)
    fused_linear_logprobs_entropy(hidden, weight, labels, *, temperature, tp_group, vocab_size,
                                  vocab_chunk) -> (logprobs [T], entropy [T]) fp32 (autograd; GRPO)

Logits are [T, V_local] or [..., V_local] in bf16, fp16 or fp32; under tensor parallelism each rank
passes its vocab shard and the TP group. CUDA tensors run the Triton kernels; CPU tensors run a
chunked PyTorch path (or the Triton kernels under TRITON_INTERPRET=1, as the tests do). Each op
has a ``*_reference`` beside it: the definition written directly, the oracle of the tests.
"""

from sdzero_kernels._common import KL_MODES, MAX_K, TAIL_MODES, VOCAB_CHUNK, main_grad_of
from sdzero_kernels.full_kl import full_kl, full_kl_reference
from sdzero_kernels.fused_linear_full_kl import fused_linear_full_kl, fused_linear_full_kl_reference
from sdzero_kernels.fused_linear_logprobs import (
    fused_linear_logprobs_entropy,
    fused_linear_logprobs_entropy_reference,
)
from sdzero_kernels.fused_linear_topk import fused_linear_teacher_topk, fused_linear_teacher_topk_reference
from sdzero_kernels.fused_linear_topk_kl import fused_linear_topk_kl, fused_linear_topk_kl_reference
from sdzero_kernels.sparse_topk_kl import sparse_topk_kl, sparse_topk_kl_reference
from sdzero_kernels.teacher_topk import teacher_topk, teacher_topk_reference
from sdzero_kernels.topk_kl import TAIL_MASS_FLOOR, topk_kl, topk_kl_reference

__all__ = [
    "KL_MODES",
    "MAX_K",
    "TAIL_MASS_FLOOR",
    "TAIL_MODES",
    "VOCAB_CHUNK",
    "full_kl",
    "full_kl_reference",
    "fused_linear_full_kl",
    "fused_linear_full_kl_reference",
    "fused_linear_logprobs_entropy",
    "fused_linear_logprobs_entropy_reference",
    "fused_linear_teacher_topk",
    "fused_linear_teacher_topk_reference",
    "fused_linear_topk_kl",
    "fused_linear_topk_kl_reference",
    "main_grad_of",
    "sparse_topk_kl",
    "sparse_topk_kl_reference",
    "teacher_topk",
    "teacher_topk_reference",
    "topk_kl",
    "topk_kl_reference",
]
