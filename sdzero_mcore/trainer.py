"""One training step for every phase, through megatron-core's own schedule; optimizer, checkpoints, metrics.

The contract (megatron-core's forward-step / loss-function contract with per-token loss):

* A phase hands :meth:`Trainer.train_step` the micro-batches of one optimizer step on this rank
  and a forward step ``forward_step(model, micro_batch) -> (output, loss_fn)`` that runs the model;
  ``loss_fn(output) -> (loss_sum, num_tokens, logs)`` returns the *unnormalised* masked loss sum
  over this rank's tokens, their count, and additive logs (sums over the same tokens).
* The micro-batches run through ``megatron.core.pipeline_parallel.get_forward_backward_func()``
  with ``calculate_per_token_loss=True``: megatron-core's DDP sums gradients over DP x CP, and
  ``finalize_model_grads`` all-reduces the token count over DP x CP and scales the gradients by
  1 / count. So the step's gradient is that of the token mean over the global batch, whatever
  the micro-batching, and no loss function scales for DP or CP itself: one rule, one place.
* The trainer sums each log over micro-batches and reduces all of them over DP x CP in one
  all-reduce; ``loss`` is the global token mean. A step with nothing to train on is
  :meth:`Trainer.skip_step` (it still advances the step and the schedule on every rank).
* Pipeline parallelism (PP > 1): megatron-core's 1F1B schedule runs the micro-batches through the
  stages. Every stage's forward step is called with the same micro-batch; on all but the last the
  model returns hidden states, which the schedule sends on, and ``loss_fn`` runs on the last stage
  only (so it may read anything in the micro-batch, but nothing a previous stage computed besides
  the model's output). ``finalize_model_grads`` broadcasts the token count from the last stage and
  all-reduces the gradients of tied embeddings between the first and last stage; the logs are
  reduced on the last stage and broadcast to the others, so every rank returns the same metrics.
* Virtual pipeline stages (``parallel.virtual_pipeline_model_parallel_size``): the model is a
  list of chunks (``parallel.pipeline.ModelChunks``), each in its own DDP, and megatron-core's
  interleaved schedule runs them; everything above holds per chunk. That schedule runs a multiple
  of PP micro-batches: a step with fewer repeats its last micro-batch, whose loss and logs are
  multiplied by zero (no gradient, no tokens), up to the next multiple.

Nothing in a micro-batch runs a collective across data-parallel ranks, so ranks may run different
numbers of micro-batches (each needs at least one; a rank without data runs one with no loss tokens).

Optimizer (``optimizer.distributed: false``, the default): ``torch.optim.AdamW`` over fp32 master
copies of the TP-local parameters (the parameters themselves when they are fp32), fed from DDP's
fp32 ``main_grad`` buffers and copied back to bf16 after each step, with no weight decay on norms
and biases (megatron's default). AdamW is fused on CUDA. The optimizer state is saved once per
model-parallel rank (by its first data-parallel rank; the others hold the same state) and resumes
at the same parallel layout (the model weights load at any layout).

``optimizer.distributed: true``: megatron-core's DistributedOptimizer (ZeRO-1, its own gradient
norm and clipping; ``distributed_optimizer.py``): each data-parallel rank holds the masters and
moments of 1/DP of the parameters. Its state is a dist checkpoint (``distrib_optimizer/``) that
resumes at the same TP x PP and any data-parallel size.

Checkpoints (``<run>/checkpoints/<phase>/step_NNNNNNN``) are sdzero-mcore model checkpoints
(megatron-core dist format + ``hf/`` + ``sdzero_checkpoint.json``, written last) with the
optimizer, scheduler, RNG and data position beside them. A step directory appears complete or
not at all (staged, then renamed); ``latest`` names the newest complete one. Each save prunes the
older ones down to ``checkpoint.keep_last``, except those named in ``Trainer.protected`` (the best
ones by validation, ``phases/validation.py``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from sdzero_mcore.checkpoint import mcore_io
from sdzero_mcore.checkpoint.hf_io import copy_non_weight_files
from sdzero_mcore.checkpoint.mapping import Kind, is_tied_output_copy, model_param_mappings
from sdzero_mcore.checkpoint.source import LATEST_FILE, latest_checkpoint
from sdzero_mcore.distributed_optimizer import (
    CHECKPOINT_DIR as DISTRIBUTED_OPTIMIZER_DIR,
    build_distributed_optimizer,
    inner_optimizer,
    load_distributed_optimizer,
    optimizer_step,
    save_distributed_optimizer,
    state_tensors,
)
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.float64_reductions import float64_sum_of_squares
from sdzero_mcore.parallel.pipeline import (
    broadcast_from_last_stage,
    data_iterators,
    is_last_stage,
    model_chunks,
    pad_to_pipeline_multiple,
    pipeline_parallel_size,
)

# loss_fn(output) -> (masked loss sum, token count, additive logs)
LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor, dict]]
ForwardStep = Callable[[Any, Any], tuple[Any, LossFn]]



def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float,
                  warmup_start_factor: Optional[float] = None) -> float:
    """Linear warmup to 1, then constant or cosine down to ``min_ratio`` at ``total_steps``.

    The warmup is ``(step + 1) / warmup_steps``, or with ``warmup_start_factor`` f torch's
    ``LinearLR(start_factor=f, total_iters=warmup_steps)``: f at step 0, 1 at ``warmup_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        if warmup_start_factor is not None:
            return warmup_start_factor + (1.0 - warmup_start_factor) * step / warmup_steps
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(optim_cfg, total_steps: int) -> int:
    return optim_cfg.warmup_steps or int(round(optim_cfg.warmup_ratio * total_steps))


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.dim() == 1 or name.endswith(".bias")


