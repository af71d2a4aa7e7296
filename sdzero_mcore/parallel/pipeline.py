"""Pipeline parallelism around megatron-core's schedules: where outputs live and how they reach the other stages.

At pipeline-parallel size PP > 1 a model is one stage of layers (``models.builder``); only the last
stage produces logits, and only there do loss functions and output collectors run. Training goes
through the trainer's schedule call; forward-only passes that need outputs (the teacher's top-K,
log-probs of a frozen model, evaluation logits) go through :func:`forward_only_outputs`, which
runs megatron-core's forward-only schedule and returns what a collector computed from each
micro-batch's output on the last stage. At PP = 1 none of this is used: the callers keep calling
the model directly, as they did before pipeline parallelism existed.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


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

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=model,
        num_microbatches=len(micro_batches),
        seq_length=0,  # the stages send each activation's shape first (config.variable_seq_lengths)
        micro_batch_size=0,
        forward_only=True,
        collect_non_loss_data=True,
    )
