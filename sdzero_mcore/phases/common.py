"""What every phase sets up the same way: process groups, models, tokenizer, questions, rewards, engine.

A phase reads the run config, calls these, and then runs its own loop (see ``self_distill.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from sdzero_mcore.config import ConfigError, SDZeroConfig

logger = logging.getLogger(__name__)


@dataclass
class ModelSource:
    """Where a phase's starting weights are: an sdzero-mcore checkpoint or a HF directory."""

    path: Path
    kind: str  # "mcore" | "hf"

    @property
    def hf_files_dir(self) -> Path:
        """The directory with config.json and the tokenizer files."""
        return self.path / "hf" if self.kind == "mcore" else self.path


def start_source(cfg: SDZeroConfig, init_from: Optional[str], *, prefer_mcore: bool = False) -> ModelSource:
    """The checkpoint a phase starts from: ``init_from``, else model.hf_dir / model.mcore_dir
    (model.mcore_dir first with ``prefer_mcore``: Phase 2 starts from the SRT checkpoint)."""
    keys = ("mcore_dir", "hf_dir") if prefer_mcore else ("hf_dir", "mcore_dir")
    if init_from is not None:
        return resolve_model_source(init_from, "--init-from")
    for key in keys:
        if getattr(cfg.model, key):
            return resolve_model_source(getattr(cfg.model, key), f"model.{key}")
    raise ConfigError(f"set model.{keys[0]} or model.{keys[1]} (or --init-from): the checkpoint this phase starts from")


def resolve_model_source(path: str | Path, what: str) -> ModelSource:
    """Check a checkpoint path before any work starts; the error names ``what`` (a config key)."""
    from sdzero_mcore.checkpoint.mcore_io import META_FILE

    from sdzero_mcore.trainer import LATEST_FILE, final_checkpoint, latest_checkpoint

    path = Path(path)
    if (path / LATEST_FILE).is_file() and latest_checkpoint(path) is not None:
        # a phase's checkpoint directory: its final checkpoint, else (a run still going or stopped) its newest
        final = final_checkpoint(path)
        if final is None:
            logger.warning("%s: %s has no final checkpoint; using its newest, %s", what, path, latest_checkpoint(path).name)
        path = final or latest_checkpoint(path)
    if (path / META_FILE).is_file():
        return ModelSource(path, "mcore")
    if (path / "config.json").is_file():
        return ModelSource(path, "hf")
    if not path.exists():
        raise ConfigError(f"{what}: checkpoint {path} does not exist")
    raise ConfigError(
        f"{what}: {path} is neither an sdzero-mcore checkpoint (no {META_FILE}) nor a HF model directory "
        "(no config.json)"
    )


def params_dtype(cfg: SDZeroConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, cfg.model.dtype)


def check_layout(cfg: SDZeroConfig, source: ModelSource) -> None:
    """TP must divide the heads: checked from config.json before any process group exists."""
    from sdzero_mcore.models.hf_config import ModelArch

    arch = ModelArch.from_hf_dir(source.hf_files_dir)
    try:
        arch.check_tensor_parallel(cfg.parallel.tensor_model_parallel_size)
    except ValueError as error:
        raise ConfigError(f"parallel.tensor_model_parallel_size: {error}") from None


def setup_parallel(cfg: SDZeroConfig):
    from sdzero_mcore.parallel import init_distributed, initialize_model_parallel

    init_distributed(cfg.parallel.backend, timeout_minutes=cfg.parallel.timeout_minutes)
    return initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        context_parallel_size=cfg.parallel.context_parallel_size,
        seed=cfg.seed,
    )


def build_model(cfg: SDZeroConfig, source: ModelSource):
    from sdzero_mcore.checkpoint.loading import build_model_from_hf, build_model_from_mcore

    kwargs = dict(
        params_dtype=params_dtype(cfg),
        transformer_impl=cfg.model.transformer_impl,
        local_attention=cfg.model.local_attention,
        cp_comm_type=cfg.parallel.cp_comm_type,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
    )
    build = build_model_from_mcore if source.kind == "mcore" else build_model_from_hf
    return build(source.path, **kwargs)


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.hf_files_dir)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def phase_questions(cfg: SDZeroConfig) -> tuple[list, list]:
    """(phase 1, phase 2) questions: loaded, validated and split as the data section says."""
    from sdzero_mcore.data import load_from_config, split_phases

    loaded = load_from_config(cfg.data)
    return split_phases(loaded.questions, cfg.data.phase1_questions, cfg.data.phase2_questions, cfg.data.split_seed)


