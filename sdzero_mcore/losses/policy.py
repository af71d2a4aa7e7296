"""Policy-gradient pieces for the GRPO baseline (DAPO style) on megatron-core models.

* :func:`vocab_parallel_logprobs_entropy`: log p(label) and the softmax entropy from vocab-parallel
  logits [B, S, V_padded / TP], exact at any TP size.
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


class _SumOverTP(torch.autograd.Function):
    """All-reduce SUM whose backward is the identity (megatron's reduce_from_tensor_model_parallel_region).

    Every TP rank computes the same loss from the reduced value, so each shard's gradient is that
    loss's gradient once. ``torch.distributed.nn.functional.all_reduce`` sums the gradient over the
    ranks in backward, which would make it TP times too large here.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def vocab_parallel_logprobs_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``labels`` and entropy of the full softmax, from vocab-parallel logits.

    ``logits`` [..., V_local] is this rank's shard: rank r of ``tp_group`` holds global ids
    [r * V_local, (r + 1) * V_local). ``labels`` has the shape of ``logits`` without the last dim.
    Global ids >= ``vocab_size`` (megatron's vocab padding) are left out of the softmax. A label
    outside [0, vocab_size) (e.g. -100 on a masked-out position) gives a finite, meaningless
    value: mask such positions out of the loss.

    Computed in float32 with one MAX and one SUM all-reduce; differentiable w.r.t. ``logits``,
    with each rank receiving the gradient of its own shard (the loss is replicated over TP).
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

    logits = logits.float()
    first_id = tp_rank * local_vocab
    valid = None
    if vocab_size is not None and first_id + local_vocab > vocab_size:
        valid = torch.arange(first_id, first_id + local_vocab, device=logits.device) < vocab_size
        logits = logits.masked_fill(~valid, float("-inf"))

    # The max only shifts exp() into range and cancels out of every result: no gradient through it.
    # A rank whose shard is all padding has max -inf locally; the MAX over ranks is finite.
    row_max = logits.detach().amax(dim=-1)
    if tp_size > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - row_max.unsqueeze(-1)
    exp_shifted = torch.exp(shifted)  # 0 on padded ids
    if valid is not None:
        shifted = shifted.masked_fill(~valid, 0.0)  # -inf * 0 would be nan in the sum below

    local_ids = labels - first_id
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    label_shifted = torch.gather(shifted, -1, local_ids.clamp(0, local_vocab - 1).unsqueeze(-1)).squeeze(-1)
    sums = torch.stack(
        [exp_shifted.sum(dim=-1), (exp_shifted * shifted).sum(dim=-1), torch.where(owned, label_shifted, 0.0)]
    )
    if tp_size > 1:
        sums = _SumOverTP.apply(sums, tp_group)
    sum_exp, sum_exp_shifted, label_shifted = sums.unbind(0)

    log_sum_exp = torch.log(sum_exp)  # of the shifted logits
    logprobs = label_shifted - log_sum_exp
    entropy = log_sum_exp - sum_exp_shifted / sum_exp  # H = lse - E_p[logit], both shifted alike
    return logprobs, entropy


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