class MetricsWriter:
    """Per-step metrics, written by global rank 0: an append-only JSONL file, TensorBoard, and
    Weights & Biases when ``logging.wandb.project`` is set (both optional packages, imported only then)."""

    def __init__(self, run_dir: Path, phase: str, *, jsonl: bool = True, tensorboard: bool = False, wandb_cfg=None):
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = run_dir / "metrics" / f"{phase}.jsonl"
        self.phase = phase
        self.jsonl = jsonl and self.enabled
        self.tb = None
        self.wandb_run = None
        if self.jsonl:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard)") from error
            self.tb = SummaryWriter(str(run_dir / "tensorboard" / phase))
        if wandb_cfg is not None and wandb_cfg.project and self.enabled:
            self.wandb_run = _start_wandb(wandb_cfg, run_dir, phase)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        # NaN (e.g. no r = 1 sample this step) is written as null: JSONL stays strict JSON
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        record = {"phase": self.phase, "step": step, "time": time.time(), **clean}
        if self.jsonl:
            with self.path.open("a") as handle:  # append-only: a crash loses at most the last line
                handle.write(json.dumps(record) + "\n")
                handle.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{self.phase}/{key}", value, step)
        if self.wandb_run is not None:
            # one W&B run per phase; keys carry the phase, as in TensorBoard
            self.wandb_run.log({f"{self.phase}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(wandb_cfg, run_dir: Path, phase: str):
    try:
        import wandb
    except ImportError as error:
        raise ImportError("logging.wandb.project is set, which needs the wandb package "
                          "(pip install 'sdzero-mcore[wandb]')") from error
    directory = Path(wandb_cfg.dir) if wandb_cfg.dir else run_dir / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    name = wandb_cfg.name or run_dir.resolve().name
    return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=f"{name}/{phase}", group=name,
                      mode=wandb_cfg.mode, dir=str(directory), reinit="create_new")


def per_token_ddp(model, *, use_distributed_optimizer: bool = False):
    """``model`` wrapped in megatron-core's DDP for the per-token loss contract: DDP sums gradients
    over DP x CP (``calculate_per_token_loss`` must be set before DDP reads it) and the schedule's
    ``finalize_model_grads`` divides them by the step's global token count.
    ``use_distributed_optimizer``: reduce-scatter instead of all-reduce, for megatron-core's
    DistributedOptimizer. A model in chunks (virtual pipeline stages) gets a list of DDPs, one per
    chunk, as megatron-core's interleaved schedule and ``finalize_model_grads`` take them (only
    the first buckets its gradients, as in Megatron-LM)."""
    config = model.config
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = None  # no loss scaling: bf16 and fp32 only (the Trainer refuses fp16)
    chunked = isinstance(model, list)
    ddps = [
        DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer,
            ),
            module=chunk,
            **({"disable_bucketing": index > 0} if chunked else {}),
        )
        for index, chunk in enumerate(model_chunks(model))
    ]
    if not chunked:
        config.no_sync_func = ddps[0].no_sync
        return ddps[0]
    config.no_sync_func = [ddp.no_sync for ddp in ddps]
    return ddps


