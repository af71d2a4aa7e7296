"""GRPO baseline pieces: group advantages, the DAPO-style loss (hand-worked), vocab-parallel log-probs."""

import math

import pytest
import torch
import torch.distributed as dist
from helpers import peak_allocated_bytes

from sdzero_mcore.losses.policy import group_advantages, grpo_loss, vocab_parallel_logprobs_entropy
from sdzero_mcore.parallel import run_local_workers

TP = 2
B, S, V_LOCAL = 2, 5, 7  # padded vocab TP * V_LOCAL = 14


def test_group_advantages_hand_worked():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    # Row 0: mean 0.5, population std 0.5 -> +-0.5 / 0.5 = +-1.
    # Row 1: all equal -> exactly 0.
    # Row 2: mean 0.75, deviations (2.25, -0.75 x3), variance (5.0625 + 3 * 0.5625) / 4 = 1.6875,
    #        std = 1.299 = 0.75 * sqrt(3) -> (sqrt(3), -1/sqrt(3) x3).
    r3 = math.sqrt(3.0)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [r3, -1 / r3, -1 / r3, -1 / r3]])
    advantages = group_advantages(rewards)
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-5)
    assert torch.equal(advantages[1], torch.zeros(4))

    # 0.1 * 3 / 3 != 0.1 in floating point: an equal group must still give exactly 0.
    assert torch.equal(group_advantages(torch.full((1, 3), 0.1)), torch.zeros(1, 3))
    # Centring only: row 0 -> +-0.5.
    torch.testing.assert_close(
        group_advantages(rewards[:1], normalize_std=False), torch.tensor([[0.5, -0.5, -0.5, 0.5]])
    )
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.ones(4))


# Two sequences x three tokens, clip 0.2 (ratio range [0.8, 1.2]); old log-probs -1 everywhere.
RATIOS = torch.tensor([[1.5, 1.1, 0.5], [0.5, 0.9, 1.5]])
ADVANTAGES = torch.tensor([1.0, -2.0])
OLD_LOGPROBS = torch.full((2, 3), -1.0)
# Per-token surrogate -min(r * A, clip(r) * A):
#   seq 0, A = +1:  r=1.5: min(1.5, 1.2) = 1.2 clipped above   -> -1.2
#                   r=1.1: min(1.1, 1.1)                       -> -1.1
#                   r=0.5: min(0.5, 0.8) = 0.5 (unclipped)     -> -0.5
#   seq 1, A = -2:  r=0.5: min(-1.0, -1.6) = -1.6 clipped below -> +1.6
#                   r=0.9: min(-1.8, -1.8)                      -> +1.8
#                   r=1.5: min(-3.0, -2.4) = -3.0 (unclipped)   -> +3.0
SURROGATE = torch.tensor([[-1.2, -1.1, -0.5], [1.6, 1.8, 3.0]])
CLIPPED = torch.tensor([[True, False, False], [True, False, False]])


def _logprobs() -> torch.Tensor:
    return (OLD_LOGPROBS + RATIOS.log()).requires_grad_()


def test_grpo_loss_hand_worked():
    logprobs = _logprobs()
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss = grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask)
    # (-1.2 - 1.1 - 0.5 + 1.6 + 1.8 + 3.0) / 6 = 3.6 / 6 = 0.6
    assert loss.objective.item() == pytest.approx(0.6, abs=1e-6)
    assert loss.pg_loss.item() == pytest.approx(0.6, abs=1e-6)
    assert loss.clip_fraction.item() == pytest.approx(2 / 6)
    assert loss.num_tokens.item() == 6 and loss.kl is None and loss.entropy is None
    assert not loss.pg_loss.requires_grad

    # Half of a 12-token global batch: the same sum over twice the tokens.
    half = grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask, num_tokens=12)
    assert half.objective.item() == pytest.approx(0.3, abs=1e-6)
    assert half.clip_fraction.item() == pytest.approx(2 / 12)

    # d objective / d logp = d(-r * A)/d logp / N = -A * r / N where the unclipped term is taken,
    # 0 where the clipped one is (constant in r).
    (grad,) = torch.autograd.grad(loss.objective, logprobs)
    expected = torch.where(CLIPPED, 0.0, -ADVANTAGES[:, None] * RATIOS / 6)
    # = [[0, -1.1/6, -0.5/6], [0, 1.8/6, 3.0/6]]
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad[1, 1:], torch.tensor([0.3, 0.5]), rtol=0, atol=1e-6)


