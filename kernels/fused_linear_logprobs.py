"""fused_linear_logprobs_entropy: the sampled token's log-probability and the softmax entropy (what
GRPO needs) from the hidden states and the output weight, without a [T, V] logit tensor.

The math is ``vocab_parallel_logprobs_entropy``'s (sdzero_mcore/losses/policy.py) on the logits
z = h W^T / temperature: log p(label) = z_label - lse and H = lse - E_p[z], with the log-sum-exp
and E_p[z] combined over TP by a MAX then a SUM all-reduce and the label's logit summed over TP
(each id lives on one rank).

  forward: for each vocabulary chunk of this TP rank's shard, the chunk's logits [T, chunk] (one
  matmul in the model's dtype, then float32), folded into a running (max, sum of exp, sum of
  exp x logit; the sums in float64) and read at the labels that fall in the chunk.
  backward: the chunk's logits recomputed, d logp / dz_v = [v = label] - p_v and
  dH / dz_v = -p_v (z_v - E_p[z]) weighted by the incoming gradients, then dh += g @ W_chunk and
  dW_chunk = g.T @ h (``fused_linear_grads``); dh is summed over TP.

  Saved for the backward: h, the weight (the parameter itself), the labels, the log-sum-exp and
  E_p[z] (float32 [T] each). At most one [T, chunk] block of logits (and its gradient) is alive.

Rows of the weight from ``vocab_size`` on (megatron's vocabulary padding) are skipped: the dense
path leaves them out of the softmax. A label outside [0, vocab_size) gives a finite, meaningless
log-prob (as the dense path does): such positions are the caller's to mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from sdzero_kernels._common import (
    VOCAB_CHUNK,
    OnlineSoftmax,
    all_reduce_sum,
    check_hidden_and_weight,
    check_same_device,
    check_temperature,
    check_vocab_chunk,
    chunk_logits,
    fused_linear_grads,
    main_grad_of,
    local_teacher_ids,
    shard_vocab_rows,
    vocab_chunks,
)


def _label_in_chunk(columns: torch.Tensor, owned: torch.Tensor, start: int, stop: int):
    """(whether each row's label lies in this shard's rows [start, stop), its column there (clamped))."""
    return owned & (columns >= start) & (columns < stop), (columns - start).clamp(0, stop - start - 1)


class _FusedLinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_temp, tp_group, vocab_size, vocab_chunk):
        columns, owned = local_teacher_ids(labels, weight.shape[0], tp_group)
        _, real_rows = shard_vocab_rows(weight.shape[0], vocab_size, tp_group)
        stats = OnlineSoftmax(hidden.shape[0], 1, hidden.device)
        label_logit = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        chunks = vocab_chunks(real_rows, vocab_chunk)
        for start, stop in chunks:
            z = chunk_logits(hidden, weight, start, stop).float() * inv_temp
            in_chunk, column = _label_in_chunk(columns, owned, start, stop)
            label_logit = torch.where(in_chunk, z.gather(1, column[:, None]).squeeze(1), label_logit)
            stats.add(z, z)
            del z
        all_reduce_sum(label_logit, tp_group)
        lse, mean_logit = stats.combine(tp_group)
        logprobs = (label_logit - lse).float()
        entropy = (lse - mean_logit).float()
        ctx.save_for_backward(hidden, weight, columns, owned, lse.float(), mean_logit.float())
        ctx.inv_temp, ctx.tp_group, ctx.chunks = inv_temp, tp_group, chunks
        ctx.main_grad = main_grad_of(weight)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, columns, owned, lse, mean_logit = ctx.saved_tensors
        # d(logit) = d(z) / temperature
        grad_logprobs = (grad_logprobs.float() * ctx.inv_temp)[:, None]
        grad_entropy = (grad_entropy.float() * ctx.inv_temp)[:, None]

        def chunk_grad(start, stop):
            z = chunk_logits(hidden, weight, start, stop).float() * ctx.inv_temp
            p = torch.exp(z - lse[:, None])
            grad = -p * (grad_logprobs + grad_entropy * (z - mean_logit[:, None]))
            del z, p
            in_chunk, column = _label_in_chunk(columns, owned, start, stop)
            return grad.scatter_add_(1, column[:, None], torch.where(in_chunk[:, None], grad_logprobs, 0.0))

        grad_hidden, grad_weight = fused_linear_grads(hidden, weight, ctx.chunks, chunk_grad, ctx.tp_group,
                                                      main_grad=ctx.main_grad,
                                                      weight_grad_needed=ctx.needs_input_grad[1])
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_labels(hidden: torch.Tensor, labels) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels must be [T] with T = hidden's rows ({hidden.shape[0]}); got {tuple(labels.shape)}")
    check_same_device(hidden=hidden, labels=labels)


def fused_linear_logprobs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log softmax(z)[label] and the entropy of softmax(z) per row, z = hidden @ weight.T / temperature,
    without the logits.

    ``hidden`` [T, H]; ``weight`` this TP rank's output-weight shard [V_local, H] (rank r holds
    global ids [r V_local, (r + 1) V_local)); ``labels`` [T] global ids; ``vocab_size`` the number of
    real ids (None: every row). Returns (logprobs [T], entropy [T]) float32, the same on every TP
    rank, differentiable w.r.t. ``hidden`` (gradient summed over TP) and ``weight``.
    """
    check_hidden_and_weight(hidden, weight)
    _check_labels(hidden, labels)
    temperature = check_temperature(temperature)
    vocab_chunk = check_vocab_chunk(vocab_chunk)
    return _FusedLinearLogprobsEntropy.apply(hidden, weight, labels.long(), 1.0 / temperature, tp_group, vocab_size,
                                             vocab_chunk)


def fused_linear_logprobs_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Test oracle: the full logits (real rows only) in ``dtype``, log-softmax at the labels and the entropy."""
    rows = slice(None) if vocab_size is None else slice(0, vocab_size)
    logits = hidden.to(dtype) @ weight[rows].to(dtype).t() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logprobs.gather(1, labels.long()[:, None]).squeeze(1), entropy