def forward_backward(ddp, micro_batches: Sequence[Any], forward_step: ForwardStep,
                     *, forward_only: bool = False) -> dict:
    """Forward and backward of this rank's micro-batches through megatron-core's schedule, gradients
    reduced and token-normalised in ``main_grad`` (``forward_only``: no backward, for validation).
    ``ddp``: what :func:`per_token_ddp` returned (a list for a model in chunks).
    Returns the logs summed over the global batch, with ``loss`` (the global token mean) and ``num_tokens``."""
    if not micro_batches:
        raise ValueError("every rank needs at least one micro-batch (one with no loss tokens keeps a rank "
                         "without data in step)")
    padded, real = pad_to_pipeline_multiple(micro_batches, ddp)

    def megatron_forward_step(data_iterator, model):
        index, micro_batch = next(data_iterator)
        output, loss_fn = forward_step(model, micro_batch)
        if index >= real:  # a repeat that only fills the interleaved schedule: counts for nothing
            return output, lambda out: _with_token_logs(*_zero_weight(*loss_fn(out)))
        return output, lambda out: _with_token_logs(*loss_fn(out))

    logs = get_forward_backward_func()(
        forward_step_func=megatron_forward_step,
        data_iterator=data_iterators(list(enumerate(padded)), ddp),
        model=ddp,
        num_microbatches=len(padded),
        seq_length=0,  # unused without pipelining; with it, each activation's shape is sent first
        micro_batch_size=0,
        forward_only=forward_only,
    )
    if pipeline_parallel_size() > 1:
        # the loss functions ran on the last stage: its totals, for every stage
        totals = broadcast_from_last_stage(_reduce_logs(logs) if is_last_stage() else None)
    else:
        totals = _reduce_logs(logs)
    loss_sum = totals.pop("loss_sum")
    return {"loss": loss_sum / totals["num_tokens"] if totals["num_tokens"] > 0 else math.nan, **totals}


@dataclass
class TrainState:
    """What besides weights and optimizer a resumed run needs: the step and the data position."""

    step: int = 0
    data: dict = field(default_factory=dict)  # owned by the phase (epoch, offset, counters)