def test_grpo_loss_kl_entropy_and_mask_hand_worked():
    logprobs = _logprobs()
    mask = torch.tensor([[True, True, True], [True, True, False]])
    old = OLD_LOGPROBS.clone()
    old[1, 2] = float("-inf")  # garbage on a masked position must not leak into values or gradients
    ln2 = math.log(2.0)
    # ref - logp per token; 5.0 on the masked token would add e^5 - 6 = 142.4 if it leaked.
    ref_minus_logp = torch.tensor([[ln2, 0.0, -ln2], [0.0, ln2, 5.0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.5, 100.0]], requires_grad=True)
    loss = grpo_loss(
        logprobs,
        old,
        ADVANTAGES,
        mask,
        ref_logprobs=logprobs.detach() + ref_minus_logp,
        kl_coef=0.1,
        entropy=entropy,
        entropy_coef=0.01,
    )
    # pg: (-1.2 - 1.1 - 0.5 + 1.6 + 1.8) / 5 = 0.6 / 5 = 0.12
    # k3 = e^d - d - 1: d = ln2 -> 1 - ln2; d = 0 -> 0; d = -ln2 -> 0.5 + ln2 - 1 = ln2 - 0.5
    #     sum = (1 - ln2) + 0 + (ln2 - 0.5) + 0 + (1 - ln2) = 1.5 - ln2, mean (1.5 - ln2) / 5 = 0.161371
    # entropy: (1 + 2 + 3 + 0.5 + 1.5) / 5 = 1.6
    # objective = 0.12 + 0.1 * 0.161371 - 0.01 * 1.6 = 0.1201371
    kl = (1.5 - ln2) / 5
    assert loss.pg_loss.item() == pytest.approx(0.12, abs=1e-6)
    assert loss.kl.item() == pytest.approx(kl, abs=1e-6)
    assert loss.entropy.item() == pytest.approx(1.6, abs=1e-6)
    assert loss.objective.item() == pytest.approx(0.12 + 0.1 * kl - 0.01 * 1.6, abs=1e-6)
    assert loss.clip_fraction.item() == pytest.approx(2 / 5)
    assert loss.num_tokens.item() == 5

    grad_logprobs, grad_entropy = torch.autograd.grad(loss.objective, (logprobs, entropy))
    assert torch.isfinite(grad_logprobs).all() and grad_logprobs[1, 2] == 0
    # The entropy bonus: -entropy_coef / N per masked token.
    torch.testing.assert_close(grad_entropy, torch.where(mask, -0.01 / 5, 0.0), rtol=0, atol=1e-8)
    # k3 adds kl_coef * (1 - e^d) / N to d objective / d logp; at seq 0, token 2 (d = -ln2, unclipped
    # r = 0.5, A = 1): -0.5 / 5 + 0.1 * (1 - 0.5) / 5 = -0.09.
    assert grad_logprobs[0, 2].item() == pytest.approx(-0.09, abs=1e-6)


def test_grpo_loss_errors():
    logprobs, mask = _logprobs(), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask, kl_coef=0.001)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask, entropy_coef=0.001)
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(logprobs, OLD_LOGPROBS[:, :2], ADVANTAGES, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES[:, None].expand(2, 3), mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask.float())
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logprobs, OLD_LOGPROBS, ADVANTAGES, mask, ref_logprobs=OLD_LOGPROBS[:1])


def _values_and_grad(logits: torch.Tensor, labels: torch.Tensor, tp_group, vocab_size: int, chunk_tokens=None):
    logits = logits.detach().clone().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs_entropy(logits, labels, tp_group, vocab_size, chunk_tokens=chunk_tokens)
    # Distinct weights so that a wrong sign or scale in either output's gradient shows.
    weights = torch.linspace(-1.0, 2.0, labels.numel()).reshape(labels.shape)
    (grad,) = torch.autograd.grad((logprobs * weights).sum() + (entropy * weights.flip(0)).sum(), logits)
    return logprobs, entropy, grad


