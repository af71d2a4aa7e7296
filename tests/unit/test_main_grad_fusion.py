"""Gradient-accumulation fusion of the sparse LM head under megatron-core's DDP (TP = 1, fp32).

With the models wrapped as the trainer wraps them (``per_token_ddp``: fp32 ``main_grad``
buffers), the sparse head's output-weight gradient (``sparse_topk_kl``: index_add_ of K rows per
token; ``tail=bucket``: the chunked backward) and the word embeddings' lookup gradient
(``final_hidden_states``) go straight into ``main_grad``. Every parameter's ``main_grad`` after
the step equals its ``.grad`` from the same step without DDP; the step creates no tensor of the
output weight's [V_padded, H] shape; and ``.grad`` stays None.
"""

import pytest
import torch

from sdzero_mcore.data.sample import Sample
from sdzero_mcore.losses import collate_distill, sparse_distill_loss, student_response_hidden, teacher_targets
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.forward import output_weight
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import tiny_hf_config
from sdzero_mcore.trainer import per_token_ddp

from helpers import op_output_shapes

VOCAB, K, CHUNK = 1111, 8, 320


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _batch():
    generator = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    # token 7 repeated: rows the lookup and the head both add to more than once
    return collate_distill([Sample(0, ids(6) + [7, 7], ids(20) + [7], teacher_prefix_ids=ids(14)),
                            Sample(1, ids(4), [7] + ids(9), teacher_prefix_ids=ids(11))], pad_id=0)


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("tied", [True, False])
def test_main_grad_equals_unfused_grad(megatron_single_rank, tail, tied, monkeypatch):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", "torch")
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", vocab_size=VOCAB,
                                                   tie_word_embeddings=tied).to_dict())
    torch.manual_seed(0)
    student = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    teacher = build_gpt_model(arch, transformer_impl="local", on_cpu=True).eval().requires_grad_(False)
    assert student.share_embeddings_and_output_weights == tied
    batch = _batch()
    targets = teacher_targets(teacher, batch, k=K, lm_head="sparse", vocab_chunk=CHUNK)

    def step(model):
        hidden, head = student_response_hidden(model, batch)
        loss = sparse_distill_loss(hidden, head, targets, kl="mixed", tail=tail, vocab_chunk=CHUNK)
        loss.loss_sum.backward()
        return loss.loss_sum.detach()

    loss_unfused = step(student)
    reference = {name: param.grad.clone() for name, param in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    ddp = per_token_ddp(student)
    ddp.zero_grad_buffer()
    weight_shape = tuple(output_weight(student).shape)
    results = []
    shapes = op_output_shapes(lambda: results.append(step(ddp)))
    assert results[0] == loss_unfused
    wide = [(op, shape) for op, shape in shapes if shape == weight_shape]
    assert shapes and wide == [], wide[:5]
    errors = {}
    for name, param in student.named_parameters():
        assert param.grad is None, name
        errors[name] = _max_rel(param.main_grad, reference[name])
    assert max(errors.values()) <= 1e-6, errors
    head_names = [n for n in errors if "word_embeddings" in n or "output_layer" in n]
    assert len(head_names) == (1 if tied else 2)
    for name in head_names:  # the gradients the fusion writes are real ones
        assert reference[name].abs().max() > 0
