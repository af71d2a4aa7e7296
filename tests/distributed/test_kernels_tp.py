"""Vocab-parallel kernels: TP = 2 over gloo (two processes) equals TP = 1, loss and gathered gradient."""

import os

import pytest
import torch
import torch.distributed as dist

from sdzero_mcore.parallel import run_local_workers

TP = 2
T, V_LOCAL, K = 6, 150, 24  # 150 is not a multiple of the 128-wide test blocks


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _gather_vocab(local: torch.Tensor) -> torch.Tensor:
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, local.contiguous())
    return torch.cat(shards, dim=-1)


def _loss_and_grad(fn, student):
    student = student.detach().clone().requires_grad_()
    loss = fn(student)
    weights = torch.linspace(-1.0, 2.0, loss.numel()).reshape(loss.shape)
    (grad,) = torch.autograd.grad((loss * weights).sum(), student)
    return loss, grad


def _tp_worker(backend: str):
    from sdzero_kernels import full_kl, teacher_topk, topk_kl

    os.environ["SDZERO_KERNELS_BACKEND"] = backend
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    columns = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        student = (torch.randn(T, TP * V_LOCAL, generator=generator) * 3).to(dtype)
        teacher = (torch.randn(T, TP * V_LOCAL, generator=generator) * 3).to(dtype)
        grad_tol = 1e-5 if dtype == torch.float32 else 2e-2

        logprobs_1, ids_1 = teacher_topk(teacher, K, temperature=0.9)
        logprobs_2, ids_2 = teacher_topk(teacher[:, columns], K, temperature=0.9, tp_group=group)
        assert torch.equal(ids_2, ids_1), "TP merge picked different ids"
        assert _rel(logprobs_2, logprobs_1) < 1e-6

        for tail in ("renorm", "bucket"):
            for kl in ("reverse", "forward", "mixed"):
                options = dict(kl=kl, tail=tail, mixed_weight=0.4, temperature=0.9)
                loss_1, grad_1 = _loss_and_grad(lambda s: topk_kl(s, logprobs_1, ids_1, **options), student)
                loss_2, grad_2 = _loss_and_grad(
                    lambda s: topk_kl(s, logprobs_1, ids_1, tp_group=group, **options), student[:, columns]
                )
                assert _rel(loss_2, loss_1) < 1e-6, (dtype, tail, kl)
                assert _rel(_gather_vocab(grad_2), grad_1) < grad_tol, (dtype, tail, kl)

        for kl in ("reverse", "forward", "mixed"):
            loss_1, grad_1 = _loss_and_grad(lambda s: full_kl(s, teacher, kl=kl, temperature=0.9), student)
            loss_2, grad_2 = _loss_and_grad(
                lambda s: full_kl(s, teacher[:, columns], kl=kl, temperature=0.9, tp_group=group), student[:, columns]
            )
            assert _rel(loss_2, loss_1) < 1e-5, (dtype, kl)
            assert _rel(_gather_vocab(grad_2), grad_1) < grad_tol, (dtype, kl)
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_tp2_equals_tp1(backend):
    run_local_workers(_tp_worker, TP, backend)