def reward_name(cfg: SDZeroConfig, questions: Sequence) -> str:
    """The verifier for the data: the synthetic task's own, code when rows carry tests, else math."""
    if cfg.data.dataset.startswith("synthetic:"):
        return cfg.data.dataset
    return "code" if questions and questions[0].tests is not None else "math"


def make_reward_fn(cfg: SDZeroConfig, questions: Sequence):
    from sdzero_mcore.rewards import get_reward_fn

    name = reward_name(cfg, questions)
    if name.startswith("synthetic:"):  # verified in-process: pure Python, bounded work
        return get_reward_fn(name)
    if name == "code":  # its timeout is a per-sample budget over all tests: keep the reward's default
        return get_reward_fn(name, num_workers=cfg.rollout.reward_workers)
    return get_reward_fn(name, timeout_s=cfg.rollout.reward_timeout_s, num_workers=cfg.rollout.reward_workers)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel_shard(items: Sequence) -> list:
    """This data-parallel rank's share of a step's items (round robin)."""
    from megatron.core import parallel_state

    size = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    return list(items[rank::size])


def reward_target(question) -> object:
    """What the verifier compares a response with: a code question's tests, a synthetic row (countdown
    checks the numbers used and the target), else the answer."""
    if question.tests is not None:
        return question.tests
    if "task" in question.extra:
        return {**question.extra, "answer": question.answer}
    return question.answer


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_on_rank0(fn, signal_dir: Path, poll_s: float = 2.0):
    """``fn()`` on global rank 0, its (JSON-able) result on every rank.

    The other ranks wait by polling for a result file rather than in a collective: rank 0's work
    (collecting, evaluating) can outlast the process group's timeout. If rank 0 fails, the
    launcher (torchrun / srun) ends the other ranks.
    """
    import json
    import time
    import uuid

    from sdzero_mcore.fileio import atomic_write_text

    token = broadcast_object(uuid.uuid4().hex)
    signal = Path(signal_dir) / f".rank0-result-{token}.json"
    if is_rank0():
        result = fn()
        signal.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(signal, json.dumps({"result": result}))
    else:
        while not signal.is_file():
            time.sleep(poll_s)
        result = json.loads(signal.read_text())["result"]
    barrier()  # everyone has read the result
    if is_rank0():
        signal.unlink(missing_ok=True)
    return result


def serving_engine(cfg: SDZeroConfig, source: ModelSource, tokenizer):
    """Rank 0's rollout engine serving ``source`` (None on other ranks). A HF directory loads
    directly; an sdzero-mcore checkpoint is read by megatron at the configured layout and streamed
    in (every rank joins), so both formats serve the same weights."""
    from sdzero_mcore.rollout import make_rollout_engine

    setup_parallel(cfg)  # also when rank 0 alone loads a HF directory: it must know it is rank 0
    dtype = params_dtype(cfg)
    if source.kind == "hf":
        if not is_rank0():
            return None
        return make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=dtype, load_weights=True)
    model = build_model(cfg, source)
    engine = make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=dtype) if is_rank0() else None
    sync_engine(engine, model, cfg.rollout.weight_sync_bucket_mb)
    return engine


