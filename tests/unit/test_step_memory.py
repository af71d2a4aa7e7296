"""Transient memory of a training step: float64 reductions over whole tensors (the gradient norm, the
teacher checksum) convert one chunk at a time, never the whole tensor; AdamW runs fused on CUDA."""

import math

import pytest
import torch
from helpers import peak_allocated_bytes

from sdzero_mcore.config import OptimizerConfig
from sdzero_mcore.float64_reductions import CHUNK_ELEMENTS, float64_sum, float64_sum_of_squares
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import tiny_hf_config
from sdzero_mcore.phases.distill import weights_checksum
from sdzero_mcore.trainer import Trainer

# An embedding of 2^18 x 64 = 2^24 elements: twice CHUNK_ELEMENTS, 128 MiB as float64.
LARGE_VOCAB = 1 << 18


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("numel", [1, 1000, 4099])
def test_float64_sums_equal_the_whole_tensor_upcast(dtype, numel):
    tensor = (torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 3 + 1).to(dtype)
    reference = tensor.double()
    for chunk_elements in (1, 7, 1024, numel, 10 * numel):
        assert float64_sum(tensor, chunk_elements).item() == pytest.approx(reference.sum().item(), rel=1e-12, abs=1e-12)
        assert float64_sum_of_squares(tensor, chunk_elements).item() == pytest.approx(
            reference.pow(2).sum().item(), rel=1e-12
        )
    assert float64_sum(tensor).dtype == float64_sum_of_squares(tensor).dtype == torch.float64


def test_float64_sums_hold_one_chunk_at_a_time():
    tensor = torch.randn(1 << 20)
    chunk_elements = 1 << 14
    for reduction in (float64_sum, float64_sum_of_squares):
        peak = peak_allocated_bytes(lambda: reduction(tensor, chunk_elements))
        assert peak <= chunk_elements * 8 + 4096, reduction.__name__


@pytest.fixture(scope="module")
def large_embedding_model(megatron_single_rank):
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", vocab_size=LARGE_VOCAB).to_dict())
    torch.manual_seed(0)
    model = build_gpt_model(arch, transformer_impl="local", on_cpu=True)  # measured by the host allocator
    assert max(p.numel() for p in model.parameters()) == 2 * CHUNK_ELEMENTS
    return model


def _float64_copy_bytes(model) -> int:
    return max(p.numel() for p in model.parameters()) * 8


def test_grad_norm_neither_copies_a_gradient_to_float64_nor_changes_value(large_embedding_model, tmp_path):
    model = large_embedding_model
    trainer = Trainer(model, OptimizerConfig(), total_steps=1, run_dir=tmp_path, phase="memory", hf_files_dir=tmp_path)
    generator = torch.Generator().manual_seed(1)
    for master in trainer.masters.values():
        master.grad = torch.randn(master.shape, generator=generator)
    expected = math.sqrt(sum(m.grad.double().pow(2).sum().item() for m in trainer.masters.values()))
    norms = []
    peak = peak_allocated_bytes(lambda: norms.append(trainer.grad_norm()))
    assert norms[0] == pytest.approx(expected, rel=1e-12)
    # the old whole-tensor upcast held two float64 copies of the embedding gradient (256 MiB)
    assert peak < 0.75 * _float64_copy_bytes(model)
    trainer.close()


def test_weights_checksum_does_not_copy_a_parameter_to_float64(large_embedding_model):
    model = large_embedding_model
    expected = sum(p.detach().double().sum().item() for p in model.parameters())
    sums = []
    peak = peak_allocated_bytes(lambda: sums.append(weights_checksum(model)))
    assert sums[0] == pytest.approx(expected, rel=1e-12)
    assert peak < 0.75 * _float64_copy_bytes(model)


def test_adamw_is_foreach_off_cuda(megatron_single_rank, tmp_path):
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM").to_dict())
    trainer = Trainer(build_gpt_model(arch, transformer_impl="local", on_cpu=True), OptimizerConfig(), total_steps=1,
                      run_dir=tmp_path, phase="adamw", hf_files_dir=tmp_path)
    assert trainer.optimizer.defaults["foreach"] is True and not trainer.optimizer.defaults["fused"]
    trainer.close()


@pytest.mark.gpu
def test_on_cuda_adamw_is_fused_and_float64_reductions_stay_chunked(megatron_single_rank, tmp_path):
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", vocab_size=LARGE_VOCAB).to_dict())
    model = build_gpt_model(arch, transformer_impl="local", on_cpu=False)
    trainer = Trainer(model, OptimizerConfig(lr=1e-3), total_steps=1, run_dir=tmp_path, phase="cuda", hf_files_dir=tmp_path)
    assert trainer.optimizer.defaults["fused"] is True
    for master in trainer.masters.values():
        master.grad = torch.randn_like(master)

    def transient_cuda_bytes(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - held

    norm, norm_bytes = transient_cuda_bytes(trainer.grad_norm)
    expected_norm = math.sqrt(sum(m.grad.double().pow(2).sum().item() for m in trainer.masters.values()))
    checksum, checksum_bytes = transient_cuda_bytes(lambda: weights_checksum(model))
    expected_checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    assert norm == pytest.approx(expected_norm, rel=1e-12) and checksum == pytest.approx(expected_checksum, rel=1e-12)
    assert norm_bytes < 0.75 * _float64_copy_bytes(model) and checksum_bytes < 0.75 * _float64_copy_bytes(model)

    before = {name: master.detach().clone() for name, master in trainer.masters.items()}
    trainer.optimizer.step()
    assert all(not torch.equal(before[name], master) for name, master in trainer.masters.items())
    trainer.close()
