"""One training loop for every phase: megatron-core DDP, AdamW, LR schedule, clipping, checkpoints, metrics.

A phase hands :meth:`Trainer.train_step` the micro-batches of one optimizer step and a loss
function ``loss_fn(model, micro_batch) -> (objective, logs)``. The objective is already
normalised over the global batch (``parallel.context_parallel.token_mean_loss``), so gradients
are simply accumulated over the micro-batches; megatron-core's DDP and ``finalize_model_grads``
reduce them over DP x CP and fix up the parameters that see only their TP rank's part (QK-norm).

Optimizer: ``torch.optim.AdamW`` over fp32 master copies of the TP-local parameters (the
parameters themselves when they are fp32), fed from DDP's fp32 ``main_grad`` buffers and copied
back to bf16 after each step, with no weight decay on norms and biases (megatron's default).
megatron-core's own optimizers (and its DistributedOptimizer, which shards this state over DP)
allocate on CUDA and cannot run on the CPU machines this is developed on, so they are not used;
the optimizer state is saved per rank and resumes at the same parallel layout (the model weights
load at any layout).

Checkpoints (``<run>/checkpoints/<phase>/step_NNNNNNN``) are sdzero-mcore model checkpoints
(megatron-core dist format + ``hf/`` + ``sdzero_checkpoint.json``, written last) with the
optimizer, scheduler, RNG and data position beside them. A step directory appears complete or
not at all (staged, then renamed); ``latest`` names the newest complete one.
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
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from sdzero_mcore.fileio import atomic_write_text

LATEST_FILE = "latest"


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to 1, then constant or cosine down to ``min_ratio`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
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
    """Per-step metrics: an append-only JSONL file and TensorBoard, written by global rank 0."""

    def __init__(self, run_dir: Path, phase: str, *, jsonl: bool = True, tensorboard: bool = False):
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = run_dir / "metrics" / f"{phase}.jsonl"
        self.phase = phase
        self.jsonl = jsonl and self.enabled
        self.tb = None
        if self.jsonl:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError("logging.tensorboard=true needs the tensorboard package (pip install tensorboard)") from error
            self.tb = SummaryWriter(str(run_dir / "tensorboard" / phase))

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
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{self.phase}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.model = model
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.hf_files_dir = Path(hf_files_dir)
        self.total_steps = total_steps
        self.ckpt_cfg = checkpoint_cfg
        self.ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
            module=model,
        )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if any(p.dtype == torch.float16 for _, p in named):
            raise ValueError("float16 training needs loss scaling, which this trainer does not do; use bfloat16 or float32")
        # bf16 weights train through fp32 master copies: an AdamW update of lr 5e-6 is far below
        # bf16's resolution, so applying it to the bf16 tensors directly would mostly round away.
        self.masters = {
            n: (p.detach().float().clone().requires_grad_(True) if p.dtype != torch.float32 else p) for n, p in named
        }
        groups = [
            {"params": [self.masters[n] for n, p in named if not _no_weight_decay(n, p)], "weight_decay": optim_cfg.weight_decay},
            {"params": [self.masters[n] for n, p in named if _no_weight_decay(n, p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=optim_cfg.lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2), eps=optim_cfg.adam_eps
        )
        self._named = named
        self._params = dict(named)
        warmup = warmup_steps_for(optim_cfg, total_steps)
        min_ratio = optim_cfg.min_lr / optim_cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_multiplier(
                step, total_steps=total_steps, warmup_steps=warmup, schedule=optim_cfg.lr_schedule, min_ratio=min_ratio
            ),
        )
        self.clip_grad = optim_cfg.clip_grad
        self.state = TrainState()
        self.metrics = MetricsWriter(
            self.run_dir,
            phase,
            jsonl=getattr(logging_cfg, "jsonl", True),
            tensorboard=getattr(logging_cfg, "tensorboard", False),
        )
        self._replicated = _replicated_param_names(model)
        self._last_log = time.perf_counter()

    # --- one optimizer step -------------------------------------------------------------------

    def train_step(self, micro_batches: Iterable[Any], loss_fn: Callable) -> dict:
        """Forward/backward every micro-batch, reduce, clip, step. Returns the step's metrics."""
        from megatron.core.distributed import finalize_model_grads

        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)
        logs: list[dict] = []
        for micro_batch in micro_batches:
            objective, log = loss_fn(self.ddp, micro_batch)
            objective.backward()
            logs.append(log)
        finalize_model_grads([self.ddp])
        for name, param in self._named:
            self.masters[name].grad = param.main_grad  # fp32, reduced over DP x CP
        grad_norm = self.grad_norm()
        if self.clip_grad > 0 and math.isfinite(grad_norm) and grad_norm > self.clip_grad:
            scale = self.clip_grad / (grad_norm + 1e-6)
            for master in self.masters.values():
                master.grad.mul_(scale)
        lr = self.optimizer.param_groups[0]["lr"]
        if math.isfinite(grad_norm):
            self.optimizer.step()
            with torch.no_grad():
                for name, param in self._named:
                    if self.masters[name] is not param:
                        param.copy_(self.masters[name])
        for master in self.masters.values():
            master.grad = None  # main_grad is the DDP buffer; nothing else to keep between steps
        self.scheduler.step()
        self.state.step += 1
        metrics = {"grad_norm": grad_norm, "lr": lr, "skipped": not math.isfinite(grad_norm)}
        metrics.update(_sum_logs(logs))
        return metrics

    def grad_norm(self) -> float:
        """The L2 norm of the whole model's gradient: TP shards once each, replicated tensors once."""
        from megatron.core import parallel_state

        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        # summed on the device: one host sync for the whole model, not one per parameter
        total = torch.zeros((), dtype=torch.float64, device=next(self.model.parameters()).device)
        for name, master in self.masters.items():
            if master.grad is None or (name in self._replicated and tp_rank != 0):
                continue
            total += master.grad.detach().double().pow(2).sum()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
        return float(total.sqrt())

    def log(self, metrics: dict, *, tokens: Optional[float] = None) -> None:
        """Write a step's metrics, with its wall time (since the previous log: rollout and training)
        and, given the step's trained tokens, the throughput."""
        now = time.perf_counter()
        elapsed = now - self._last_log
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
        from sdzero_mcore.checkpoint import mcore_io
        from sdzero_mcore.checkpoint.hf_io import copy_non_weight_files

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
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                # fp32 masters of 16-bit weights: the checkpointed bf16 weights alone lose precision
                "masters": {n: m.detach() for n, m in self.masters.items() if m is not self._params[n]},
                "scheduler": self.scheduler.state_dict(),
                "rng": _rng_state(),
            },
            staging / f"train_state_rank{rank:05d}.pt",
        )
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            atomic_write_text(staging / "trainer_state.json", json.dumps({"step": self.state.step, "data": self.state.data}) + "\n")
            from megatron.core import parallel_state

            # sub-models first: the top-level marker, written last, completes the whole directory
            for subdir, model in sorted(models.items(), key=lambda item: item[0] == "."):
                copy_non_weight_files(self.hf_files_dir, staging / subdir / mcore_io.HF_FILES_DIR)
                mcore_io.fsync_tree(staging / subdir)
                mcore_io.write_checkpoint_meta(
                    staging / subdir,
                    model.hf_arch,
                    tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
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
        steps = sorted(p for p in self.checkpoint_root.glob("step_*") if p.is_dir())
        for old in steps[:-keep]:
            if old != protect:
                shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Optional[Path]:
        return latest_checkpoint(self.checkpoint_root)

    def load_checkpoint(self, ckpt_dir: Path, extra_models: Optional[dict] = None) -> None:
        """Collective. Restore weights (any layout), optimizer, scheduler, RNG and data position."""
        from sdzero_mcore.checkpoint import mcore_io

        meta = mcore_io.load_model(self.model, ckpt_dir)
        for subdir, model in (extra_models or {}).items():
            mcore_io.load_model(model, ckpt_dir / subdir)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if meta.get("world_size", world) != world:
            raise ValueError(
                f"{ckpt_dir} was written by {meta.get('world_size')} ranks; optimizer state resumes only at the "
                f"same layout, and this run has {world}"
            )
        rank = dist.get_rank() if dist.is_initialized() else 0
        saved = torch.load(ckpt_dir / f"train_state_rank{rank:05d}.pt", weights_only=False)
        with torch.no_grad():
            for name, master in self.masters.items():
                if name in saved["masters"]:
                    master.copy_(saved["masters"][name])
                elif master is not self._params[name]:
                    master.copy_(self._params[name])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        self.state = TrainState(step=state["step"], data=state["data"])

    def close(self) -> None:
        self.metrics.close()


def final_checkpoint(root: Path) -> Optional[Path]:
    """The newest checkpoint under ``root`` if it is the one a finished run wrote last."""
    from sdzero_mcore.checkpoint.mcore_io import read_checkpoint_meta

    latest = latest_checkpoint(root)
    return latest if latest is not None and read_checkpoint_meta(latest).get("final") else None


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete step checkpoint under ``root`` (incomplete ones are never named ``step_*``)."""
    from sdzero_mcore.checkpoint.mcore_io import META_FILE

    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())
    return complete[-1] if complete else None


def _replicated_param_names(model) -> set[str]:
    from sdzero_mcore.checkpoint.mapping import Kind, mappings_by_param_name

    table = mappings_by_param_name(model.hf_arch)
    return {name for name, _ in model.named_parameters() if table[name].kind is Kind.REPLICATED}


def _sum_logs(logs: list[dict]) -> dict:
    """Sums over micro-batches of additive quantities (each micro-batch logs its share)."""
    total: dict = {}
    for log in logs:
        for key, value in log.items():
            total[key] = total.get(key, 0.0) + (float(value) if torch.is_tensor(value) else value)
    return total


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
