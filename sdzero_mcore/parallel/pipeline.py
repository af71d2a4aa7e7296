"""Pipeline parallelism around megatron-core's schedules: where outputs live and how they reach the other stages.

At pipeline-parallel size PP > 1 a model is one stage of layers (``models.builder``); only the last
stage produces logits, and only there do loss functions and output collectors run. Training goes
through the trainer's schedule call; forward-only passes that need outputs (the teacher's top-K,
log-probs of a frozen model, evaluation logits or hidden states) go through
:func:`forward_only_outputs`, which runs megatron-core's forward-only schedule and returns what a
collector computed from each micro-batch's output on the last stage. A stage's output is what
its forward returns: the logits or, for the sparse LM heads, the final-norm hidden states on the
last stage (``models.forward.final_hidden_states``), the activation sent on before it. At PP = 1 none of this is used: the callers keep calling
the model directly, as they did before pipeline parallelism existed.

Virtual (interleaved) pipeline stages (``parallel.virtual_pipeline_model_parallel_size`` = VPP):
each rank holds VPP model chunks, megatron-core's list of GPTModels built with their ``vp_stage``
(chunk v of stage p holds the global layers of virtual stage v x PP + p); the model is then a
:class:`ModelChunks`, and megatron-core's interleaved schedule (what ``get_forward_backward_func``
returns when VPP is set) runs them, with one data iterator per chunk over the same micro-batches.
That schedule needs a number of micro-batches that is a multiple of PP:
:func:`pad_to_pipeline_multiple` repeats the last one, and its callers make the repeats count for
nothing (their losses and logs are multiplied by zero, their outputs dropped).
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


class ModelChunks(list):
    """A rank's model chunks at virtual pipeline size VPP (megatron-core's list of GPTModels, chunk v
    built with ``vp_stage=v``), with what callers ask of a whole model: its parameters (for the
    device and dtype), ``train``/``eval``/``requires_grad_`` on every chunk, and the ``hf_arch``,
    ``padded_vocab_size`` and ``config`` the chunks share. Parameter *names* are per chunk (each
    names its layers from 0): code that needs them iterates the chunks (:func:`model_chunks`).

    Hashed and compared by identity, as a model is: callers key per-model state on it (the rollout
    engine's weight-sync members, a ``WeakKeyDictionary``)."""

    __hash__ = object.__hash__

    def __eq__(self, other) -> bool:
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other

    @property
    def hf_arch(self):
        return self[0].hf_arch

    @property
    def padded_vocab_size(self) -> int:
        return self[0].padded_vocab_size

    @property
    def config(self):
        return self[0].config

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return itertools.chain.from_iterable(chunk.parameters() for chunk in self)

    def train(self, mode: bool = True) -> "ModelChunks":
        for chunk in self:
            chunk.train(mode)
        return self

    def eval(self) -> "ModelChunks":
        return self.train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "ModelChunks":
        for chunk in self:
            chunk.requires_grad_(requires_grad)
        return self


def model_chunks(model) -> list:
    """The chunks of ``model``: those of a :class:`ModelChunks` (or list), else ``[model]``."""
    return list(model) if isinstance(model, list) else [model]


def pad_to_pipeline_multiple(micro_batches: Sequence[Any], model) -> tuple[list, int]:
    """``micro_batches`` and, for a model in chunks (megatron-core's interleaved schedule, which
    runs a multiple of PP micro-batches only), repeats of the last one up to the next multiple of
    PP; returns them and the number of real ones (the callers discount the repeats)."""
    padded = list(micro_batches)
    if isinstance(model, list):
        pp = pipeline_parallel_size()
        padded += [padded[-1]] * (-len(padded) % pp)
    return padded, len(micro_batches)


def pipeline_parallel_size() -> int:
    """The pipeline-parallel size (1 before megatron's parallel state exists)."""
    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_pipeline_model_parallel_world_size()


def is_last_stage() -> bool:
    """Whether this rank holds the last pipeline stage (always, at PP = 1)."""
    return pipeline_parallel_size() == 1 or parallel_state.is_pipeline_last_stage()


def broadcast_from_last_stage(obj: Any) -> Any:
    """``obj`` of the last pipeline stage, on every stage of this rank's pipeline (pickled: for
    small results such as metrics; a collective over the pipeline group)."""
    if pipeline_parallel_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                               group=parallel_state.get_pipeline_model_parallel_group())
    return box[0]


def broadcast_tensor_from_stage(tensor: torch.Tensor | None, stage: int, shape, dtype: torch.dtype,
                                device: torch.device) -> torch.Tensor:
    """Pipeline stage ``stage``'s ``tensor`` on every stage (the others pass None and give its
    ``shape`` and ``dtype``); a collective over the pipeline group."""
    group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.get_pipeline_model_parallel_rank() != stage:
        tensor = torch.empty(shape, dtype=dtype, device=device)
    else:
        tensor = tensor.contiguous()
    dist.broadcast(tensor, src=dist.get_global_rank(group, stage), group=group)
    return tensor


@torch.no_grad()
def forward_only_outputs(model, micro_batches: Sequence[Any], forward: Callable[[Any, Any], torch.Tensor],
                         collect: Callable[[torch.Tensor, Any], Any]) -> list:
    """``collect(output, micro_batch)`` for each micro-batch, in order, on the last pipeline stage
    ([] on the others), through megatron-core's forward-only schedule: ``forward(model,
    micro_batch)`` runs the stage (its input arrives from the previous stage), and only the last
    stage's output (the logits) reaches ``collect``. Every rank of the pipeline calls it with the
    same micro-batches."""
    if not micro_batches:
        raise ValueError("forward_only_outputs needs at least one micro-batch")

    def forward_step(data_iterator, stage_model):
        micro_batch = next(data_iterator)
        # megatron calls this with non_loss_data=True: what it returns is kept as is
        return forward(stage_model, micro_batch), lambda output, non_loss_data=True: collect(output, micro_batch)

    padded, real = pad_to_pipeline_multiple(micro_batches, model)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators(padded, model),
        model=model,
        num_microbatches=len(padded),
        seq_length=0,  # the stages send each activation's shape first (config.variable_seq_lengths)
        micro_batch_size=0,
        forward_only=True,
        collect_non_loss_data=True,
    )
    return outputs[:real]  # the repeats' outputs come last (the last stage sees micro-batches in order)


def last_stage_output(model, micro_batch: Any, forward: Callable[[Any, Any], torch.Tensor],
                      collect: Callable[[torch.Tensor, Any], Any]) -> Any:
    """``collect(forward(model, micro_batch), micro_batch)``; at pipeline-parallel size > 1 through
    :func:`forward_only_outputs`: the value on the last stage, None on the others."""
    if pipeline_parallel_size() == 1:
        return collect(forward(model, micro_batch), micro_batch)
    outputs = forward_only_outputs(model, [micro_batch], forward, collect)
    return outputs[0] if outputs else None


def data_iterators(micro_batches: Sequence[Any], model):
    """What megatron-core's schedule takes as ``data_iterator``: one iterator over the micro-batches,
    or for a model in chunks one per chunk (each chunk's forward step reads every micro-batch)."""
    if isinstance(model, list):
        return [iter(micro_batches) for _ in model]
    return iter(micro_batches)
