"""Running a built GPTModel: full-sequence token ids in, logits out, at any TP x CP layout.

Every rank of a context-parallel group passes the same full [B, S] batch; :func:`cp_local_batch`
pads it to a multiple of 2 x CP and keeps this rank's load-balanced part (chunks r and 2*CP-1-r),
which is what megatron-core's RoPE and the attention expect.

At pipeline-parallel size > 1 the logits exist on the last stage only (``parallel.pipeline``):
:func:`causal_lm_logits` runs megatron-core's forward-only schedule and returns them there.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from megatron.core import parallel_state, tensor_parallel

from sdzero_mcore.parallel.context_parallel import gather_from_cp, split_batch_for_cp
from sdzero_mcore.parallel.pipeline import forward_only_outputs, pipeline_parallel_size


def position_ids_for(input_ids: torch.Tensor) -> torch.Tensor:
    """0..S-1 for every row of a [B, S] batch (right-padded batches need nothing else: attention is causal)."""
    batch, seq = input_ids.shape
    return torch.arange(seq, device=input_ids.device).expand(batch, seq)


def cp_size_rank() -> tuple[int, int]:
    return parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()


def cp_local_batch(
    input_ids: torch.Tensor,
    extra: Optional[Mapping[str, torch.Tensor]] = None,
    pad_values: Optional[Mapping[str, object]] = None,
) -> dict[str, torch.Tensor]:
    """This CP rank's part of ``input_ids`` [B, S], its position ids, and of any token-level ``extra``.

    Returns a dict with ``input_ids``, ``position_ids`` and the keys of ``extra``, each padded to
    ``padded_seq_len(S, CP)`` and split. At CP = 1 it pads nothing and splits nothing.
    """
    cp_size, cp_rank = cp_size_rank()
    batch = {"input_ids": input_ids, "position_ids": position_ids_for(input_ids), **(extra or {})}
    return split_batch_for_cp(batch, cp_size, cp_rank, pad_values=pad_values)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def vocab_parallel_logits(model, local: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, s_local, V_padded / TP] for a batch prepared by :func:`cp_local_batch` (moved to the model's device)."""
    device = model_device(model)
    return model(local["input_ids"].to(device), local["position_ids"].to(device), attention_mask=None)


def causal_lm_logits(model, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits [B, S, vocab_size] over the real vocabulary in sequence order, gathered over TP and CP.

    At pipeline-parallel size > 1 every stage calls it; the last stage gets the logits, the
    others None."""
    if pipeline_parallel_size() > 1:
        outputs = forward_only_outputs(model, [cp_local_batch(input_ids)], vocab_parallel_logits,
                                       lambda logits, _: gathered_logits(model, logits, input_ids.shape[1]))
        return outputs[0] if outputs else None
    return gathered_logits(model, vocab_parallel_logits(model, cp_local_batch(input_ids)), input_ids.shape[1])


def gathered_logits(model, logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The model's vocab-parallel, CP-local logits gathered over TP and CP, in sequence order, cut
    to ``seq_len`` tokens and the real vocabulary."""
    if logits.shape[-1] != model.padded_vocab_size:  # vocab-parallel output
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    logits = gather_from_cp(logits, dim=1)
    return logits[:, :seq_len, : model.hf_arch.vocab_size]
