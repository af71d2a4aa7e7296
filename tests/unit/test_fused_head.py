"""The fused-linear LM-head ops (sdzero_kernels) against float64 references and against the dense
ops on the same logits, both backends; and a sparse Phase 2 micro-step that holds no [T, V] tensor.

The ops take hidden states [T, H] and an output weight [V, H] with megatron's vocabulary padding
(rows from ``vocab_size`` on), stream the vocabulary in chunks that end mid-vocabulary and at the
padding, and must give what the dense ops give on ``hidden @ weight.T`` (padding masked).
"""

import pytest
import torch
from helpers import host_reads
from sdzero_kernels import (
    full_kl,
    fused_linear_full_kl,
    fused_linear_full_kl_reference,
    fused_linear_teacher_topk,
    fused_linear_teacher_topk_reference,
    fused_linear_topk_kl,
    fused_linear_topk_kl_reference,
    sparse_topk_kl,
    sparse_topk_kl_reference,
    teacher_topk,
    topk_kl,
)

T, H, V, REAL, K, CHUNK = 11, 24, 320, 301, 8, 96  # chunks of 96 over 301 real ids: 96, 96, 96, 13
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
KL_MODES = ["reverse", "forward", "mixed"]


# Triton's CPU interpreter is slow: float32 on both backends, bfloat16 on the PyTorch path (the dtype
# handling is the wrappers', the same for both)
BACKEND_DTYPES = [("triton", torch.float32), ("torch", torch.float32), ("torch", torch.bfloat16)]


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", request.param)
    return request.param


def _use_backend(monkeypatch, backend):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", backend)


def _rel(ours, ref) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def _inputs(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=generator).to(dtype)
    weight = (torch.randn(V, H, generator=generator) * 0.6).to(dtype)
    return hidden, weight


def _dense_logits(hidden, weight):
    """What the model's output layer gives: hidden @ weight.T with the padding at the lowest logit."""
    logits = hidden @ weight.t()
    return logits.masked_fill(torch.arange(V) >= REAL, torch.finfo(logits.dtype).min)


def _loss_and_grads(fn, *params):
    params = [p.detach().clone().requires_grad_() for p in params]
    loss = fn(*params)
    weights = torch.linspace(-1.0, 2.0, loss.numel())
    return loss.detach(), torch.autograd.grad((loss * weights).sum(), params)


def _teacher(seed=7):
    """The teacher's top-K (an input here: the float64 reference, whatever the backend)."""
    hidden, weight = _inputs(torch.float32, seed)
    logprobs, ids = fused_linear_teacher_topk_reference(hidden * 2, weight, K, vocab_size=REAL)
    return logprobs.float(), ids


@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_teacher_topk_is_the_dense_one(monkeypatch, backend, dtype):
    _use_backend(monkeypatch, backend)
    hidden, weight = _inputs(dtype, 1)
    for temperature in (1.0, 0.7):
        logprobs, ids = fused_linear_teacher_topk(hidden, weight, K, temperature=temperature, vocab_size=REAL,
                                                  vocab_chunk=CHUNK)
        dense_logprobs, dense_ids = teacher_topk(_dense_logits(hidden, weight), K, temperature=temperature)
        ref_logprobs, ref_ids = fused_linear_teacher_topk_reference(hidden, weight, K, temperature=temperature,
                                                                    vocab_size=REAL)
        assert torch.equal(ids, dense_ids)  # the same packed keys: ties resolve the same way
        assert (logprobs - dense_logprobs).abs().max() < 1e-5
        if dtype == torch.float32:
            assert torch.equal(ids, ref_ids) and _rel(logprobs, ref_logprobs) < 1e-6


