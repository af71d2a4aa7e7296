"""Running a built GPTModel: full-sequence token ids in, logits out, at any TP x CP layout.

Every rank of a context-parallel group passes the same full [B, S] batch; :func:`cp_local_batch`
pads it to a multiple of 2 x CP and keeps this rank's load-balanced part (chunks r and 2*CP-1-r),
which is what megatron-core's RoPE and the attention expect.

Two ways out of the model: :func:`vocab_parallel_logits` (the whole forward, logits [B, s, V/TP]
at every position) and :func:`final_hidden_states` + :func:`output_weight` (the model's own parts
up to the final norm, and the vocab-parallel output weight, tied or not), for losses that apply
the output layer themselves, only where they need it (``sdzero_kernels``' fused-linear ops).

At pipeline-parallel size > 1 the logits and the final-norm hidden states exist on the last stage
only (``parallel.pipeline``): both ways out run one stage (one chunk, with virtual stages) and
return its output, which megatron-core's schedules send to the next stage; :func:`causal_lm_logits`
runs the forward-only schedule and returns the logits on the last stage.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from sdzero_kernels import main_grad_of

from sdzero_mcore.parallel.context_parallel import gather_from_cp, split_batch_for_cp
from sdzero_mcore.parallel.pipeline import last_stage_output, model_chunks


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


def gpt_model(model):
    """The GPTModel inside wrappers such as megatron-core's DDP (``.module`` chains)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def final_hidden_states(model, local: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """This pipeline stage's output [s_local, B, H] for a batch prepared by :func:`cp_local_batch`:
    on the last stage (the model's ``post_process``; with virtual stages, its last chunk) the
    hidden states after the final norm, elsewhere the activation the schedule sends to the next stage.

    The GPTModel's own forward up to the output layer: ``_preprocess`` (the embedding on the first
    stage; RoPE on every stage, sized by the decoder's input) and the decoder (which ends with the
    final norm on the last stage); ``output_layer(h, weight=output_weight(model))`` on the last
    stage's gives :func:`vocab_parallel_logits`' values. A stage without the embedding
    (``pre_process`` False) reads its input from the decoder's ``input_tensor``, which megatron-core's
    schedule sets (``set_input_tensor``) before it calls the forward step.

    Under megatron-core's DDP the word embeddings' gradient goes straight into the embedding
    weight's ``main_grad`` (:func:`_embedding_lookup_into_main_grad`): the lookup's autograd
    backward would build a dense [V / TP, H] gradient for the few rows the batch reads.
    """
    gpt = gpt_model(model)
    device = model_device(gpt)
    input_ids = local["input_ids"].to(device)
    fuse_lookup_grad = gpt.pre_process and _lookup_grad_fusable(gpt)
    with torch.no_grad() if fuse_lookup_grad else contextlib.nullcontext():
        decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset, padding_mask = (
            gpt._preprocess(input_ids=input_ids, position_ids=local["position_ids"].to(device))[:6]
        )
    if fuse_lookup_grad:
        decoder_input = _embedding_lookup_into_main_grad(gpt, decoder_input, input_ids)
    return gpt.decoder(
        hidden_states=decoder_input,  # None after the first stage: the decoder reads its input_tensor
        attention_mask=None,
        rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_pos_cos,
        rotary_pos_sin=rotary_pos_sin,
        sequence_len_offset=sequence_len_offset,
        padding_mask=padding_mask,
    )


def _lookup_grad_fusable(gpt) -> bool:
    """Whether the embedding's output is the word-embedding lookup alone, as [s, B, H] (no
    position or token-type embeddings, no dropout, no sequence-parallel scatter), and its weight
    wants a gradient and has megatron DDP's ``main_grad``: then :func:`_embedding_lookup_into_main_grad`
    gives the same gradient."""
    embedding = gpt.embedding
    weight = embedding.word_embeddings.weight
    return (
        torch.is_grad_enabled()
        and weight.requires_grad
        and main_grad_of(weight) is not None
        and all(param is weight for param in embedding.parameters())
        and not embedding.add_position_embedding
        and not gpt.config.sequence_parallel
        and (embedding.embedding_dropout.p == 0.0 or not embedding.training)
    )


class _LookupGradIntoMainGrad(torch.autograd.Function):
    """Identity on the embeddings [s, B, H] (computed without autograd); the backward adds their
    gradient into the rows of ``main_grad`` the ids read (index_add_: deterministic on CPU, atomic
    adds on CUDA) and returns no gradient for the weight, which stays a graph input only so that
    the backward runs. Ids another TP rank owns carry a zero row (their clamped row gains 0)."""

    @staticmethod
    def forward(ctx, embeddings, weight, rows, owned):
        ctx.save_for_backward(rows, owned)
        ctx.main_grad = main_grad_of(weight)
        return embeddings

    @staticmethod
    def backward(ctx, grad):
        rows, owned = ctx.saved_tensors
        grad = torch.where(owned[:, None], grad.reshape(-1, grad.shape[-1]), 0.0)
        ctx.main_grad.index_add_(0, rows, grad.to(ctx.main_grad.dtype))
        return None, None, None, None


def _embedding_lookup_into_main_grad(gpt, embeddings: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``embeddings`` [s, B, H], the lookup of ``input_ids`` [B, s] made without autograd, with the
    gradient path of the lookup into the weight's ``main_grad`` (at TP > 1, the rows of this
    rank's vocabulary shard; megatron's all-reduce of the output has an identity backward)."""
    word_embeddings = gpt.embedding.word_embeddings
    ids = input_ids.t().reshape(-1) - word_embeddings.vocab_start_index  # [s, B] order, as embeddings
    local_vocab = word_embeddings.weight.shape[0]
    owned = (ids >= 0) & (ids < local_vocab)
    return _LookupGradIntoMainGrad.apply(embeddings, word_embeddings.weight, ids.clamp(0, local_vocab - 1), owned)