class Trainer:
    """Wraps a megatron-core GPTModel for training; see the module docstring."""

    def __init__(
        self,
        model,
        optim_cfg,
        *,
        total_steps: int,
        run_dir: str | Path,
        phase: str,
        hf_files_dir: str | Path,
        logging_cfg=None,
        checkpoint_cfg=None,
    ):
        self.model = model
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.hf_files_dir = Path(hf_files_dir)
        self.total_steps = total_steps
        self.ckpt_cfg = checkpoint_cfg
        self.distributed_optimizer = getattr(optim_cfg, "distributed", False)
        self.ddp = per_token_ddp(model, use_distributed_optimizer=self.distributed_optimizer)
        parameters = chunk_parameters(model)
        named = [(name, p) for name, _, _, p in parameters if p.requires_grad]
        if any(p.dtype == torch.float16 for _, p in named):
            raise ValueError("float16 training needs loss scaling, which this trainer does not do; use bfloat16 or float32")
        self._named = named
        self._params = dict(named)
        if self.distributed_optimizer:
            # the masters and moments live in megatron-core's optimizer, sharded over DP
            self.masters = {}
            self.optimizer = build_distributed_optimizer(self.ddp, optim_cfg)
            scheduled = inner_optimizer(self.optimizer)
        else:
            self._build_adamw(optim_cfg)
            scheduled = self.optimizer
        warmup = warmup_steps_for(optim_cfg, total_steps)
        min_ratio = optim_cfg.min_lr / optim_cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            scheduled,
            lambda step: lr_multiplier(
                step, total_steps=total_steps, warmup_steps=warmup, schedule=optim_cfg.lr_schedule, min_ratio=min_ratio,
                warmup_start_factor=optim_cfg.warmup_start_factor,
            ),
        )
        self.clip_grad = optim_cfg.clip_grad
        self.state = TrainState()
        self.metrics = MetricsWriter(
            self.run_dir,
            phase,
            jsonl=getattr(logging_cfg, "jsonl", True),
            tensorboard=getattr(logging_cfg, "tensorboard", False),
            wandb_cfg=getattr(logging_cfg, "wandb", None),
        )
        self._counted_in_norm = counted_once(parameters)
        self._last_log = time.perf_counter()
        # checkpoint names that keep_last pruning leaves alone whatever their age (the best ones by validation)
        self.protected: set[str] = set()

    def _build_adamw(self, optim_cfg) -> None:
        named = self._named
        # bf16 weights train through fp32 master copies: an AdamW update of lr 5e-6 is far below
        # bf16's resolution, so applying it to the bf16 tensors directly would mostly round away.
        self.masters = {
            n: (p.detach().float().clone().requires_grad_(True) if p.dtype != torch.float32 else p) for n, p in named
        }
        groups = [
            {"params": [self.masters[n] for n, p in named if not _no_weight_decay(n, p)], "weight_decay": optim_cfg.weight_decay},
            {"params": [self.masters[n] for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0},
        ]
        # fused on CUDA: one kernel updates every tensor in place, where foreach holds temporaries
        # the size of the whole model's state during the step; CPU tensors take foreach
        on_cuda = all(master.is_cuda for master in self.masters.values())
        self.optimizer = torch.optim.AdamW(
            groups, lr=optim_cfg.lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps,
            **({"fused": True} if on_cuda else {"foreach": True}),
        )

    def optimizer_state_tensors(self) -> list[torch.Tensor]:
        """The tensors besides the model whose values the next step needs: the optimizer state and
        the fp32 masters that are copies (not the fp32 parameters themselves)."""
        if self.distributed_optimizer:
            return state_tensors(self.optimizer)
        tensors = [value for state in self.optimizer.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor)]
        return tensors + [master for name, master in self.masters.items() if master is not self._params[name]]

    # --- one optimizer step -------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[Any], forward_step: ForwardStep) -> dict:
        """One optimizer step over this rank's micro-batches (see the module docstring); returns
        the step's metrics: ``loss`` (global token mean), ``num_tokens``, every log summed over
        the global batch, ``grad_norm``, ``lr``, ``skipped``."""
        self.model.train()
        for ddp in model_chunks(self.ddp):
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)

        totals = forward_backward(self.ddp, micro_batches, forward_step)
        # megatron's finalize_model_grads ran inside: main_grad is reduced and token-normalised
        lr = self.optimizer.param_groups[0]["lr"]
        if self.distributed_optimizer:
            grad_norm = optimizer_step(self.optimizer, self.clip_grad)
        else:
            grad_norm = self._adamw_step()
        self.scheduler.step()
        self.state.step += 1
        return {**totals, "grad_norm": grad_norm, "lr": lr, "skipped": not math.isfinite(grad_norm)}

    def _adamw_step(self) -> float:
        """Clip and step the AdamW path's masters from ``main_grad``; copy them into 16-bit weights.
        Returns the gradient norm (the step is skipped when it is not finite)."""
        for name, param in self._named:
            self.masters[name].grad = param.main_grad
        grad_norm = self.grad_norm()
        if self.clip_grad > 0 and math.isfinite(grad_norm) and grad_norm > self.clip_grad:
            scale = self.clip_grad / (grad_norm + 1e-6)
            for master in self.masters.values():
                master.grad.mul_(scale)
        if math.isfinite(grad_norm):
            self.optimizer.step()
            with torch.no_grad():
                for name, param in self._named:
                    if self.masters[name] is not param:
                        param.copy_(self.masters[name])
        for master in self.masters.values():
            master.grad = None  # main_grad is the DDP buffer; nothing else to keep between steps
        return grad_norm

    @torch.no_grad()
    def evaluate(self, micro_batches: Sequence[Any], forward_step: ForwardStep) -> dict:
        """The loss and logs of ``micro_batches`` (same contract as :meth:`train_step`) without
        touching gradients or the optimizer: held-out validation."""
        self.model.eval()
        try:
            return forward_backward(self.ddp, micro_batches, forward_step, forward_only=True)
        finally:
            self.model.train()

    def skip_step(self) -> None:
        """A step with nothing to train on (every rank alike): the step count and the schedule advance."""
        self.state.step += 1
        self.scheduler.step()

    def grad_norm(self) -> float:
        """The L2 norm of the whole model's gradient: TP shards once each, replicated tensors once,
        every pipeline stage's parameters (a tied embedding once)."""
        # summed on the device: one host sync for the whole model, not one per parameter
        total = torch.zeros((), dtype=torch.float64, device=next(self.model.parameters()).device)
        for name, master in self.masters.items():
            if master.grad is not None and name in self._counted_in_norm:
                total += float64_sum_of_squares(master.grad)  # chunk by chunk: no float64 copy of the gradient
        return float(sum_over_model_parallel(total).sqrt())

    def log(self, metrics: dict, *, tokens: Optional[float] = None, untimed_s: float = 0.0) -> None:
        """Write a step's metrics, with its wall time (since the previous log: rollout and training,
        less ``untimed_s`` spent on other work such as validation) and, given the step's trained
        tokens, the throughput."""
        now = time.perf_counter()
        elapsed = now - self._last_log - untimed_s
        self._last_log = now
        extra = {"step_time_s": elapsed}
        if tokens is not None and elapsed > 0:
            extra["tokens_per_s"] = float(tokens) / elapsed
        self.metrics.write(self.state.step, {**metrics, **extra})

    # --- checkpoints ----------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints" / self.phase

    def save_checkpoint(self, *, final: bool = False, extra_models: Optional[dict] = None) -> Path:
        """Collective. Write this step's checkpoint atomically; returns its directory.

        ``extra_models`` (e.g. Phase 2's frozen teacher) are saved as complete model checkpoints
        in subdirectories of the same name.
        """
        root = self.checkpoint_root
        name = f"step_{self.state.step:07d}"
        target = root / name
        rank = dist.get_rank() if dist.is_initialized() else 0
        staging_name = [f".{name}.tmp-{uuid.uuid4().hex[:8]}"]
        if dist.is_initialized():
            dist.broadcast_object_list(staging_name, src=0)
        staging = root / staging_name[0]
        if rank == 0:
            staging.mkdir(parents=True, exist_ok=True)
        models = {".": self.model, **(extra_models or {})}
        for subdir, model in models.items():
            mcore_io.save_model(model, staging / subdir)  # barrier inside, then every rank writes its shards
        if self.distributed_optimizer:
            # every rank writes its slice of the sharded state (a dist checkpoint)
            save_distributed_optimizer(self.optimizer, self.scheduler, staging / DISTRIBUTED_OPTIMIZER_DIR)
        elif parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0:
            # The AdamW state is the same on every data-parallel (and context-parallel) rank of a
            # model-parallel rank: the first of them writes it, once.
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    # fp32 masters of 16-bit weights: the checkpointed bf16 weights alone lose precision
                    "masters": {n: m.detach() for n, m in self.masters.items() if m is not self._params[n]},
                    "scheduler": self.scheduler.state_dict(),
                },
                staging / _optimizer_file_name(),
            )
        torch.save({"rng": _rng_state()}, staging / f"rng_state_rank{rank:05d}.pt")  # differs between ranks
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            atomic_write_text(staging / "trainer_state.json", json.dumps({"step": self.state.step, "data": self.state.data}) + "\n")
                # sub-models first: the top-level marker, written last, completes the whole directory
            for subdir, model in sorted(models.items(), key=lambda item: item[0] == "."):
                copy_non_weight_files(self.hf_files_dir, staging / subdir / mcore_io.HF_FILES_DIR)
                mcore_io.fsync_tree(staging / subdir)
                mcore_io.write_checkpoint_meta(
                    staging / subdir,
                    model.hf_arch,
                    tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
                    pipeline_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
                    **_virtual_pipeline_meta(),
                    padded_vocab_size=model.padded_vocab_size,
                    params_dtype=next(model.parameters()).dtype,
                    phase=self.phase,
                    step=self.state.step,
                    world_size=dist.get_world_size() if dist.is_initialized() else 1,
                    final=final,
                )
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            atomic_write_text(root / LATEST_FILE, name + "\n")
            self._prune(keep=getattr(self.ckpt_cfg, "keep_last", 2), protect=target)
        if dist.is_initialized():
            dist.barrier()
        return target

    def _prune(self, keep: int, protect: Path) -> None:
        prune_checkpoints(self.checkpoint_root, keep, {protect.name, *self.protected})

    def latest_checkpoint(self) -> Optional[Path]:
        return latest_checkpoint(self.checkpoint_root)

    def load_checkpoint(self, ckpt_dir: Path, extra_models: Optional[dict] = None) -> None:
        """Collective. Restore weights (any layout), optimizer, scheduler, RNG and data position."""

        meta = mcore_io.load_model(self.model, ckpt_dir)
        for subdir, model in (extra_models or {}).items():
            mcore_io.load_model(model, ckpt_dir / subdir)
        written_virtual = meta.get(VIRTUAL_PIPELINE_META_KEY)
        if written_virtual != parallel_state.get_virtual_pipeline_model_parallel_world_size():
            # the optimizer's state follows the model chunks' parameters
            raise ValueError(
                f"{ckpt_dir}: its optimizer state was written at parallel.virtual_pipeline_model_parallel_size="
                f"{written_virtual} and this run has {parallel_state.get_virtual_pipeline_model_parallel_world_size()}; "
                "resume at the same setting (the model weights alone load at any layout: start a new run from them)"
            )
        if self.distributed_optimizer or (ckpt_dir / DISTRIBUTED_OPTIMIZER_DIR).is_dir():
            self._load_distributed_optimizer(ckpt_dir, meta)
        else:
            self._load_adamw(ckpt_dir, meta)
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        self.state = TrainState(step=state["step"], data=state["data"])

    def _load_adamw(self, ckpt_dir: Path, meta: dict) -> None:
        """The AdamW path's optimizer, scheduler and RNG state: at the layout that wrote them."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if meta.get("world_size", world) != world:
            raise ValueError(
                f"{ckpt_dir} was written by {meta.get('world_size')} ranks; optimizer state resumes only at the "
                f"same layout, and this run has {world}"
            )
        rank = dist.get_rank() if dist.is_initialized() else 0
        # map_location: tensors written on a GPU would otherwise load onto the device that wrote them,
        # a second copy beside the optimizer's own (load_state_dict moves the state to the parameters'
        # device) or a crash where that device is absent.
        legacy = ckpt_dir / f"train_state_rank{rank:05d}.pt"  # one file per rank, before the optimizer file per MP rank
        if legacy.is_file() and not (ckpt_dir / _optimizer_file_name()).is_file():
            saved = torch.load(legacy, map_location="cpu", weights_only=False)
            rng = saved["rng"]
        else:
            saved = torch.load(ckpt_dir / _optimizer_file_name(), map_location="cpu", weights_only=False)
            rng = torch.load(ckpt_dir / f"rng_state_rank{rank:05d}.pt", map_location="cpu", weights_only=False)["rng"]
        with torch.no_grad():
            for name, master in self.masters.items():
                if name in saved["masters"]:
                    master.copy_(saved["masters"][name])
                elif master is not self._params[name]:
                    master.copy_(self._params[name])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(rng)

    def _load_distributed_optimizer(self, ckpt_dir: Path, meta: dict) -> None:
        """The optimizer state of ``optimizer.distributed: true``: any data-parallel size, the same TP."""
        written_distributed = (ckpt_dir / DISTRIBUTED_OPTIMIZER_DIR).is_dir()
        if written_distributed != self.distributed_optimizer:
            raise ValueError(
                f"{ckpt_dir} holds the optimizer state of optimizer.distributed={str(written_distributed).lower()}, "
                f"and this run has optimizer.distributed={str(self.distributed_optimizer).lower()}; resume with the "
                "setting it was written with (the model weights alone load either way: start a new run from them)"
            )
        tp = parallel_state.get_tensor_model_parallel_world_size()
        if meta.get("tensor_parallel_size", tp) != tp:
            raise ValueError(
                f"{ckpt_dir}: the distributed optimizer's state was written at tensor_model_parallel_size="
                f"{meta.get('tensor_parallel_size')} and this run has {tp}; it reloads at another "
                "data-parallel size, not at another tensor-parallel size"
            )
        load_distributed_optimizer(self.optimizer, self.scheduler, ckpt_dir / DISTRIBUTED_OPTIMIZER_DIR)
        # each rank's RNG: its own where the writer had as many ranks, else that of the writer's rank
        # with the same position in the (TP-fastest) rank order modulo its world
        rank = dist.get_rank()
        written_world = meta.get("world_size", dist.get_world_size())
        rng_file = ckpt_dir / f"rng_state_rank{rank % written_world:05d}.pt"
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False)["rng"])

    def close(self) -> None:
        self.metrics.close()


def prune_checkpoints(root: Path, keep_last: int, protect: Iterable[str] = ()) -> list[Path]:
    """Delete the step checkpoints under ``root`` except the newest ``keep_last`` and those named in
    ``protect``; returns what was deleted."""
    protect = set(protect)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    doomed = [p for p in steps[: max(0, len(steps) - keep_last)] if p.name not in protect]
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def counted_once(parameters) -> set[str]:
    """The names among :func:`chunk_parameters` whose tensors a whole-model sum takes on this rank,
    so that :func:`sum_over_model_parallel` counts every weight once: a tensor replicated over TP
    from TP rank 0 only, and not the last pipeline stage's copy of a tied embedding (the first
    stage has it)."""
    replicated = set() if parallel_state.get_tensor_model_parallel_rank() == 0 else _replicated_param_names(parameters)
    return {name for name, chunk, chunk_name, _ in parameters
            if name not in replicated and not is_tied_output_copy(chunk, chunk_name)}


def sum_over_model_parallel(total: torch.Tensor) -> torch.Tensor:
    """``total`` summed in place over this rank's TP group, then its pipeline group (a collective)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    if pipeline_parallel_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total