def collective_device() -> torch.device:
    """Where small tensors for collectives live: the current GPU with NCCL, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def split_micro_batches(items: Sequence, micro_batch_size: int, max_tokens: Optional[int] = None,
                        length=len) -> list[list]:
    """This rank's items in micro-batches of at most ``micro_batch_size`` rows, in order; with
    ``max_tokens``, sorted by length and packed so that no micro-batch pads to more than
    ``max_tokens`` tokens (rows x its longest sequence; a longer single sequence goes alone).
    Every loss here is a token mean over the global batch, so the grouping leaves the step's
    gradient unchanged: packing only removes padding."""
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


def pad_micro_batches(micro: list, make_filler) -> list:
    """Append ``make_filler()`` micro-batches (no loss tokens) until every data-parallel rank has as
    many as the busiest one. Every micro-batch runs collectives (DDP, the loss's all-reduces), so
    ranks with different counts would pair unrelated collectives and hang."""
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    count = torch.tensor(len(micro), device=collective_device())
    if dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
    return micro + [make_filler() for _ in range(int(count) - len(micro))]


def release(*resources) -> None:
    """End an on-policy phase: close progress bars, trainers and reward pools, shut engines down (None skipped)."""
    errors = []
    for resource in resources:
        if resource is not None:
            try:
                (resource.shutdown if hasattr(resource, "shutdown") else resource.close)()
            except Exception as error:  # the others are still released; the first failure is raised
                errors.append(error)
    if errors:
        raise errors[0]


def sync_engine(engine, model, bucket_mb: int) -> None:
    """Stream ``model``'s weights into the engine: every rank streams (TP collectives), rank 0 feeds it."""
    from sdzero_mcore.parallel.resharding import iter_hf_buckets

    buckets = iter_hf_buckets(model, bucket_mb * 2**20)
    if engine is not None:
        engine.update_weights(buckets)
    else:
        for _ in buckets:
            pass


# ---- generation budget (PAPER.md Appendix C.2: generations and generated tokens per method) ----

BUDGET_DIR = "budget"


def record_budget(run_dir: str | Path, phase: str, generations: int, generated_tokens: int) -> None:
    """Write what ``phase`` generated to ``run_dir/budget/<phase>.json`` (atomically, replacing)."""
    import json

    from sdzero_mcore.fileio import atomic_write_text

    path = Path(run_dir) / BUDGET_DIR / f"{phase}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"generations": int(generations), "generated_tokens": int(generated_tokens)}) + "\n")


def read_budget(run_dir: str | Path, phases: Sequence[str]) -> dict:
    """The summed budget of ``phases`` in ``run_dir``; a phase without a record is an error."""
    import json

    total = {"generations": 0, "generated_tokens": 0}
    for phase in phases:
        path = Path(run_dir) / BUDGET_DIR / f"{phase}.json"
        if not path.is_file():
            raise ConfigError(f"no generation budget recorded for phase {phase!r}: {path} does not exist")
        record = json.loads(path.read_text())
        for key in total:
            total[key] += int(record[key])
    return total


# ---- held-out questions of a synthetic task (evaluation), disjoint from both phases ----------

SYNTHETIC_HELDOUT_RESERVED = 500  # reserved for evaluation; step 0 (sft) never trains on them


def phase_question_ids(cfg: SDZeroConfig) -> set[str]:
    phase1, phase2 = phase_questions(cfg)
    return {q.id for q in phase1 + phase2}


def fresh_synthetic_questions(cfg: SDZeroConfig, size: int, exclude: set[str], *, seed_offset: int = 0) -> list:
    """The distinct questions among ``size`` rows of the synthetic task (generator seed
    ``data.synthetic_seed + seed_offset``) whose ids are not in ``exclude``, in generation order."""
    from dataclasses import replace

    from sdzero_mcore.data import load_from_config

    data = replace(cfg.data, synthetic_size=size, synthetic_seed=cfg.data.synthetic_seed + seed_offset)
    return list({q.id: q for q in load_from_config(data).questions if q.id not in exclude}.values())


def heldout_questions(cfg: SDZeroConfig, count: int, *, phase_ids: Optional[set[str]] = None) -> list:
    """``count`` questions of the synthetic task that neither phase uses (another generator seed).
    ``phase_ids``: both phases' question ids when the caller has them already."""
    if not cfg.data.dataset.startswith("synthetic:"):
        raise ConfigError("held-out questions are generated for synthetic tasks only; pass an eval dataset instead")
    if count > SYNTHETIC_HELDOUT_RESERVED:
        raise ConfigError(f"eval.questions ({count}) is more than the {SYNTHETIC_HELDOUT_RESERVED} held-out questions a synthetic task reserves")
    used = phase_question_ids(cfg) if phase_ids is None else phase_ids
    fresh = fresh_synthetic_questions(cfg, 2 * SYNTHETIC_HELDOUT_RESERVED + len(used), used, seed_offset=1)
    return fresh[:SYNTHETIC_HELDOUT_RESERVED][:count]


def check_log_hash(log: Path, chash: str, problem: str) -> None:
    """Refuse an append-only log whose first record carries another ``config_hash`` (before any work)."""
    import json

    if not log.is_file():
        return
    with log.open() as handle:
        first = handle.readline()
    try:
        found = json.loads(first).get("config_hash") if first.strip() else None
    except json.JSONDecodeError:
        return  # a cut first line: the log's reader drops it
    if found is not None and found != chash:
        raise ConfigError(f"{log} {problem} (hash {found}, this one {chash}); "
                          "use another output_dir or delete the log to start over")