def test_logprobs_entropy_tp1_equals_reference():
    vocab_size = 11
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(B, S, TP * V_LOCAL, generator=generator) * 3
    logits[..., vocab_size:] = 50.0  # padding would dominate the softmax if it were not excluded
    labels = torch.randint(0, vocab_size, (B, S), generator=generator)

    logprobs, entropy, grad = _values_and_grad(logits, labels, None, vocab_size)

    def reference(x: torch.Tensor):
        log_p = torch.log_softmax(x[..., :vocab_size], dim=-1)
        return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)

    ref_logits = logits.double().requires_grad_()
    ref_logprobs, ref_entropy = reference(ref_logits)
    weights = torch.linspace(-1.0, 2.0, labels.numel(), dtype=torch.float64).reshape(labels.shape)
    (ref_grad,) = torch.autograd.grad((ref_logprobs * weights).sum() + (ref_entropy * weights.flip(0)).sum(), ref_logits)

    assert logprobs.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), ref_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-5)
    assert torch.equal(grad[..., vocab_size:], torch.zeros_like(grad[..., vocab_size:]))

    # An ignore label (-100) on a masked-out position stays finite, as does its gradient.
    labels[0, 0] = -100
    logprobs, entropy, grad = _values_and_grad(logits, labels, None, vocab_size)
    assert torch.isfinite(logprobs).all() and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="labels"):
        vocab_parallel_logprobs_entropy(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs_entropy(logits, labels, vocab_size=TP * V_LOCAL + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_entropy_chunked_equals_unchunked(dtype):
    vocab_size = 11
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(B, S, TP * V_LOCAL, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, vocab_size, (B, S), generator=generator)
    labels[1, 2] = -100  # an ignore label on a position the loss would mask out
    whole = _values_and_grad(logits, labels, None, vocab_size, chunk_tokens=B * S)
    for chunk_tokens in (1, 3, 7, B * S - 1, 4 * B * S):
        chunked = _values_and_grad(logits, labels, None, vocab_size, chunk_tokens=chunk_tokens)
        for name, got, expected in zip(("logprobs", "entropy", "grad"), chunked, whole):
            assert got.dtype == expected.dtype
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=f"{name} chunk {chunk_tokens}")
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_logprobs_entropy(logits, labels, vocab_size=vocab_size, chunk_tokens=0)


# Enough tokens and vocabulary that a [T, V] float32 tensor (8 MiB) dwarfs everything else.
MANY_TOKENS, WIDE_VOCAB = 4096, 512


def _wide_logits(dtype=torch.float32):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(1, MANY_TOKENS, WIDE_VOCAB, generator=generator).to(dtype).requires_grad_()
    labels = torch.randint(0, WIDE_VOCAB - 10, (1, MANY_TOKENS), generator=generator)
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_entropy_keep_no_vocab_sized_tensor_for_backward(dtype):
    logits, labels = _wide_logits(dtype)
    saved_bytes = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():  # logits are held anyway
            saved_bytes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprobs, entropy = vocab_parallel_logprobs_entropy(logits, labels, vocab_size=WIDE_VOCAB - 10, chunk_tokens=256)
    # per-token statistics only: a few float32 values per token, not a [T, V] tensor
    assert sum(saved_bytes) <= 16 * MANY_TOKENS * 4
    (logprobs.sum() + entropy.sum()).backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


def test_logprobs_entropy_chunk_size_is_honoured():
    logits, labels = _wide_logits()
    vocab_row_bytes = WIDE_VOCAB * 4

    def forward_backward_peak(chunk_tokens: int) -> int:
        def run():
            logprobs, entropy = vocab_parallel_logprobs_entropy(logits, labels, chunk_tokens=chunk_tokens)
            (logprobs.sum() + entropy.sum()).backward()
            logits.grad = None

        return peak_allocated_bytes(run)

    # beyond the [T, V] gradient itself: two [chunk, V] float32 temporaries at a time, and a few
    # float32 numbers per token
    gradient_bytes = MANY_TOKENS * vocab_row_bytes
    extra = {chunk_tokens: forward_backward_peak(chunk_tokens) - gradient_bytes for chunk_tokens in (64, 256, MANY_TOKENS)}
    for chunk_tokens in (64, 256):
        assert extra[chunk_tokens] <= 2 * chunk_tokens * vocab_row_bytes + 64 * MANY_TOKENS, chunk_tokens
    assert extra[64] < extra[256] < extra[MANY_TOKENS]


def _gather_vocab(local: torch.Tensor) -> torch.Tensor:
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, local.contiguous())
    return torch.cat(shards, dim=-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _tp_worker():
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    columns = slice(rank * V_LOCAL, (rank + 1) * V_LOCAL)
    for dtype in (torch.float32, torch.bfloat16):
        grad_tol = 1e-5 if dtype == torch.float32 else 1e-2
        # No padding; rank 1 partly padding; rank 1 all padding.
        for vocab_size in (TP * V_LOCAL, 10, 6):
            generator = torch.Generator().manual_seed(vocab_size)
            logits = (torch.randn(B, S, TP * V_LOCAL, generator=generator) * 3).to(dtype)
            labels = torch.randint(0, vocab_size, (B, S), generator=generator)
            logprobs_1, entropy_1, grad_1 = _values_and_grad(logits, labels, None, vocab_size)
            for chunk_tokens in (None, 3):  # chunks keep the two all-reduces in step across ranks
                logprobs_2, entropy_2, grad_2 = _values_and_grad(
                    logits[..., columns], labels, group, vocab_size, chunk_tokens=chunk_tokens
                )
                case = f"{dtype} {vocab_size} chunk {chunk_tokens}"
                assert grad_2.dtype == dtype
                torch.testing.assert_close(logprobs_2, logprobs_1, rtol=0, atol=1e-5, msg=case)
                torch.testing.assert_close(entropy_2, entropy_1, rtol=0, atol=1e-5, msg=case)
                assert _rel(_gather_vocab(grad_2), grad_1) < grad_tol, case
    dist.destroy_process_group()


def test_logprobs_entropy_tp2_equals_tp1():
    run_local_workers(_tp_worker, TP)
