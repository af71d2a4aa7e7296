"""A sparse-head Phase 2 micro-step (teacher top-K, student forward and backward) creates no
tensor with a vocabulary-sized last dimension larger than the vocabulary chunk: neither among the
tensors saved for backward (saved-tensor hooks) nor among the outputs of any op it runs, forward
or backward (a dispatch mode sees every one). The dense head, under the same recorder, does."""

import pytest
import torch
from helpers import wide_tensors

from sdzero_mcore.data.sample import Sample
from sdzero_mcore.losses import collate_distill, sparse_distill_loss, student_response_hidden, teacher_targets
from sdzero_mcore.losses.distill import distill_loss, student_logits
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import tiny_hf_config

VOCAB, K = 1111, 8
# above every other width of the tiny model (qkv 256, fc1 192, hidden 64), below the vocabulary
CHUNK = 320


@pytest.fixture(scope="module")
def models(megatron_single_rank):
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", vocab_size=VOCAB).to_dict())
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * arch.head_dim
    assert max(arch.hidden_size, 2 * arch.ffn_hidden_size, qkv) < CHUNK < VOCAB
    torch.manual_seed(0)
    student = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    teacher = build_gpt_model(arch, transformer_impl="local", on_cpu=True).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    batch = collate_distill([Sample(0, ids(6), ids(20), teacher_prefix_ids=ids(14)),
                             Sample(1, ids(4), ids(9), teacher_prefix_ids=ids(11))], pad_id=0)
    return student, teacher, batch


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_sparse_step_holds_no_vocabulary_wide_tensor(models, tail, monkeypatch):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", "torch")
    student, teacher, batch = models

    def step():
        targets = teacher_targets(teacher, batch, k=K, lm_head="sparse", vocab_chunk=CHUNK)
        hidden, head = student_response_hidden(student, batch)
        loss = sparse_distill_loss(hidden, head, targets, kl="mixed", tail=tail, vocab_chunk=CHUNK)
        loss.loss_sum.backward()

    saved, outputs = wide_tensors(step, CHUNK)
    assert saved == [] and outputs == [], (saved, outputs[:5])


def test_dense_step_does_hold_them(models, monkeypatch):
    """The recorder can fail: the dense head's logits are [B, S, V_padded] and saved for backward."""
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", "torch")
    student, teacher, batch = models

    def step():
        targets = teacher_targets(teacher, batch, k=K, lm_head="dense")
        distill_loss(student_logits(student, batch), targets, kl="mixed", tail="bucket").loss_sum.backward()

    saved, outputs = wide_tensors(step, CHUNK)
    padded = student.padded_vocab_size
    assert any(shape[-1] == padded for shape in saved)
    assert any(shape[-1] == padded for _, shape in outputs)