def chunk_parameters(model) -> list[tuple[str, Any, str, torch.nn.Parameter]]:
    """(name in the Trainer, its chunk, name in the chunk, parameter) for every parameter: the
    GPTModel's own names, prefixed with ``chunk<v>.`` for a model in chunks (each chunk names its
    layers from 0)."""
    if not isinstance(model, list):
        return [(name, model, name, param) for name, param in model.named_parameters()]
    return [(f"chunk{index}.{name}", chunk, name, param)
            for index, chunk in enumerate(model) for name, param in chunk.named_parameters()]


def _replicated_param_names(parameters) -> set[str]:
    """The names (in the Trainer) among :func:`chunk_parameters` of the tensors replicated over TP."""
    tables = {id(chunk): model_param_mappings(chunk) for _, chunk, _, _ in parameters}
    return {name for name, chunk, chunk_name, _ in parameters if tables[id(chunk)][chunk_name].kind is Kind.REPLICATED}


def _zero_weight(loss_sum: torch.Tensor, num_tokens, logs: dict):
    """A loss result times zero: gradients of zero through the whole graph (the schedule still runs
    its backward), no tokens, every additive log zero."""
    return loss_sum * 0.0, num_tokens * 0, {key: value * 0 for key, value in logs.items()}


def _with_token_logs(loss_sum: torch.Tensor, num_tokens, logs: dict):
    """A phase's loss result in megatron's per-token form: (loss sum, int token count, logs); the
    loss sum and the count join the logs so that the step can report the global token mean."""
    num_tokens = torch.as_tensor(num_tokens, device=loss_sum.device).detach().to(torch.int)
    return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens, **logs}


