"""sdzero_kernels against float64 references: every mode, dtype and shape class, both backends.

On CPU the "triton" backend runs the Triton kernels in Triton's interpreter (TRITON_INTERPRET=1,
set by conftest); the "torch" backend is the chunked PyTorch path CPU training uses. Outputs are
allocated poisoned (NaN / a sentinel id), so an element a kernel forgets to write fails the test.
"""

import pytest
import torch
from helpers import host_reads
from sdzero_kernels import (
    TAIL_MASS_FLOOR,
    full_kl,
    full_kl_reference,
    teacher_topk,
    teacher_topk_reference,
    topk_kl,
    topk_kl_reference,
)

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative error bounds of the issue: max |ours - ref| / max |ref|.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Shape classes: a vocab that is not a multiple of the 128-wide test blocks, [B, S, V], T = 1, K = 256.
SHAPES = {"T,V": ((7, 333), 11), "B,S,V": ((2, 3, 300), 16), "T=1": ((1, 257), 5), "k=256": ((3, 300), 256)}
KL_MODES = ["reverse", "forward", "mixed"]
POISON_ID = -777


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """torch.empty / empty_like hand out NaN (floats) or POISON_ID (integers) during each test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        elif tensor.dtype != torch.bool:
            tensor.fill_(POISON_ID)
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape
    return ((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _logits(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def _grad_and_ref_grad(ours_fn, ref_fn, student):
    """Gradient of sum(w * loss) for a random per-token weight w, for ours and the float64 reference."""
    student = student.detach().requires_grad_()
    loss = ours_fn(student)
    weights = torch.randn(loss.shape, generator=torch.Generator().manual_seed(99))
    (grad,) = torch.autograd.grad((loss * weights).sum(), student)
    student64 = student.detach().double().requires_grad_()
    ref = ref_fn(student64)
    (ref_grad,) = torch.autograd.grad((ref * weights.double()).sum(), student64)
    return loss, ref, grad, ref_grad


@pytest.mark.parametrize("shape_class", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_teacher_topk_matches_reference(backend, dtype, shape_class):
    shape, k = SHAPES[shape_class]
    logits = _logits(shape, dtype, seed=1)
    for temperature in (1.0, 0.7):
        logprobs, ids = teacher_topk(logits, k, temperature=temperature)
        ref_logprobs, ref_ids = teacher_topk_reference(logits, k, temperature=temperature)
        assert logprobs.dtype == torch.float32 and ids.dtype == torch.int64
        assert logprobs.shape == ids.shape == (*shape[:-1], k)
        assert _rel_err(logprobs, ref_logprobs) < 1e-5  # values are exact in every input dtype
        # sorted descending, and (at temperature 1, where scaling cannot merge values) the same ids
        assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()
        if temperature == 1.0:
            assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize("shape_class", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_kl_matches_reference(backend, dtype, shape_class, kl, tail):
    shape, k = SHAPES[shape_class]
    student, teacher = _logits(shape, dtype, seed=2), _logits(shape, dtype, seed=3)
    teacher_logprobs, teacher_ids = teacher_topk(teacher, k, temperature=1.3)
    options = dict(kl=kl, tail=tail, mixed_weight=0.3, temperature=1.3)
    loss, ref, grad, ref_grad = _grad_and_ref_grad(
        lambda s: topk_kl(s, teacher_logprobs, teacher_ids, **options),
        lambda s: topk_kl_reference(s, teacher_logprobs, teacher_ids, **options),
        student,
    )
    assert loss.dtype == torch.float32 and loss.shape == shape[:-1]
    assert grad.dtype == dtype and grad.shape == student.shape
    # The loss is computed in float32 from the same inputs in every dtype.
    assert _rel_err(loss, ref) < 1e-5
    assert _rel_err(grad, ref_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("kl", KL_MODES)
@pytest.mark.parametrize("shape_class", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_kl_matches_reference(backend, dtype, shape_class, kl):
    shape, _ = SHAPES[shape_class]
    student, teacher = _logits(shape, dtype, seed=4), _logits(shape, dtype, seed=5)
    options = dict(kl=kl, mixed_weight=0.7, temperature=0.8)
    loss, ref, grad, ref_grad = _grad_and_ref_grad(
        lambda s: full_kl(s, teacher, **options), lambda s: full_kl_reference(s, teacher, **options), student
    )
    assert loss.shape == shape[:-1] and grad.dtype == dtype
    assert _rel_err(loss, ref) < 1e-5
    assert _rel_err(grad, ref_grad) < TOLERANCE[dtype]


# ------------------------------------------------------------------------------------------
# Mathematical properties


@pytest.mark.parametrize("kl", KL_MODES)
def test_zero_when_student_equals_teacher(backend, kl):
    logits = _logits((5, 300), torch.float32, seed=6)
    student = logits.clone().requires_grad_()
    loss = full_kl(student, logits, kl=kl)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    assert loss.abs().max() == 0 and grad.abs().max() == 0  # exactly: the same numbers on both sides
    teacher_logprobs, teacher_ids = teacher_topk(logits, 20)
    for tail in ("renorm", "bucket"):
        student = logits.clone().requires_grad_()
        loss = topk_kl(student, teacher_logprobs, teacher_ids, kl=kl, tail=tail)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert loss.abs().max() < 1e-6 and grad.abs().max() < 1e-6, tail


def test_bucket_reverse_kl_is_nonnegative(backend):
    student = _logits((64, 300), torch.float32, seed=7, scale=5.0)
    teacher_logprobs, teacher_ids = teacher_topk(_logits((64, 300), torch.float32, seed=8, scale=5.0), 8)
    loss = topk_kl(student, teacher_logprobs, teacher_ids, kl="reverse", tail="bucket")
    # A proper divergence over K + 1 classes; the tail-mass floor can shift it by at most the floor.
    assert loss.min() >= -TAIL_MASS_FLOOR
    assert loss.max() > 0.1  # and these random distributions really differ


def test_renorm_gradient_is_zero_outside_teacher_ids(backend):
    student = _logits((6, 300), torch.bfloat16, seed=9).requires_grad_()
    teacher_logprobs, teacher_ids = teacher_topk(_logits((6, 300), torch.bfloat16, seed=10), 12)
    loss = topk_kl(student, teacher_logprobs, teacher_ids, kl="mixed", tail="renorm")
    (grad,) = torch.autograd.grad(loss.sum(), student)
    inside = torch.zeros_like(grad, dtype=torch.bool).scatter(1, teacher_ids, True)
    assert (grad[~inside] == 0).all()
    assert (grad[inside] != 0).float().mean() > 0.9  # and the ids themselves do get gradient


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_kl_forward_and_backward_read_nothing_on_the_host(monkeypatch, tail):
    """Per call, on a GPU: no .item() in the argument checks, no boolean-mask indexing (a data-dependent
    shape) in the backward's scatter. The PyTorch path runs the same checks and scatter as Triton's."""
    monkeypatch.setenv("SDZERO_KERNELS_BACKEND", "torch")
    student = _logits((2, 3, 300), torch.float32, seed=3).requires_grad_()
    logprobs, ids = teacher_topk(_logits((2, 3, 300), torch.float32, seed=4), 8)
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    reads = host_reads(lambda: (topk_kl(student, logprobs, ids, kl="mixed", tail=tail) * weights).sum().backward())
    assert reads == []
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_teacher_topk_ties_go_to_the_lower_id(backend):
    logits = torch.zeros(2, 300, dtype=torch.bfloat16)
    logits[0, [250, 7, 120]] = 5.0  # a three-way tie at the top
    logits[1, :] = 1.0  # everything tied
    logprobs, ids = teacher_topk(logits, 4)
    assert ids[0].tolist() == [7, 120, 250, 0] and ids[1].tolist() == [0, 1, 2, 3]
    assert torch.allclose(logprobs[1], torch.full((4,), -torch.log(torch.tensor(300.0)).item()))


def test_empty_batch(backend):
    logprobs, ids = teacher_topk(torch.zeros(0, 50), 3)
    assert logprobs.shape == ids.shape == (0, 3)
    assert full_kl(torch.zeros(0, 50), torch.zeros(0, 50)).shape == (0,)


# ------------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument


@pytest.mark.parametrize(
    "call, named",
    [
        (lambda s, lp, ids: teacher_topk(s, 301), "k=301 is larger than the vocabulary size 300"),
        (lambda s, lp, ids: teacher_topk(s, 0), "k must be a positive int"),
        (lambda s, lp, ids: teacher_topk(torch.randn(2, 400), 257), "k=257 is larger than the supported maximum 256"),
        (lambda s, lp, ids: teacher_topk(s.int(), 3), "logits must be bfloat16, float16 or float32"),
        (lambda s, lp, ids: teacher_topk(s[0], 3), r"logits must be \[T, V\]"),
        (lambda s, lp, ids: teacher_topk(s, 3, temperature=0), "temperature must be a number > 0"),
        (lambda s, lp, ids: topk_kl(s, lp, ids.clone().fill_(300)), r"teacher_ids must lie in \[0, 300\)"),
        (lambda s, lp, ids: topk_kl(s, lp, ids.masked_fill(ids == ids[0, 0], -5)), r"found ids in \[-5, "),
        (lambda s, lp, ids: topk_kl(s, lp[:1], ids[:1]), "teacher_logprobs must be"),
        (lambda s, lp, ids: topk_kl(s, lp, ids[:, :2]), "teacher_ids must have the shape of teacher_logprobs"),
        (lambda s, lp, ids: topk_kl(s, lp, ids.float()), "teacher_ids must be int64 or int32"),
        (lambda s, lp, ids: topk_kl(s, lp, ids, kl="jsd"), "kl must be one of reverse, forward, mixed; got 'jsd'"),
        (lambda s, lp, ids: topk_kl(s, lp, ids, tail="drop"), "tail must be one of renorm, bucket"),
        (lambda s, lp, ids: topk_kl(s, lp, ids, kl="mixed", mixed_weight=1.5), r"mixed_weight must be in \[0, 1\]"),
        (lambda s, lp, ids: topk_kl(s.double(), lp, ids), "student_logits must be bfloat16, float16 or float32"),
        (lambda s, lp, ids: full_kl(s, s[:, :-1]), "teacher_logits must have the shape of student_logits"),
        (lambda s, lp, ids: full_kl(s, s.bfloat16()), "teacher_logits must have the dtype of student_logits"),
        (lambda s, lp, ids: full_kl(s, s, kl="kl"), "kl must be one of"),
    ],
)
def test_bad_arguments_name_the_problem(call, named):
    student = torch.randn(4, 300)
    teacher_logprobs, teacher_ids = teacher_topk(torch.randn(4, 300), 5)
    with pytest.raises(ValueError, match=named):
        call(student, teacher_logprobs, teacher_ids)
