"""Policy-gradient pieces for the GRPO baseline (DAPO style) on megatron-core models.

* :func:`vocab_parallel_logprobs_entropy`: log p(label) and the softmax entropy from vocab-parallel
  logits [B, S, V_padded / TP], exact at any TP size (``grpo.lm_head: dense``, the reference).
* :func:`sparse_logprobs_entropy`: the same numbers at the response positions only, from the
  final-norm hidden states there and the output weight (``grpo.lm_head: sparse``): the kernel
  ``fused_linear_logprobs_entropy`` streams the vocabulary in chunks, no [T, V] logits.
* :func:`group_advantages`: rewards normalised within each group of rollouts of one prompt.
* :func:`grpo_loss`: the clipped surrogate with a k3 KL penalty and an entropy bonus, aggregated
  over tokens (DAPO): every masked token of the batch weighs the same, whatever its sequence's length.

Sign convention: ``objective`` is minimised; advantage > 0 makes the sampled tokens more likely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from sdzero_kernels import VOCAB_CHUNK, fused_linear_logprobs_entropy

from sdzero_mcore.losses.distill import StudentHead


# Tokens per chunk when the caller does not choose: a [chunk, V / TP] float32 temporary of at most
# 256 MiB (441 tokens at TP = 1 with Qwen's 151936-token vocabulary).
LOGITS_CHUNK_ELEMENTS = 1 << 26


def _masked_float_chunk(flat_logits: torch.Tensor, rows: slice, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows of the logits in float32 with padded ids at -inf; may be a view of float32 logits (not
    to be modified in place)."""
    chunk = flat_logits[rows].float()
    return chunk if valid is None else chunk.masked_fill(~valid, float("-inf"))


def _shifted_chunk(flat_logits: torch.Tensor, rows: slice, row_max: torch.Tensor, valid: Optional[torch.Tensor]):
    """z - row max for the rows, in float32 with padded ids at -inf: a new tensor."""
    shifted = flat_logits[rows].float() - row_max[rows].unsqueeze(-1)
    return shifted if valid is None else shifted.masked_fill_(~valid, float("-inf"))


# The per-chunk work is in functions so that a chunk's temporaries are freed when they return,
# before the next chunk's exist (a loop body's locals live on into the next iteration).


def _chunk_sums(flat_logits, rows, row_max, valid, label_columns, owned) -> torch.Tensor:
    """[3, rows]: sum exp(shifted), sum exp(shifted) * shifted, the label's shifted logit (0 off this shard)."""
    shifted = _shifted_chunk(flat_logits, rows, row_max, valid)
    exp_shifted = torch.exp(shifted)  # 0 on padded ids
    if valid is not None:
        shifted.masked_fill_(~valid, 0.0)  # -inf * 0 would be nan in the sum below
    label_shifted = torch.gather(shifted, -1, label_columns[rows]).squeeze(-1)
    return torch.stack(
        [exp_shifted.sum(dim=-1), exp_shifted.mul_(shifted).sum(dim=-1), torch.where(owned[rows], label_shifted, 0.0)]
    )


def _chunk_grad(flat_logits, rows, row_max, valid, label_columns, owned, log_sum_exp, mean_shifted,
                grad_logprobs, grad_entropy) -> torch.Tensor:
    """The gradient of the rows' logits, in float32."""
    shifted = _shifted_chunk(flat_logits, rows, row_max, valid)
    probs = (shifted - log_sum_exp[rows].unsqueeze(-1)).exp_()  # 0 on padded ids
    if valid is not None:
        shifted.masked_fill_(~valid, 0.0)
    # d logprob / dz_j = [j = label] - p_j;  d entropy / dz_j = -p_j (z_j - E_p[z])
    grad = shifted.sub_(mean_shifted[rows].unsqueeze(-1)).mul_(grad_entropy[rows].unsqueeze(-1))
    grad = grad.add_(grad_logprobs[rows].unsqueeze(-1)).mul_(probs).neg_()
    on_label = torch.where(owned[rows], grad_logprobs[rows], 0.0).unsqueeze(-1)
    return grad.scatter_add_(-1, label_columns[rows], on_label)


def _valid_ids(first_id: int, local_vocab: int, vocab_size: Optional[int], device) -> Optional[torch.Tensor]:
    """Which of this shard's ids are real (not vocab padding); None when all are."""
    if vocab_size is None or first_id + local_vocab <= vocab_size:
        return None
    return torch.arange(first_id, first_id + local_vocab, device=device) < vocab_size