def _reduce_logs(logs: Sequence[dict]) -> dict:
    """Each log summed over this rank's micro-batches, then over DP x CP in one all-reduce (and one
    host sync): every log is an additive quantity over its rank's tokens."""
    keys = list(logs[0])
    for log in logs:
        if list(log) != keys:
            raise ValueError(f"every micro-batch's loss function must log the same keys: {keys} vs {list(log)}")
    device = logs[0]["loss_sum"].device
    totals = torch.stack([
        sum(torch.as_tensor(log[key], device=device).detach().to(torch.float64) for log in logs) for key in keys
    ])
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    return dict(zip(keys, totals.tolist()))


def split_micro_batches(items: Sequence, micro_batch_size: int, max_tokens: Optional[int] = None,
                        length=len) -> list[list]:
    """This rank's items in micro-batches of at most ``micro_batch_size`` rows, in order; with
    ``max_tokens``, sorted by length and packed so that no micro-batch pads to more than
    ``max_tokens`` tokens (rows x its longest sequence; a longer single sequence goes alone).
    Every loss is a token mean over the global batch, so the grouping leaves the step's gradient
    unchanged: packing only removes padding."""
    if max_tokens is None:
        return [list(items[i : i + micro_batch_size]) for i in range(0, len(items), micro_batch_size)]
    batches: list[list] = []
    current: list = []
    width = 0
    for item in sorted(items, key=length):
        grown = max(width, length(item))
        if current and (len(current) >= micro_batch_size or grown * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, grown = [], length(item)
        current.append(item)
        width = grown
    if current:
        batches.append(current)
    return batches


VIRTUAL_PIPELINE_META_KEY = "virtual_pipeline_parallel_size"


def _virtual_pipeline_meta() -> dict:
    """The virtual pipeline size for a checkpoint's metadata, when there are virtual stages."""
    size = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    return {} if size is None else {VIRTUAL_PIPELINE_META_KEY: size}


def _optimizer_file_name() -> str:
    """This model-parallel rank's optimizer file (shared by its data- and context-parallel ranks)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    return f"optimizer_tp{tp_rank:03d}_pp{pp_rank:03d}.pt"


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
