"""The CPU compatibility layer: applied only without CUDA, and megatron-core works under it.

Each check runs in a fresh interpreter, since the layer changes process-wide state.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_redirections_apply_once_on_cpu():
    out = _run(
        """
        import torch
        original = torch.cuda.current_device
        from megatron.core.pipeline_parallel import schedules
        from sdzero_mcore.parallel.cpu_compat import apply_cpu_compat
        assert torch.cuda.current_device is original and schedules.torch is torch  # importing patches nothing
        assert apply_cpu_compat() is True and apply_cpu_compat() is True
        assert torch.cuda.current_device() == torch.device("cpu")
        # the schedules' token counter lands on the CPU; the rest of torch is unchanged there
        counter = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        assert counter.device.type == "cpu" and counter.dtype == torch.int
        assert schedules.torch.ones is torch.ones and schedules.torch.Tensor is torch.Tensor
        assert torch.cuda.synchronize() is None
        # Tensor.cuda() leaves CPU tensors in place only inside the tied-embedding setup
        from megatron.core.models.common.language_module.language_module import LanguageModule
        from sdzero_mcore.parallel import cpu_compat
        assert LanguageModule.setup_embeddings_and_output_layer.__wrapped__ is not None
        with cpu_compat._tensor_cuda_keeps_cpu_tensors():
            assert torch.ones(1).cuda().device.type == "cpu"
        try:
            torch.ones(1).cuda()
            moved = True
        except (AssertionError, RuntimeError):  # torch without CUDA refuses
            moved = False
        assert not moved
        from megatron.core.fusions import fused_softmax
        mask = fused_softmax.get_default_causal_mask(4)
        assert mask.device.type == "cpu" and mask.dtype == torch.bool
        assert mask.tolist() == [[j > i for j in range(4)] for i in range(4)]
        # megatron-core's optimizer scalars and its fp32 gradient norm land on the CPU
        from megatron.core.optimizer import clip_grads, optimizer as mcore_optimizer
        assert mcore_optimizer.torch.tensor([1.0], device="cuda").device.type == "cpu"
        grads = [torch.full((3,), 2.0), torch.full((4,), 1.0)]
        norm, _ = clip_grads.multi_tensor_applier(clip_grads.l2_norm_impl, None, [grads], False)
        assert norm.device.type == "cpu" and norm.item() == 4.0  # sqrt(3 * 4 + 4 * 1)
        # Tensor.type() names CPU tensors as CUDA ones only inside the wrapped megatron-core calls
        grad_holder = torch.zeros(2, requires_grad=True)
        grad_holder.grad = torch.full((2,), 3.0)
        clip_grads.clip_grad_by_total_norm_fp32([grad_holder], max_norm=1.0, total_norm=6.0)
        assert torch.allclose(grad_holder.grad, torch.full((2,), 3.0 / (6.0 + 1e-6)))
        assert mcore_optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
        assert torch.zeros(1).type() == "torch.FloatTensor" and torch.zeros(1).type(torch.float64).dtype == torch.float64
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_nothing_is_patched_when_cuda_is_present():
    out = _run(
        """
        import torch
        torch.cuda.is_available = lambda: True  # as on a GPU machine
        original = torch.cuda.current_device
        from megatron.core.tensor_parallel import random as mcore_random
        tracker_class = mcore_random.CudaRNGStatesTracker
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.models.common.language_module.language_module import LanguageModule
        setup = LanguageModule.setup_embeddings_and_output_layer
        from megatron.core.optimizer import clip_grads, distrib_optimizer
        init, clip = distrib_optimizer.DistributedOptimizer.__init__, clip_grads.clip_grad_by_total_norm_fp32
        from sdzero_mcore.parallel.cpu_compat import apply_cpu_compat
        assert apply_cpu_compat() is False
        assert torch.cuda.current_device is original and schedules.torch is torch
        assert clip_grads.torch is torch and distrib_optimizer.DistributedOptimizer.__init__ is init
        assert clip_grads.clip_grad_by_total_norm_fp32 is clip
        assert mcore_random.CudaRNGStatesTracker is tracker_class
        assert LanguageModule.setup_embeddings_and_output_layer is setup
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_model_parallel_rng_tracker_on_cpu():
    out = _run(
        """
        import torch
        from sdzero_mcore.parallel.cpu_compat import apply_cpu_compat
        apply_cpu_compat()
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_all_rng_states

        def draws(tp_rank):
            torch.manual_seed(7)
            tensor_parallel.model_parallel_cuda_manual_seed(7, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
            tracker = get_cuda_rng_tracker()
            before = torch.rand(3)
            with tracker.fork():
                forked_a = torch.rand(3)
            after = torch.rand(3)
            with tracker.fork():
                forked_b = torch.rand(3)
            return before, forked_a, after, forked_b

        before, forked_a, after, forked_b = draws(tp_rank=0)
        torch.manual_seed(7)
        plain = torch.rand(6)
        # the fork leaves the default stream exactly where it was
        assert torch.equal(torch.cat([before, after]), plain)
        # the forked stream is its own, and continues across forks
        assert not torch.equal(forked_a, after) and not torch.equal(forked_a, forked_b)
        # reproducible, and distinct per tensor-parallel rank
        assert all(torch.equal(x, y) for x, y in zip(draws(0), (before, forked_a, after, forked_b)))
        assert not torch.equal(draws(1)[1], forked_a)
        assert "model-parallel-rng" in get_all_rng_states()
        print("ok")
        """
    )
    assert out.strip() == "ok"


def test_gpt_model_forward_backward_with_dropout_on_cpu():
    """A GPTModel with dropout (which forks the RNG tracker) trains on CPU, deterministically."""
    out = _run(
        """
        import torch
        from sdzero_mcore.parallel import init_distributed, initialize_model_parallel
        from sdzero_mcore.models.builder import build_gpt_model
        from sdzero_mcore.models.hf_config import ModelArch
        from sdzero_mcore.models.tiny import tiny_hf_config
        init_distributed("gloo")
        arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM").to_dict())

        def step(dropout, local_attention):
            initialize_model_parallel(1, seed=3)
            torch.manual_seed(0)
            model = build_gpt_model(arch, transformer_impl="local", local_attention=local_attention)
            for module in model.modules():
                # attention dropout, run under the tracker's fork: an nn.Dropout in megatron's
                # unfused attention, SDPA's dropout_p in ours
                if isinstance(module, torch.nn.Dropout):
                    module.p = dropout
                if hasattr(module, "dropout_p"):
                    module.dropout_p = dropout
            ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
            loss = model(ids, torch.arange(8).expand(2, -1), None, labels=ids).mean()
            loss.backward()
            return loss.item(), model.embedding.word_embeddings.weight.grad.norm().item()

        for impl in ("sdpa", "unfused"):
            first, second, no_dropout = step(0.5, impl), step(0.5, impl), step(0.0, impl)
            assert first == second, (impl, first, second)
            assert first != no_dropout and all(v == v and v > 0 for v in first), (impl, first, no_dropout)
        print("ok", first)
        """
    )
    assert out.startswith("ok")
