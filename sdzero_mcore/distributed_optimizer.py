"""megatron-core's DistributedOptimizer for the Trainer (``optimizer.distributed: true``).

ZeRO-1: megatron-core's DDP (``use_distributed_optimizer=True``) reduce-scatters the gradients
over DP x CP into the contiguous gradient buffer; each data-parallel rank keeps the fp32 master
weights and the Adam moments of its 1/DP slice of that buffer only, steps them, and the updated
(bf16 or fp32) weights are all-gathered back into every rank's parameters.

Everything numerical is megatron-core's: ``get_megatron_optimizer`` builds the optimizer (Adam
with decoupled weight decay: torch's AdamW without TransformerEngine or apex, their FusedAdam
with), ``get_grad_norm`` and ``clip_grad_by_total_norm_fp32`` norm and clip. What the project's
``OptimizerConfig`` says maps one to one: lr, betas, eps and clip into megatron-core's config;
weight decay through its parameter groups (``wd_mult`` 0 for norms and biases, the same rule as
the AdamW path); the learning-rate schedule is the Trainer's own ``LambdaLR`` (warmup, LinearLR
start factor, cosine or constant), stepped on the inner optimizer that holds the groups. As on the
AdamW path, a step whose gradient norm is not finite is skipped.

Checkpoints: megatron-core's ``sharded_state_dict`` in its ``dp_reshardable`` format, written with
dist checkpointing into ``distrib_optimizer/`` of the step directory by every rank (each its own
slice; the small common state once). The buckets are stored as global flat tensors without the
padding to a multiple of DP, so the state loads at another data-parallel size (same tensor- and
pipeline-parallel layout: the bucket layout follows the TP/PP-local parameters).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import clip_grads, get_megatron_optimizer

# megatron-core's DP-reshardable format; its default (fully_sharded_model_space) needs
# ShardedTensor.flattened_range, which torch's dist checkpointing no longer supports
SHARDING_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
CHECKPOINT_DIR = "distrib_optimizer"


def megatron_optimizer_config(optim_cfg, params_dtype: torch.dtype) -> MegatronOptimizerConfig:
    """megatron-core's optimizer config for the project's ``OptimizerConfig`` (the schedule is the
    Trainer's; ``lr`` is its peak)."""
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        decoupled_weight_decay=True,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=True,
    )


def build_distributed_optimizer(ddp, optim_cfg):
    """megatron-core's DistributedOptimizer over ``ddp`` (a DDP built with
    ``use_distributed_optimizer=True``, or a list of them: one per model chunk)."""
    chunks = ddp if isinstance(ddp, list) else [ddp]
    params_dtype = next(chunks[0].module.parameters()).dtype
    optimizer = get_megatron_optimizer(megatron_optimizer_config(optim_cfg, params_dtype), chunks)
    # megatron-core's parameter scheduler sets each group's decay as weight_decay x wd_mult (0 for
    # norms and biases); the Trainer schedules only the learning rate, so the decay is set once
    for group in optimizer.param_groups:
        group["weight_decay"] = optim_cfg.weight_decay * group["wd_mult"]
    return optimizer


def inner_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer that holds the parameter groups (and so their learning rates)."""
    if len(optimizer.chained_optimizers) != 1:
        raise ValueError(
            f"expected one distributed optimizer (dense model), got {len(optimizer.chained_optimizers)}"
        )
    return optimizer.chained_optimizers[0].optimizer


def optimizer_step(optimizer, clip_grad: float) -> float:
    """megatron-core's step (``ChainedOptimizer.step``: gradients into the fp32 shards, norm, clip,
    update, all-gather of the weights), except that a step whose gradient norm is not finite is
    skipped. Returns the gradient norm (before clipping)."""
    optimizer.prepare_grads()  # reports overflow only with a loss scaler, which bf16 and fp32 do not use
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return grad_norm
    if clip_grad > 0:
        for chained in optimizer.chained_optimizers:
            # through the module: the CPU compatibility layer wraps this function there
            clip_grads.clip_grad_by_total_norm_fp32(chained.get_parameters(), max_norm=clip_grad, total_norm=grad_norm)
    optimizer.step_with_ready_grads()
    return grad_norm


def state_tensors(optimizer) -> list[torch.Tensor]:
    """This rank's optimizer state: Adam's moments (and step counters) of its slice, and the fp32
    masters of 16-bit weights (those of fp32 weights are views of the weights themselves)."""
    tensors = []
    for chained in optimizer.chained_optimizers:
        tensors += [value for state in chained.optimizer.state.values() for value in state.values()
                    if isinstance(value, torch.Tensor)]
        tensors += [master for group in chained.shard_fp32_from_float16_groups for master in group]
    return tensors


def save_distributed_optimizer(optimizer, scheduler, directory: Path) -> None:
    """Collective: every rank writes its slice of the optimizer state into ``directory`` (a dist
    checkpoint); the scheduler and the optimizer's parameter groups are written once."""
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {
        "optimizer": optimizer.sharded_state_dict({}, metadata=SHARDING_METADATA),
        "scheduler": scheduler.state_dict(),
    }
    dist_checkpointing.save(state, str(directory))


@torch.no_grad()
def load_distributed_optimizer(optimizer, scheduler, directory: Path) -> None:
    """Collective: load the state :func:`save_distributed_optimizer` wrote, at this run's
    data-parallel size (which may differ from the writer's)."""
    for chained in optimizer.chained_optimizers:
        if not chained.optimizer.state:
            # the state tensors must exist for the load to fill them in place; the dummy step
            # moves only this rank's masters, which the load overwrites
            chained._init_optimizer_states_with_dummy_values()
    request = {
        "optimizer": optimizer.sharded_state_dict({}, is_loading=True, metadata=SHARDING_METADATA),
        "scheduler": scheduler.state_dict(),
    }
    loaded = dist_checkpointing.load(request, str(directory))
    optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(optimizer, loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])


def _restore_adam_steps(optimizer, loaded: dict) -> None:
    """torch Adam's per-parameter step count: the dp_reshardable state stores it as a
    non-persistent value, so the load leaves the dummy step's 1 in one tensor shared by every
    parameter. Each parameter gets its own tensor holding the saved count (the parameter groups'
    ``step``)."""
    steps = {group["step"] for group in loaded["optimizer"]["param_groups"] if "step" in group}
    if not steps:  # TransformerEngine's / apex's FusedAdam keep the count in the groups themselves
        return
    if len(steps) != 1:
        raise ValueError(f"the checkpoint's parameter groups disagree on the Adam step: {sorted(steps)}")
    (step,) = steps
    for chained in optimizer.chained_optimizers:
        for state in chained.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.full_like(state["step"], step)