def output_weight(model) -> torch.Tensor:
    """The output layer's weight [V_padded / TP, H] on this rank: the embedding's when tied (one
    parameter, so both uses' gradients add up in it), the output layer's otherwise.

    At pipeline-parallel size > 1 only the last stage has one (of a model in chunks, the last
    chunk). Tied, it is the last stage's copy of the embedding (``output_layer.weight``, what
    ``shared_embedding_or_output_weight`` returns there): its gradient, added into its
    ``main_grad`` by the fused-linear ops, is what megatron-core's ``finalize_model_grads``
    all-reduces with the first stage's embedding gradient over the embedding group."""
    gpt = gpt_model(model_chunks(model)[-1])
    if not gpt.post_process:
        raise ValueError("output_weight: this pipeline stage has no output layer (the last stage's last chunk has)")
    if gpt.output_layer.bias is not None:
        raise ValueError("output_weight: an output layer with a bias is not supported by the fused-linear losses")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def real_vocab_size(model) -> Optional[int]:
    """The number of real ids (megatron pads the vocabulary); None for a model built without ``hf_arch``."""
    arch = getattr(gpt_model(model), "hf_arch", None)
    return arch.vocab_size if arch is not None else None


def rows_at(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[len(rows), H]: the hidden states [s, B, H] at flat (position x B + row) indices ``rows``."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))


def causal_lm_logits(model, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits [B, S, vocab_size] over the real vocabulary in sequence order, gathered over TP and CP.

    At pipeline-parallel size > 1 every stage calls it; the last stage gets the logits, the
    others None."""
    return last_stage_output(model, cp_local_batch(input_ids), vocab_parallel_logits,
                             lambda logits, _: gathered_logits(model, logits, input_ids.shape[1]))


def gathered_logits(model, logits: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The model's vocab-parallel, CP-local logits gathered over TP and CP, in sequence order, cut
    to ``seq_len`` tokens and the real vocabulary."""
    if logits.shape[-1] != model.padded_vocab_size:  # vocab-parallel output
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    logits = gather_from_cp(logits, dim=1)
    return logits[:, :seq_len, : model.hf_arch.vocab_size]