def _label_columns(flat_labels: torch.Tensor, first_id: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's column in this shard (clamped into range) and whether this shard holds it."""
    local_ids = flat_labels - first_id
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    return local_ids.clamp(0, local_vocab - 1).unsqueeze(-1), owned


class _VocabParallelLogprobsEntropy(torch.autograd.Function):
    """Forward and backward of :func:`vocab_parallel_logprobs_entropy`, ``chunk_tokens`` rows at a time.

    Autograd through the plain expression keeps about four float32 [T, V / TP] tensors for the
    backward. This keeps three float32 numbers per token (the row max, the log-sum-exp and the mean
    shifted logit) and recomputes the softmax chunk by chunk in the backward, where each rank's
    gradient needs only its own shard and those statistics, the same on every rank (no collective;
    the loss is replicated over TP, so each shard's gradient is that loss's gradient once).
    """

    @staticmethod
    def forward(ctx, flat_logits, flat_labels, tp_group, first_id, vocab_size, chunk_tokens):
        tokens, local_vocab = flat_logits.shape
        valid = _valid_ids(first_id, local_vocab, vocab_size, flat_logits.device)
        chunks = [slice(start, start + chunk_tokens) for start in range(0, tokens, chunk_tokens)]

        # The max only shifts exp() into range and cancels out of every result. A rank whose shard
        # is all padding has max -inf locally; the MAX over ranks is finite.
        row_max = torch.empty(tokens, dtype=torch.float32, device=flat_logits.device)
        for rows in chunks:
            row_max[rows] = _masked_float_chunk(flat_logits, rows, valid).amax(dim=-1)
        if tp_group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)

        label_columns, owned = _label_columns(flat_labels, first_id, local_vocab)
        sums = torch.empty(3, tokens, dtype=torch.float32, device=flat_logits.device)
        for rows in chunks:
            sums[:, rows] = _chunk_sums(flat_logits, rows, row_max, valid, label_columns, owned)
        if tp_group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
        sum_exp, sum_exp_shifted, label_shifted = sums.unbind(0)

        log_sum_exp = torch.log(sum_exp)  # of the shifted logits
        mean_shifted = sum_exp_shifted / sum_exp  # E_p[shifted logit]
        logprobs = label_shifted - log_sum_exp
        entropy = log_sum_exp - mean_shifted  # H = lse - E_p[logit], both shifted alike
        ctx.save_for_backward(flat_logits, flat_labels, row_max, log_sum_exp, mean_shifted)
        ctx.first_id, ctx.vocab_size, ctx.chunk_tokens = first_id, vocab_size, chunk_tokens
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        flat_logits, flat_labels, row_max, log_sum_exp, mean_shifted = ctx.saved_tensors
        tokens, local_vocab = flat_logits.shape
        valid = _valid_ids(ctx.first_id, local_vocab, ctx.vocab_size, flat_logits.device)
        label_columns, owned = _label_columns(flat_labels, ctx.first_id, local_vocab)
        grad_logprobs, grad_entropy = grad_logprobs.float(), grad_entropy.float()

        grad_logits = torch.empty_like(flat_logits)
        for start in range(0, tokens, ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            grad_logits[rows] = _chunk_grad(flat_logits, rows, row_max, valid, label_columns, owned, log_sum_exp,
                                            mean_shifted, grad_logprobs, grad_entropy)
        return grad_logits, None, None, None, None, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_tokens: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``labels`` and entropy of the full softmax, from vocab-parallel logits.

    ``logits`` [..., V_local] is this rank's shard: rank r of ``tp_group`` holds global ids
    [r * V_local, (r + 1) * V_local). ``labels`` has the shape of ``logits`` without the last dim.
    Global ids >= ``vocab_size`` (megatron's vocab padding) are left out of the softmax. A label
    outside [0, vocab_size) (e.g. -100 on a masked-out position) gives a finite, meaningless
    value: mask such positions out of the loss.

    Computed in float32, ``chunk_tokens`` tokens at a time (default: as many as make a 256 MiB
    float32 chunk), with one MAX and one SUM all-reduce whatever the chunking; differentiable w.r.t.
    ``logits``, with each rank receiving the gradient of its own shard (the loss is replicated over
    TP). The backward keeps three float32 numbers per token, not [T, V_local] tensors.
    Returns (logprobs, entropy), both float32 of the shape of ``labels``.
    """
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have the shape of logits without its vocab dim {tuple(logits.shape[:-1])}; "
            f"got {tuple(labels.shape)}"
        )
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    local_vocab = logits.shape[-1]
    if vocab_size is not None and not 1 <= vocab_size <= tp_size * local_vocab:
        raise ValueError(f"vocab_size must be in [1, {tp_size * local_vocab}] (TP x V_local), got {vocab_size}")
    if chunk_tokens is None:
        chunk_tokens = max(1, LOGITS_CHUNK_ELEMENTS // local_vocab)
    elif chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")

    logprobs, entropy = _VocabParallelLogprobsEntropy.apply(
        logits.reshape(-1, local_vocab),
        labels.reshape(-1),
        tp_group if tp_size > 1 else None,
        tp_rank * local_vocab,
        vocab_size,
        chunk_tokens,
    )
    return logprobs.view(labels.shape), entropy.view(labels.shape)


def sparse_logprobs_entropy(
    hidden: torch.Tensor,
    head: StudentHead,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vocab_parallel_logprobs_entropy` at the response rows only: ``hidden`` [T_local, H]
    the final-norm hidden states at ``head.rows`` (``losses.distill.response_hidden``), ``labels``
    [B, s_local] this rank's labels. Returns (logprobs, entropy) [B, s_local] float32, 0 off the
    rows (positions the loss masks out)."""
    flat_labels = labels.reshape(-1).index_select(0, head.rows)
    logprobs, entropy = fused_linear_logprobs_entropy(
        hidden, head.weight, flat_labels, tp_group=tp_group, vocab_size=head.vocab_size, vocab_chunk=vocab_chunk)
    batch_size, local_len = head.local_shape

    def placed(per_row: torch.Tensor) -> torch.Tensor:
        return per_row.new_zeros(batch_size * local_len).index_copy(0, head.rows, per_row).view(batch_size, local_len)

    return placed(logprobs), placed(entropy)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True) -> torch.Tensor:
    """GRPO advantages: (r - group mean) / (group std + eps) for rewards [num_groups, group_size].

    The std is the population std (unbiased=False): the group is the whole set being normalised,
    not a sample, and binary rewards split evenly map to exactly +-1. (TRL and verl use the unbiased
    estimator, which gives advantages smaller by sqrt((n - 1) / n), 0.87 at n = 4.)
    ``normalize_std=False`` only centres (Dr. GRPO). A group whose rewards are all equal carries no
    signal and gets exactly 0 (its float mean may differ from its rewards in the last bit).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    advantages = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(constant, 0.0)


@dataclass
class PolicyLoss:
    """The GRPO objective and its parts.

    ``objective`` carries the gradient. The others are detached 0-dim tensors (no device sync)
    aggregated like the objective (sum over masked tokens / num_tokens), so with the global token
    count passed to every micro-batch their sums over micro-batches are the global batch's values.
    ``kl`` and ``entropy`` are None when their inputs were not given.
    """

    objective: torch.Tensor
    pg_loss: torch.Tensor
    kl: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
    clip_fraction: torch.Tensor
    num_tokens: torch.Tensor  # masked tokens in this call


def _check_like(name: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must have shape {shape} (that of logprobs), got {got}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    num_tokens: Optional[Union[int, float, torch.Tensor]] = None,
) -> PolicyLoss:
    """DAPO-style GRPO loss on per-token log-probs [B, S] with one advantage per sequence [B].

    Per token: ratio = exp(logprobs - old_logprobs) and surrogate
    -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A). The objective is

        sum_masked(surrogate) / N + kl_coef * sum_masked(k3) / N - entropy_coef * sum_masked(entropy) / N

    with k3 = exp(ref - logp) - (ref - logp) - 1 (low-variance, unbiased estimate of KL(pi || ref))
    and N = ``num_tokens``, by default ``mask.sum()``. The GRPO phase passes N = 1, which makes every
    term a masked sum: the trainer's per-token contract divides by the global batch's token count.
    ``old_logprobs``, ``ref_logprobs`` and ``advantages`` are treated as constants. Positions where
    ``mask`` is False may hold anything, non-finite included.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [batch, seq], got shape {tuple(logprobs.shape)}")
    shape = tuple(logprobs.shape)
    _check_like("old_logprobs", old_logprobs, shape)
    _check_like("mask", mask, shape)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) != shape[:1]:
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must have shape {shape[:1]} (one per sequence of logprobs), got {got}")
    if ref_logprobs is not None:
        _check_like("ref_logprobs", ref_logprobs, shape)
    elif kl_coef != 0.0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if entropy is not None:
        _check_like("entropy", entropy, shape)
    elif entropy_coef != 0.0:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")
    if not (0.0 <= clip_low < 1.0 and clip_high >= 0.0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")

    num_masked = mask.sum()
    denominator = torch.as_tensor(num_masked if num_tokens is None else num_tokens, device=logprobs.device)
    denominator = denominator.to(torch.float32).clamp_min(1.0)  # an all-masked micro-batch adds 0

    def token_sum(per_token: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, per_token, 0.0).sum() / denominator

    logprobs = logprobs.float()
    # Masked before exp(): a padding position with -inf logprobs would otherwise send nan into backward.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach().float(), 0.0)
    ratio = torch.exp(log_ratio)
    advantage = advantages.detach().float().unsqueeze(1)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantage
    pg_loss = token_sum(-torch.minimum(unclipped, clipped))
    objective = pg_loss

    kl = None
    if ref_logprobs is not None:
        ref_minus_logp = torch.where(mask, ref_logprobs.detach().float() - logprobs, 0.0)
        kl = token_sum(torch.exp(ref_minus_logp) - ref_minus_logp - 1.0)
        if kl_coef != 0.0:
            objective = objective + kl_coef * kl

    mean_entropy = None
    if entropy is not None:
        mean_entropy = token_sum(entropy.float())
        if entropy_coef != 0.0:
            objective = objective - entropy_coef * mean_entropy

    return PolicyLoss(
        objective=objective,
        pg_loss=pg_loss.detach(),
        kl=kl.detach() if kl is not None else None,
        entropy=mean_entropy.detach() if mean_entropy is not None else None,
        clip_fraction=token_sum((clipped < unclipped).float()).detach(),
        num_tokens=num_masked.detach(),
    )
