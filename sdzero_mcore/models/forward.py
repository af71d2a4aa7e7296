"""Running a built GPTModel: token ids in, full-vocabulary logits out."""

from __future__ import annotations

import torch


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """0..S-1 for every row of a [B, S] batch (right-padded batches need nothing else: attention is causal)."""
    batch, seq = input_ids.shape
    return torch.arange(seq, device=input_ids.device).expand(batch, seq)


def causal_lm_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, vocab_size] over the real vocabulary, gathered across TP ranks if needed."""
    from megatron.core import tensor_parallel

    logits = model(input_ids, position_ids_for(input_ids), attention_mask=None)
    if logits.shape[-1] != model.padded_vocab_size:  # vocab-parallel output
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return logits[..., : model.hf_arch.vocab_size]
