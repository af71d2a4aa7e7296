"""The per-token loss contract's one reduction: a masked sum over this rank's tokens and their count.

Every loss function hands the trainer ``(masked sum, token count, logs)``; megatron-core's
``finalize_model_grads`` divides the gradients by the count summed over DP x CP
(:mod:`sdzero_mcore.trainer`), so nothing here knows about data or context parallelism.
"""

from __future__ import annotations

import torch


def masked_token_sum(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of ``per_token_loss`` where ``loss_mask``, number of such tokens as int64)."""
    if per_token_loss.shape != loss_mask.shape:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
    mask = loss_mask.bool()
    # where, not a product: a non-finite loss on a masked-out (padding) token must not leak in.
    return torch.where(mask, per_token_loss.float(), 0.0).sum(), mask.sum()
