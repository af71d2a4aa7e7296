"""The hot path of a training step reads nothing from the device before the step ends: the Phase 2
loss function's logs stay tensors (summed and read once, at the step's end, by the trainer), and
context parallelism's chunk-order index is built once, not twice per layer per forward."""

import pytest
import torch
from helpers import host_reads
from megatron.core import parallel_state

from sdzero_mcore.config import load_config
from sdzero_mcore.losses.distill import DistillBatch, TeacherTargets, distill_loss
from sdzero_mcore.models import attention
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.forward import output_weight
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import tiny_hf_config
from sdzero_mcore.phases.distill import distill_forward_step
from sdzero_kernels import teacher_topk

BATCH, SEQ, VOCAB, K = 4, 6, 64, 8


class FixedLogits(torch.nn.Module):
    """A student whose logits are a parameter: the loss function's inputs, without a transformer."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, position_ids, attention_mask=None):
        return self.logits


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", "torch")


def _micro_batch():
    generator = torch.Generator().manual_seed(0)
    batch = DistillBatch(
        student_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
        teacher_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
        student_start=torch.tensor([2, 3, 2, 4]),
        teacher_start=torch.tensor([2, 3, 2, 4]),
        response_len=torch.tensor([3, 2, 4, 1]),
    )
    logprobs, ids = teacher_topk(torch.randn(BATCH, SEQ, VOCAB, generator=generator), K)
    positions = torch.arange(SEQ)[None, :]
    mask = (positions >= batch.student_start[:, None] - 1) & (positions < batch.student_start[:, None] - 1 + batch.response_len[:, None])
    targets = TeacherTargets(logprobs=logprobs, ids=ids, loss_mask=mask)
    rewards = torch.tensor([1, 0, 1, 0])
    return batch, targets, rewards


def test_distill_loss_logs_stay_on_the_device(megatron_single_rank):
    batch, targets, rewards = _micro_batch()
    student = FixedLogits(torch.randn(BATCH, SEQ, VOCAB, generator=torch.Generator().manual_seed(1)))
    dcfg = load_config(overrides=["distill.kl=mixed", "distill.tail=bucket", "distill.lm_head=dense"]).distill
    output, loss_fn = distill_forward_step(dcfg)(student, (batch, targets, rewards))
    result = {}

    def loss_and_backward():
        result["loss_sum"], result["num_tokens"], result["logs"] = loss_fn(output)
        result["loss_sum"].backward()

    assert host_reads(loss_and_backward) == []
    logs = result["logs"]
    assert all(isinstance(value, torch.Tensor) for value in logs.values()), {k: type(v) for k, v in logs.items()}
    # the split by reward, as boolean-mask sums (the definition)
    loss = distill_loss(output.detach(), targets, kl="mixed", tail="bucket")
    for r in (0, 1):
        rows = rewards == r
        torch.testing.assert_close(logs[f"kl_sum_r{r}"], loss.per_token[rows].sum())
        assert int(logs[f"tokens_r{r}"]) == int(loss.loss_mask[rows].sum())
    assert int(logs["tokens_r0"]) + int(logs["tokens_r1"]) == int(result["num_tokens"]) == 10


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_sparse_head_loss_logs_stay_on_the_device(megatron_single_rank, tail):
    """The sparse head's loss function (the output layer inside the loss) and its backward into the
    hidden states and the output weight read nothing on the host either."""
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", vocab_size=VOCAB).to_dict())
    torch.manual_seed(0)
    student = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    batch, targets, rewards = _micro_batch()
    dcfg = load_config(overrides=["distill.kl=mixed", f"distill.tail={tail}"]).distill
    assert dcfg.lm_head == "sparse"  # the default
    output, loss_fn = distill_forward_step(dcfg)(student, (batch, targets, rewards))
    hidden = output.detach().requires_grad_()  # the loss function and its backward, not the decoder's
    result = {}

    def loss_and_backward():
        result["loss_sum"], result["num_tokens"], result["logs"] = loss_fn(hidden)
        result["loss_sum"].backward()

    assert host_reads(loss_and_backward) == []
    assert int(result["num_tokens"]) == 10 == int(result["logs"]["tokens_r0"]) + int(result["logs"]["tokens_r1"])
    assert hidden.grad is not None and output_weight(student).grad.abs().sum() > 0


def test_cp_chunk_order_index_is_built_once(megatron_single_rank, monkeypatch):
    built = []
    chunk_order = attention.sequence_chunk_order
    monkeypatch.setattr(attention, "sequence_chunk_order", lambda cp_size: built.append(cp_size) or chunk_order(cp_size))
    group = parallel_state.get_context_parallel_group()
    local = torch.randn(4, 2, 3)
    for _ in range(3):  # K and V of each layer, each forward
        assert torch.equal(attention.gather_sequence_over_cp(local, group), local)  # one CP rank: the identity
    assert len(built) <= 1, f"the chunk order was built {len(built)} times for 3 gathers"