def test_teacher_topk_ties_go_to_the_lower_id_across_chunks(backend):
    weight = torch.zeros(V, H)
    weight[[250, 7, 120], 0] = 1.0  # a three-way tie, in three different chunks
    logprobs, ids = fused_linear_teacher_topk(torch.ones(2, H), weight, 4, vocab_size=REAL, vocab_chunk=CHUNK)
    assert ids.tolist() == [[7, 120, 250, 0]] * 2
    assert torch.equal(ids, teacher_topk(_dense_logits(torch.ones(2, H), weight), 4)[1])


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_sparse_renorm_is_the_dense_one(monkeypatch, backend, dtype, kl):
    _use_backend(monkeypatch, backend)
    hidden, weight = _inputs(dtype, 2)
    teacher_logprobs, teacher_ids = _teacher()
    options = dict(kl=kl, mixed_weight=0.3, temperature=0.9)
    loss, (grad_h, grad_w) = _loss_and_grads(
        lambda h, w: sparse_topk_kl(h, w, teacher_logprobs, teacher_ids, **options), hidden, weight)
    dense, (dense_h, dense_w) = _loss_and_grads(
        lambda h, w: topk_kl(_dense_logits(h, w), teacher_logprobs, teacher_ids, tail="renorm", **options),
        hidden, weight)
    ref, (ref_h, ref_w) = _loss_and_grads(
        lambda h, w: sparse_topk_kl_reference(h, w, teacher_logprobs, teacher_ids, **options),
        hidden.double(), weight.double())
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == dtype
    assert _rel(loss, ref) < TOLERANCE[dtype] and _rel(grad_h, ref_h) < TOLERANCE[dtype]
    assert _rel(grad_w, ref_w) < TOLERANCE[dtype]
    if dtype == torch.float32:
        assert _rel(loss, dense) < 1e-6 and _rel(grad_h, dense_h) < 1e-5 and _rel(grad_w, dense_w) < 1e-5
    # the weight's gradient lives on the teacher's ids only
    touched = torch.zeros(V, dtype=torch.bool)
    touched[teacher_ids.reshape(-1)] = True
    assert (grad_w[~touched] == 0).all() and (grad_w[touched].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_fused_bucket_is_the_dense_one(monkeypatch, backend, dtype, kl):
    _use_backend(monkeypatch, backend)
    hidden, weight = _inputs(dtype, 3)
    teacher_logprobs, teacher_ids = _teacher()
    options = dict(kl=kl, mixed_weight=0.3, temperature=0.9, tail="bucket")
    loss, (grad_h, grad_w) = _loss_and_grads(
        lambda h, w: fused_linear_topk_kl(h, w, teacher_logprobs, teacher_ids, vocab_size=REAL, vocab_chunk=CHUNK,
                                          **options), hidden, weight)
    dense, (dense_h, dense_w) = _loss_and_grads(
        lambda h, w: topk_kl(_dense_logits(h, w), teacher_logprobs, teacher_ids, **options), hidden, weight)
    ref, (ref_h, ref_w) = _loss_and_grads(
        lambda h, w: fused_linear_topk_kl_reference(h, w, teacher_logprobs, teacher_ids, vocab_size=REAL, **options),
        hidden.double(), weight.double())
    assert _rel(loss, ref) < TOLERANCE[dtype] and _rel(grad_h, ref_h) < TOLERANCE[dtype]
    assert _rel(grad_w[:REAL], ref_w[:REAL]) < TOLERANCE[dtype] and (grad_w[REAL:] == 0).all()
    if dtype == torch.float32:
        assert _rel(loss, dense) < 1e-6 and _rel(grad_h, dense_h) < 1e-5 and _rel(grad_w, dense_w) < 1e-5


@pytest.mark.parametrize("kl", KL_MODES)
def test_fused_full_kl_is_the_dense_one(backend, kl):
    hidden, weight = _inputs(torch.float32, 4)
    teacher_hidden, teacher_weight = _inputs(torch.float32, 5)
    options = dict(kl=kl, mixed_weight=0.3, temperature=0.9)
    loss, (grad_h, grad_w) = _loss_and_grads(
        lambda h, w: fused_linear_full_kl(h, w, teacher_hidden, teacher_weight, vocab_size=REAL, vocab_chunk=CHUNK,
                                          **options), hidden, weight)
    dense, (dense_h, dense_w) = _loss_and_grads(
        lambda h, w: full_kl(_dense_logits(h, w), _dense_logits(teacher_hidden, teacher_weight), **options),
        hidden, weight)
    ref, (ref_h, ref_w) = _loss_and_grads(
        lambda h, w: fused_linear_full_kl_reference(h, w, teacher_hidden, teacher_weight, vocab_size=REAL, **options),
        hidden.double(), weight.double())
    assert _rel(loss, ref) < 1e-6 and _rel(grad_h, ref_h) < 1e-5 and _rel(grad_w[:REAL], ref_w[:REAL]) < 1e-5
    assert _rel(loss, dense) < 1e-5 and _rel(grad_h, dense_h) < 1e-5 and _rel(grad_w, dense_w) < 1e-5


def test_empty_rows(backend):
    hidden, weight = _inputs(torch.float32, 6)
    logprobs, ids = fused_linear_teacher_topk(hidden[:0], weight, K, vocab_size=REAL)
    assert logprobs.shape == ids.shape == (0, K)
    for tail in ("renorm", "bucket"):
        assert fused_linear_topk_kl(hidden[:0], weight, logprobs, ids, tail=tail, vocab_size=REAL).shape == (0,)


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda h, w, lp, ids: fused_linear_teacher_topk(h, w[:, :-1], K), r"must share the hidden size"),
        (lambda h, w, lp, ids: fused_linear_teacher_topk(h, w.double(), K), "weight must be bfloat16"),
        (lambda h, w, lp, ids: fused_linear_teacher_topk(h, w.bfloat16(), K), "must have one dtype"),
        (lambda h, w, lp, ids: fused_linear_teacher_topk(h, w, K, vocab_chunk=0), "vocab_chunk must be a positive"),
        (lambda h, w, lp, ids: fused_linear_teacher_topk(h, w, K, vocab_size=0), "vocab_size must be a positive"),
        (lambda h, w, lp, ids: fused_linear_teacher_topk(h, w, 302, vocab_size=REAL), "k=302 is larger than the vocab"),
        (lambda h, w, lp, ids: sparse_topk_kl(h, w, lp[:2], ids[:2]), "teacher_logprobs must be"),
        (lambda h, w, lp, ids: sparse_topk_kl(h, w, lp, ids.clone().fill_(V)), r"teacher_ids must lie in \[0, 320\)"),
        (lambda h, w, lp, ids: sparse_topk_kl(h[0], w, lp, ids), "hidden must be 2-D"),
        (lambda h, w, lp, ids: fused_linear_topk_kl(h, w, lp, ids, tail="drop"), "tail must be one of"),
        (lambda h, w, lp, ids: fused_linear_full_kl(h, w, h[:2], w), "teacher_hidden .* must match"),
    ],
)
def test_bad_arguments_name_the_problem(call, named, monkeypatch):
    _use_backend(monkeypatch, "torch")
    hidden, weight = _inputs(torch.float32, 8)
    logprobs, ids = _teacher()
    with pytest.raises(ValueError, match=named):
        call(hidden, weight, logprobs, ids)


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_sparse_loss_reads_nothing_on_the_host(monkeypatch, tail):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", "torch")
    hidden, weight = (t.requires_grad_() for t in _inputs(torch.float32, 9))
    logprobs, ids = _teacher()

    def step():
        loss = fused_linear_topk_kl(hidden, weight, logprobs, ids, kl="mixed", tail=tail, vocab_size=REAL,
                                    vocab_chunk=CHUNK)
        (loss * torch.linspace(0, 1, T)).sum().backward()

    assert host_reads(step) == []
    assert torch.isfinite(weight.grad).all() and torch.isfinite(hidden.grad).all()
