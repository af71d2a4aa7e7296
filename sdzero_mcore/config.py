"""Typed configuration: dataclass defaults, a YAML file on top, then dotted command-line overrides.

OmegaConf structured configs do the merging and type conversion; every error it raises is
translated into :class:`ConfigError`, whose message names the full dotted key and what is allowed.

Value constraints live next to each field (``field(metadata={"rule": ...})``) and cross-field
constraints in ``_check_relations``. Both run in :meth:`_Section.validate`, a walk over the tree
that carries the dotted path prefix, so an error deep in the tree names e.g.
``srt_train.optimizer.warmup_ratio`` rather than just ``warmup_ratio``.
"""

import argparse
import difflib
import hashlib
import io
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union, get_args, get_origin

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode
from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException, ValidationError

from sdzero_mcore.fileio import atomic_write_text

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "GRPOConfig",
    "RFTConfig",
    "SFTConfig",
    "LoggingConfig",
    "MathConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PromptConfig",
    "PromptsConfig",
    "RECIPES",
    "RolloutConfig",
    "SDZeroConfig",
    "SRTCollectConfig",
    "SRTTrainConfig",
    "ValidationConfig",
    "add_config_args",
    "config_from_args",
    "config_hash",
    "config_to_yaml",
    "load_config",
    "save_config",
]


class ConfigError(ValueError):
    """An invalid configuration; the message names the dotted key and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Field rules


@dataclass(frozen=True)
class _Rule:
    """A constraint on one field's value: ``test`` must hold, ``allowed`` describes what passes."""

    test: Callable[[Any], bool]
    allowed: str
    problem: str = "is out of range; allowed:"

    def check(self, key: str, value: Any) -> None:
        if not self.test(value):
            raise ConfigError(f"{key}: {value!r} {self.problem} {self.allowed}")


def _one_of(*options: str) -> _Rule:
    return _Rule(lambda value: value in options, ", ".join(options), problem="is not one of:")


_AT_LEAST_1 = _Rule(lambda v: v >= 1, ">= 1")
_NON_NEGATIVE = _Rule(lambda v: v >= 0, ">= 0")
_POSITIVE = _Rule(lambda v: v > 0, "> 0")
_NULL_OR_AT_LEAST_1 = _Rule(lambda v: v is None or v >= 1, "null or >= 1")
_FRACTION_CLOSED = _Rule(lambda v: 0 <= v <= 1, "[0, 1]")
_FRACTION_HALF_OPEN = _Rule(lambda v: 0 <= v < 1, "[0, 1)")
_PROBABILITY = _Rule(lambda v: 0 < v <= 1, "(0, 1]")
_FRACTION_OPEN = _Rule(lambda v: 0 < v < 1, "(0, 1)")


RECIPE_NAMES = ("paper", "release")  # the keys of RECIPES (defined after the sections)


def _checked(default: Any, rule: _Rule) -> Any:
    """A dataclass field with a default and a value rule that :meth:`_Section.validate` enforces."""
    return field(default=default, metadata={"rule": rule})


# Set while load_config builds the dataclasses: it validates the finished tree once, with full
# dotted paths, instead of each nested section validating itself with a path relative to it.
_validation_deferred: ContextVar[bool] = ContextVar("sdzero_config_validation_deferred", default=False)


@contextmanager
def _deferred_validation() -> Iterator[None]:
    token = _validation_deferred.set(True)
    try:
        yield
    finally:
        _validation_deferred.reset(token)


class _Section:
    """Base of all config dataclasses: validates field rules and cross-field constraints."""

    def __post_init__(self) -> None:
        if not _validation_deferred.get():
            self.validate()

    def validate(self, prefix: str = "") -> None:
        """Check this section and its subsections; ``prefix`` is this section's dotted path plus '.'."""
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, _Section):
                value.validate(f"{prefix}{f.name}.")
            elif "rule" in f.metadata:
                f.metadata["rule"].check(prefix + f.name, value)
        self._check_relations(prefix)

    def _check_relations(self, prefix: str) -> None:
        """Constraints between fields; sections that have some override this."""


def _check_batch_sizes(prefix: str, global_batch_size: int, micro_batch_size: int) -> None:
    if global_batch_size % micro_batch_size:
        raise ConfigError(
            f"{prefix}global_batch_size ({global_batch_size}) must be a multiple of "
            f"{prefix}micro_batch_size ({micro_batch_size})"
        )


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass
class ModelConfig(_Section):
    """The policy model: where its weights are and how megatron-core builds it."""

    hf_dir: Optional[str] = None  # HF checkpoint dir: config.json, safetensors, tokenizer
    mcore_dir: Optional[str] = None  # megatron-core checkpoint written by `sdzero convert`
    # auto = bfloat16 on GPU, float32 on CPU
    dtype: str = _checked("auto", _one_of("auto", "bfloat16", "float16", "float32"))
    # auto = transformer_engine when it is importable, else local
    transformer_impl: str = _checked("auto", _one_of("auto", "local", "transformer_engine"))
    # core attention of the local spec: fused SDPA (supports CP), or megatron-core's unfused one
    local_attention: str = _checked("sdpa", _one_of("sdpa", "unfused"))
    make_vocab_size_divisible_by: int = _checked(128, _AT_LEAST_1)
    max_seq_length: int = _checked(4096, _AT_LEAST_1)
    # activation recompute in training (megatron-core's): none; selective = its recompute_modules
    # default, the core attention; full = whole layers, keeping only their inputs (recompute_method,
    # recompute_num_layers below)
    recompute: str = _checked("none", _one_of("none", "selective", "full"))
    # full only: uniform = checkpoint the input of every recompute_num_layers layers and recompute
    # each such chunk; block = recompute the first recompute_num_layers layers (of each pipeline
    # stage) and keep the others' activations
    recompute_method: str = _checked("uniform", _one_of("uniform", "block"))
    recompute_num_layers: int = _checked(1, _AT_LEAST_1)


@dataclass
class ParallelConfig(_Section):
    """Model-parallel layout; data parallelism takes the remaining ranks."""

    tensor_model_parallel_size: int = _checked(1, _AT_LEAST_1)
    # pipeline stages (megatron-core's 1F1B schedule): each holds num_layers / PP consecutive layers,
    # the first the embedding, the last the final norm, the output layer and the loss
    pipeline_model_parallel_size: int = _checked(1, _AT_LEAST_1)
    context_parallel_size: int = _checked(1, _AT_LEAST_1)
    # TransformerEngine's CP scheme; the local spec's SDPA attention always all-gathers K and V
    cp_comm_type: str = _checked("p2p", _one_of("p2p", "all_gather", "a2a", "a2a+p2p"))
    # cp_comm_type=a2a+p2p only: the sizes of its two levels of CP groups, [a2a, p2p], whose product
    # is context_parallel_size (e.g. [2, 4] for CP 8: a2a inside pairs of ranks, p2p across the pairs)
    hierarchical_context_parallel_sizes: Optional[list[int]] = None
    backend: str = _checked("auto", _one_of("auto", "nccl", "gloo"))
    # of the NCCL (or gloo) collectives of training
    timeout_minutes: int = _checked(30, _AT_LEAST_1)
    # how long the other ranks wait for rank 0's rollout or validation (generation and scoring), in a
    # gloo group of their own: a step's rollout may outlast timeout_minutes by far
    handoff_timeout_minutes: int = _checked(24 * 60, _AT_LEAST_1)

    def _check_relations(self, prefix: str) -> None:
        sizes = self.hierarchical_context_parallel_sizes
        uses_hierarchy = self.cp_comm_type == "a2a+p2p" and self.context_parallel_size > 1
        key = f"{prefix}hierarchical_context_parallel_sizes"
        if uses_hierarchy and sizes is None:
            raise ConfigError(
                f"{prefix}cp_comm_type: 'a2a+p2p' needs {key} (the sizes of its a2a and p2p levels, "
                f"[a2a, p2p], multiplying to {prefix}context_parallel_size {self.context_parallel_size}); "
                "without them TransformerEngine gets no hierarchical CP groups"
            )
        if sizes is None:
            return
        if not uses_hierarchy:
            raise ConfigError(f"{key}: is read only with {prefix}cp_comm_type=a2a+p2p and "
                              f"{prefix}context_parallel_size > 1; remove it or set both")
        if len(sizes) != 2 or any(size < 1 for size in sizes):
            raise ConfigError(f"{key}: {list(sizes)} must be two sizes >= 1, [a2a, p2p]")
        if sizes[0] * sizes[1] != self.context_parallel_size:
            raise ConfigError(f"{key}: {list(sizes)} must multiply to {prefix}context_parallel_size "
                              f"({self.context_parallel_size})")

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` ranks; ConfigError when TP x CP x PP does not divide it."""
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        tp, cp, pp = self.tensor_model_parallel_size, self.context_parallel_size, self.pipeline_model_parallel_size
        if world_size % (tp * cp * pp):
            valid = [str(n) for n in range(1, world_size + 1) if world_size % n == 0]
            sizes, product = f"parallel.tensor_model_parallel_size ({tp}) x parallel.context_parallel_size ({cp})", "TP x CP"
            if pp > 1:
                sizes, product = f"{sizes} x parallel.pipeline_model_parallel_size ({pp})", "TP x CP x PP"
            raise ConfigError(
                f"{sizes} = {tp * cp * pp} does not divide the world size {world_size}; valid {product} products "
                f"for world size {world_size}: {', '.join(valid)}"
            )
        return world_size // (tp * cp * pp)


@dataclass
class DataConfig(_Section):
    """Training questions (split into the SRT phase and the distillation phase) and eval sets.

    Loading, validation and the split live in ``sdzero_mcore.data``; prompts and the control
    phrases P_r in ``sdzero_mcore.data.prompts``.
    """

    # a .jsonl/.json/.parquet path, a HF Hub dataset name, or synthetic:<task>
    dataset: str = "synthetic:arith"
    split: str = "train"  # Hub datasets only: a local file is one split
    subset: Optional[str] = None  # Hub dataset configuration (e.g. open-r1/codeforces' verifiable-prompts)
    # auto = from the file extension; set it for files with another extension
    data_format: str = _checked("auto", _one_of("auto", "jsonl", "json", "parquet"))
    # column names: auto picks openr1_math / codeforces / plain from the dataset's columns;
    # each *_field below, when set, overrides the preset's choice
    field_preset: str = _checked("auto", _one_of("auto", "openr1_math", "codeforces", "plain"))
    question_field: Optional[str] = None
    answer_field: Optional[str] = None  # required for math rows
    tests_field: Optional[str] = None  # set = code rows: tests required, answer optional
    solution_field: Optional[str] = None
    id_field: Optional[str] = None  # none = id/uid/uuid when present, else a hash of the question
    # None keeps every other column in Question.extra; [] keeps none (wide datasets: less memory)
    extra_fields: Optional[list[str]] = None
    skip_invalid: bool = False  # skip and count invalid rows instead of stopping at the first
    limit: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)  # read at most this many rows
    synthetic_size: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)  # None = phase1 + phase2
    synthetic_seed: int = 0
    phase1_questions: int = _checked(6000, _AT_LEAST_1)
    phase2_questions: int = _checked(9000, _AT_LEAST_1)
    # Phase 2 from another dataset (the release: DeepScaleR-Preview after OpenR1-Math in Phase 1), read
    # with the same field settings; its questions whose id Phase 1 uses are skipped. null = one split of `dataset`
    phase2_dataset: Optional[str] = None
    phase2_split: str = "train"
    split_seed: int = 0
    # the prompt x (as prompt_template renders it) counted with the run's tokenizer; rows over it
    # follow long_prompts: error = stop naming the row, skip = skip and count them
    max_prompt_tokens: int = _checked(2048, _AT_LEAST_1)
    long_prompts: str = _checked("error", _one_of("error", "skip"))
    # the largest row read (a JSONL line, or another source's question, answer, solution and tests)
    max_row_bytes: int = _checked(16 * 2**20, _AT_LEAST_1)
    # auto = the tokenizer's chat template when it has one, else "Question: ...\nAnswer:"
    prompt_template: str = _checked("auto", _one_of("auto", "chat", "plain"))
    # P_r (docs/method.md): paper = the paper's text; qwen / olmo = the release's phrases for that family;
    # auto = qwen or olmo from the model's architecture in config.json (the `release` recipe's default);
    # custom = p_r_correct (r = 1) and p_r_incorrect (r = 0)
    p_r_preset: str = _checked("paper", _one_of("paper", "qwen", "olmo", "auto", "custom"))
    p_r_correct: Optional[str] = None
    p_r_incorrect: Optional[str] = None
    eval_datasets: list[str] = field(default_factory=list)

    def _check_relations(self, prefix: str) -> None:
        phrases = {"p_r_correct": self.p_r_correct, "p_r_incorrect": self.p_r_incorrect}
        if self.p_r_preset == "custom":
            for name, text in phrases.items():
                if text is None or not text.strip():
                    raise ConfigError(
                        f"{prefix}p_r_preset=custom needs a non-empty {prefix}{name}, got {text!r}"
                    )
        else:
            for name, text in phrases.items():
                if text is not None:
                    raise ConfigError(
                        f"{prefix}{name} is set but {prefix}p_r_preset is {self.p_r_preset!r}; "
                        f"set {prefix}p_r_preset=custom to use custom phrases"
                    )
        if self.synthetic_size is not None:
            if not self.dataset.startswith("synthetic:"):
                raise ConfigError(
                    f"{prefix}synthetic_size is set but {prefix}dataset ({self.dataset!r}) is not synthetic:<task>"
                )
            needed = self.phase1_questions + self.phase2_questions
            if self.synthetic_size < needed:
                raise ConfigError(
                    f"{prefix}synthetic_size ({self.synthetic_size}) is less than {prefix}phase1_questions "
                    f"({self.phase1_questions}) + {prefix}phase2_questions ({self.phase2_questions}) = {needed}"
                )


@dataclass
class PromptConfig(_Section):
    """How one phase turns a question into a prompt (sdzero_mcore.data.prompts.RunPrompts).

    The user turn is ``prefix + question + suffix`` under an optional system prompt, through the
    tokenizer's chat template. ``attempt`` says where a first attempt and P_r go when the phase
    conditions on one: ``assistant`` = the same assistant turn continues with
    ``y + "\\n\\n" + P_r + "\\n\\n"``; ``user`` = the user turn ends with
    ``"\\n\\n" + y + "\\n\\n" + P_r`` and the model answers in a fresh assistant turn (the
    release's SRT revision stage).
    """

    system: Optional[str] = None
    prefix: str = ""
    suffix: str = ""
    attempt: str = _checked("assistant", _one_of("assistant", "user"))


@dataclass
class PromptsConfig(_Section):
    """One prompt layout per phase; the recipe sets them (docs/method.md has both recipes' texts)."""

    collection: PromptConfig = field(default_factory=PromptConfig)  # Phase 1 attempts and revisions
    srt_generation: PromptConfig = field(default_factory=PromptConfig)  # L_generation / SRT stage 1
    srt_revision: PromptConfig = field(default_factory=PromptConfig)  # L_revision / SRT stage 2
    student: PromptConfig = field(default_factory=PromptConfig)  # Phase 2 rollouts, GRPO, RFT, SDFT
    teacher: PromptConfig = field(default_factory=PromptConfig)  # Phase 2 teacher context
    eval: PromptConfig = field(default_factory=PromptConfig)  # sdzero eval and Phase 2 validation

    def _check_relations(self, prefix: str) -> None:
        for name in ("collection", "teacher"):
            if getattr(self, name).attempt != "assistant":
                raise ConfigError(
                    f"{prefix}{name}.attempt: {getattr(self, name).attempt!r} is not supported; allowed: assistant "
                    f"(the {name} prompt's attempt is scored or revised in the same assistant turn)"
                )


@dataclass
class RolloutConfig(_Section):
    """Generation engine and sampling settings for on-policy rollouts and reward scoring."""

    backend: str = _checked("hf", _one_of("hf", "sglang", "vllm"))
    temperature: float = _checked(1.0, _NON_NEGATIVE)
    top_p: float = _checked(1.0, _PROBABILITY)
    top_k: int = _checked(-1, _Rule(lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"))
    max_new_tokens: int = _checked(8192, _AT_LEAST_1)
    seed: int = 0
    weight_sync_bucket_mb: int = _checked(512, _AT_LEAST_1)
    # colocated SGLang: the fraction of the GPU's memory its weights and KV cache may take (sized at
    # start, with the trainer's optimizer state, masters and gradients in host memory; see
    # offload_train_state and docs/design.md "GPU memory of a colocated engine")
    sglang_mem_fraction_static: float = _checked(0.5, _FRACTION_OPEN)
    sglang_tp_size: int = _checked(1, _AT_LEAST_1)
    sglang_url: Optional[str] = None  # a remote server/router; None = colocated in-process engine
    # remote server only: the address and port the server reaches training rank 0 at for the NCCL
    # weight broadcast (None / 0: this host's address, a free port)
    sglang_sync_address: Optional[str] = None
    sglang_sync_port: int = _checked(0, _NON_NEGATIVE)
    # backend=vllm (sdzero_mcore/rollout/vllm.py). The memory fraction is of the GPU's memory, or of the
    # NUMA node's host memory on vLLM's CPU build; max_model_len null = the model's max_position_embeddings.
    vllm_tp_size: int = _checked(1, _AT_LEAST_1)
    vllm_gpu_memory_utilization: float = _checked(0.5, _FRACTION_OPEN)
    vllm_max_model_len: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    # a fixed KV-cache size in GiB instead of what the memory fraction leaves (null: the fraction)
    vllm_kv_cache_gb: Optional[float] = _checked(None, _Rule(lambda v: v is None or v > 0, "null or > 0"))
    # null = eager on CPU (compiling takes minutes on a few cores), CUDA graphs on a GPU
    vllm_enforce_eager: Optional[bool] = None
    reward_timeout_s: float = _checked(10.0, _POSITIVE)
    reward_workers: int = _checked(4, _AT_LEAST_1)
    # the trainer's optimizer state, fp32 master weights and gradient buffers wait in host memory
    # while the engine generates (and while it starts); null = where the engine shares the trainer's
    # GPUs (CUDA, any backend but a remote SGLang server)
    offload_train_state: Optional[bool] = None


@dataclass
class OptimizerConfig(_Section):
    """Adam with a learning-rate schedule."""

    lr: float = _checked(5e-6, _POSITIVE)
    min_lr: float = _checked(0.0, _NON_NEGATIVE)
    weight_decay: float = _checked(0.01, _NON_NEGATIVE)
    adam_beta1: float = _checked(0.9, _FRACTION_HALF_OPEN)
    adam_beta2: float = _checked(0.95, _FRACTION_HALF_OPEN)
    adam_eps: float = _checked(1e-8, _POSITIVE)
    clip_grad: float = _checked(1.0, _NON_NEGATIVE)  # 0 = off
    # both warm up linearly first; constant then holds lr
    lr_schedule: str = _checked("constant", _one_of("cosine", "constant"))
    warmup_steps: int = _checked(0, _NON_NEGATIVE)
    warmup_ratio: float = _checked(0.0, _FRACTION_HALF_OPEN)
    # null: warm up as (step + 1) / warmup_steps; a value f: torch's LinearLR(start_factor=f), i.e.
    # f at step 0 rising linearly to 1 at warmup_steps (the release's Phase 2: 0.1 over 20 steps)
    warmup_start_factor: Optional[float] = _checked(None, _Rule(lambda v: v is None or 0 < v <= 1, "null or (0, 1]"))
    # true: megatron-core's DistributedOptimizer (ZeRO-1: fp32 masters and Adam moments sharded over
    # DP x CP) with its own gradient clipping; the same schedule, betas, eps, weight decay and clip.
    # false: torch AdamW over full fp32 masters on every rank (sdzero_mcore/trainer.py)
    distributed: bool = False

    def _check_relations(self, prefix: str) -> None:
        if self.warmup_steps > 0 and self.warmup_ratio > 0:
            raise ConfigError(
                f"{prefix}warmup_steps ({self.warmup_steps}) and {prefix}warmup_ratio ({self.warmup_ratio}) "
                f"are both set; set at most one of them above 0"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"{prefix}min_lr ({self.min_lr}) must be <= {prefix}lr ({self.lr})")


@dataclass
class SRTCollectConfig(_Section):
    """Self-revision data collection: initial attempts, then revisions of each."""

    n_init: int = _checked(1, _AT_LEAST_1)  # attempts per question
    n_rev: int = _checked(3, _AT_LEAST_1)  # revisions per revised attempt
    temperature: float = _checked(0.7, _NON_NEGATIVE)
    top_p: float = _checked(1.0, _PROBABILITY)
    # a sample ends at the first of these strings (cut before it), besides the tokenizer's end token
    stop_strings: list[str] = field(default_factory=list)
    # false: only wrong attempts are revised, so every kept tuple is a correction (the release)
    revise_correct: bool = True
    # scan the Phase 1 questions in order until this many verified revisions are kept; null = all questions
    target_kept: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    # the release's cleaning of kept tuples: repeated-tail trim, flattering-opener strip, dedup
    # (sdzero_mcore/data/trace_cleaning.py); the summary counts what each rule removed
    cleaning: bool = False
    max_new_tokens: int = _checked(16384, _AT_LEAST_1)
    # questions sampled together in one engine call (attempts, then the revisions of all of them);
    # a chunk always has the same questions and seed, so a resumed collection samples the same tokens
    questions_per_call: int = _checked(16, _AT_LEAST_1)


@dataclass
class SRTTrainConfig(_Section):
    """Self-revision training (phase 1)."""

    # joint = L_revision + L_generation in one loss, as in the paper (Eq. 3); sequential = the
    # release's two SFT stages: generation (prompts.srt_generation) then revision (prompts.srt_revision)
    mode: str = _checked("joint", _one_of("joint", "sequential"))
    # sequential: the revision stage trains on this many tuples and the generation stage on the rest
    # (the release: 1000); null = every tuple in both stages
    stage2_size: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    epochs: int = _checked(3, _AT_LEAST_1)
    global_batch_size: int = _checked(4, _AT_LEAST_1)
    micro_batch_size: int = _checked(1, _AT_LEAST_1)
    # pack micro-batches by padded tokens (sorted by length) instead of rows; null = micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    # held out of training (seeded); its NLL is logged as val_loss before training and at every epoch end
    validation_fraction: float = _checked(0.0, _FRACTION_HALF_OPEN)
    max_seq_length: int = _checked(32768, _AT_LEAST_1)
    optimizer: OptimizerConfig = field(
        default_factory=partial(
            OptimizerConfig, lr=5e-6, lr_schedule="cosine", warmup_ratio=0.05, weight_decay=1e-4,
            adam_beta1=0.9, adam_beta2=0.95,
        )
    )

    def _check_relations(self, prefix: str) -> None:
        _check_batch_sizes(prefix, self.global_batch_size, self.micro_batch_size)


@dataclass
class ValidationConfig(_Section):
    """Validation during an on-policy phase (``sdzero_mcore.phases.validation``): every ``interval``
    optimizer steps and at the last, ``k`` samples per question from the rollout engine (the current
    weights), scored with the run's reward; avg@k and pass@k are logged as ``val/*``, the step is
    checkpointed, and the best ``keep_best`` checkpoints by ``metric`` outlive ``checkpoint.keep_last``.

    The authors' release validates on AIME 2024 x 8 every 20 steps, sampled as in training
    (temperature 1.0, top_p 1.0, prompt + response within 8192 tokens), and keeps the best 3 by mean
    accuracy: ``interval: 20`` and ``dataset:`` an AIME 2024 file with the other defaults here.
    """

    interval: int = _checked(0, _NON_NEGATIVE)  # optimizer steps; 0 = off
    # null = a synthetic task's held-out questions, as `sdzero eval` picks them; else a path / Hub name
    # read with the data section's field mapping, as `sdzero eval --dataset` reads it
    dataset: Optional[str] = None
    questions: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)  # null = all (synthetic: 200)
    k: int = _checked(8, _AT_LEAST_1)
    # the release validates with its training sampling; eval.temperature (0.7) is the paper's reported protocol
    temperature: float = _checked(1.0, _NON_NEGATIVE)
    max_new_tokens: int = _checked(8192, _AT_LEAST_1)
    seed: int = 0  # the same at every validation: checkpoints are compared on the same random draws
    keep_best: int = _checked(3, _AT_LEAST_1)
    metric: str = _checked("avg_at_k", _one_of("avg_at_k", "pass_at_k"))  # higher is better


@dataclass
class DistillConfig(_Section):
    """On-policy self-distillation (phase 2): the reviser teaches the generator via top-k KL."""

    prompts_per_step: int = _checked(128, _AT_LEAST_1)
    global_batch_size: int = _checked(128, _AT_LEAST_1)
    micro_batch_size: int = _checked(1, _AT_LEAST_1)
    # pack micro-batches by padded tokens (sorted by length) instead of rows; null = micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    top_k: int = _checked(64, _Rule(lambda v: 1 <= v <= 256, "[1, 256]"))
    kl: str = _checked("reverse", _one_of("reverse", "forward", "mixed"))
    mixed_weight: float = _checked(0.5, _FRACTION_CLOSED)
    tail: str = _checked("renorm", _one_of("renorm", "bucket"))
    temperature: float = _checked(1.0, _POSITIVE)
    # where the output layer runs: sparse = only at the positions predicting response tokens, inside
    # the loss (teacher top-K over vocabulary chunks; student renorm from the K rows of the output
    # weight, bucket over vocabulary chunks), no [T, V] logits; dense = full logits at every position
    # (the reference: docs/kernels.md "The LM head"). At pipeline-parallel size > 1 dense runs.
    lm_head: str = _checked("sparse", _one_of("sparse", "dense"))
    teacher_sync_interval: int = _checked(0, _NON_NEGATIVE)  # 0 = sync the teacher at each epoch end only
    # copy the student into the teacher at each epoch end (the paper's self-evolution); false with
    # teacher_sync_interval 0 = a frozen teacher (the release)
    teacher_sync_at_epoch_end: bool = True
    max_response_tokens: int = _checked(8192, _AT_LEAST_1)
    max_teacher_tokens: int = _checked(16384, _AT_LEAST_1)
    # the first y of the teacher context keeps the end token it was sampled with (the release); false
    # strips it so that P_r continues the same assistant turn
    teacher_keeps_end_token: bool = False
    # revision: the teacher reads x + y + P_r + y (SD-Zero); gold_solution: x + the data's solution +
    # P_r(correct) + y, the SDFT baseline (needs data.solution_field or a synthetic task)
    teacher_context: str = _checked("revision", _one_of("revision", "gold_solution"))
    epochs: int = _checked(1, _AT_LEAST_1)
    train_steps: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    optimizer: OptimizerConfig = field(
        default_factory=partial(
            OptimizerConfig, lr=5e-6, lr_schedule="constant", warmup_steps=20, weight_decay=0.01, clip_grad=1.0
        )
    )
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def _check_relations(self, prefix: str) -> None:
        _check_batch_sizes(prefix, self.global_batch_size, self.micro_batch_size)
        if self.global_batch_size != self.prompts_per_step:
            raise ConfigError(
                f"{prefix}global_batch_size ({self.global_batch_size}) must equal {prefix}prompts_per_step "
                f"({self.prompts_per_step}): one response per prompt, one optimizer step per rollout batch (the paper's setup)"
            )


@dataclass
class SFTConfig(_Section):
    """Step 0 of the embedded demo: supervised fine-tuning on a synthetic task's worked solutions."""

    examples: int = _checked(4000, _AT_LEAST_1)  # distinct questions, disjoint from both phases and eval
    # fraction of solutions whose final answer is replaced by a wrong one, so that the base model
    # solves the task only in part (the demo needs room to improve)
    noise: float = _checked(0.0, _FRACTION_HALF_OPEN)
    # fraction of examples in the reviser's format, x + y_a + P_r + y_b with the loss on y_b only: the
    # base learns what an instruct model already does (after P_r, answer again), not to revise itself
    revision_fraction: float = _checked(0.0, _FRACTION_HALF_OPEN)
    epochs: int = _checked(1, _AT_LEAST_1)
    global_batch_size: int = _checked(32, _AT_LEAST_1)
    micro_batch_size: int = _checked(32, _AT_LEAST_1)
    # pack micro-batches by padded tokens (sorted by length) instead of rows; null = micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    # held out of training (seeded); its NLL is logged as val_loss before training and at every epoch end
    validation_fraction: float = _checked(0.0, _FRACTION_HALF_OPEN)
    max_seq_length: int = _checked(512, _AT_LEAST_1)
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, lr=3e-3, lr_schedule="cosine", warmup_ratio=0.05, weight_decay=0.01)
    )

    def _check_relations(self, prefix: str) -> None:
        _check_batch_sizes(prefix, self.global_batch_size, self.micro_batch_size)


@dataclass
class RFTConfig(_Section):
    """Rejection-sampling fine-tuning baseline: k samples per question, SFT on the correct ones."""

    samples_per_question: int = _checked(4, _AT_LEAST_1)
    temperature: float = _checked(1.0, _NON_NEGATIVE)
    # cap on generations (a matched budget); null = every question of both phases
    max_generations: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    max_new_tokens: int = _checked(8192, _AT_LEAST_1)
    epochs: int = _checked(3, _AT_LEAST_1)
    global_batch_size: int = _checked(4, _AT_LEAST_1)
    micro_batch_size: int = _checked(1, _AT_LEAST_1)
    # pack micro-batches by padded tokens (sorted by length) instead of rows; null = micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    # held out of training (seeded); its NLL is logged as val_loss before training and at every epoch end
    validation_fraction: float = _checked(0.0, _FRACTION_HALF_OPEN)
    max_seq_length: int = _checked(32768, _AT_LEAST_1)
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, lr=5e-6, lr_schedule="cosine", warmup_ratio=0.05, weight_decay=1e-4)
    )

    def _check_relations(self, prefix: str) -> None:
        _check_batch_sizes(prefix, self.global_batch_size, self.micro_batch_size)


@dataclass
class GRPOConfig(_Section):
    """GRPO baseline in the DAPO style (docs/method.md: 4 rollouts, clip 0.2, low-variance KL 0.001, entropy 0.001)."""

    prompts_per_step: int = _checked(32, _AT_LEAST_1)
    group_size: int = _checked(4, _Rule(lambda v: v >= 2, ">= 2"))
    micro_batch_size: int = _checked(1, _AT_LEAST_1)
    # pack micro-batches by padded tokens (sorted by length) instead of rows; null = micro_batch_size rows
    max_tokens_per_micro_batch: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    # optimizer steps per rollout batch; 1 = strictly on-policy (the ratio is 1, clipping inactive)
    updates_per_batch: int = _checked(1, _AT_LEAST_1)
    clip_low: float = _checked(0.2, _FRACTION_OPEN)
    clip_high: float = _checked(0.2, _POSITIVE)
    kl_coef: float = _checked(0.001, _NON_NEGATIVE)
    entropy_coef: float = _checked(0.001, _NON_NEGATIVE)
    # where the output layer runs for the log-probs and the entropy (training, old and reference
    # passes): sparse = only at the positions predicting response tokens, over vocabulary chunks, no
    # [T, V] logits; dense = full logits at every position (the reference: docs/kernels.md "The LM
    # head"). At pipeline-parallel size > 1 dense runs.
    lm_head: str = _checked("sparse", _one_of("sparse", "dense"))
    max_response_tokens: int = _checked(8192, _AT_LEAST_1)
    # cap on generations (a matched budget); null = one pass over both phases' questions
    max_generations: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)
    optimizer: OptimizerConfig = field(
        default_factory=partial(OptimizerConfig, lr=1e-6, lr_schedule="constant", weight_decay=0.01, clip_grad=1.0)
    )

    def _check_relations(self, prefix: str) -> None:
        if (self.prompts_per_step * self.group_size) % self.updates_per_batch:
            raise ConfigError(
                f"{prefix}updates_per_batch ({self.updates_per_batch}) must divide prompts_per_step x group_size "
                f"({self.prompts_per_step * self.group_size})"
            )


@dataclass
class EvalConfig(_Section):
    """``sdzero eval``: avg@k / pass@k, generate-then-revise, behaviour, token localisation."""

    k: int = _checked(8, _AT_LEAST_1)
    temperature: float = _checked(0.7, _NON_NEGATIVE)
    max_new_tokens: int = _checked(32768, _AT_LEAST_1)
    questions: Optional[int] = _checked(None, _NULL_OR_AT_LEAST_1)  # null = all (synthetic: 200)
    revise: bool = True  # generate-then-revise on the first sample of each question
    localization_responses: int = _checked(200, _NON_NEGATIVE)  # 0 = skip the KL analysis
    # the localisation's output layer: sparse = only at the response positions, over vocabulary
    # chunks (fused_linear_full_kl), no [T, V] logits of the whole sequences; dense = the full
    # logits gathered over TP and CP, then full_kl (the reference). At pipeline-parallel size > 1 dense runs.
    lm_head: str = _checked("sparse", _one_of("sparse", "dense"))
    seed: int = 0


@dataclass
class MathConfig(_Section):
    """The math reward's equivalence policy and answer extraction (sdzero_mcore.rewards.math).

    policy: math_verify (default): math-verify's verdict, as the authors' release uses it in
    Phase 2, so rewards match theirs; it accepts decimals rounded to its precision (1/3 vs
    0.333333) and ignores letter case. strict: additionally a decimal must be the exact value and
    letters keep their case. Both accept comma and thin-space thousands separators.

    extraction: boxed (default): the last \\boxed{} of a response is its answer, in every phase.
    release: as the authors' release reads answers: in Phase-1 collection the last \\boxed{},
    else the text after "the answer is" / "final answer is", else the last number; everywhere
    else math-verify reads the whole response against "\\boxed{gold}".
    """

    policy: str = _checked("math_verify", _one_of("math_verify", "strict"))
    # boxed keeps one reading of answers across phases, so collection and training rewards agree;
    # release reproduces the rewards behind the paper's tables, which differ between the phases.
    extraction: str = _checked("boxed", _one_of("boxed", "release"))


@dataclass
class WandbConfig(_Section):
    """Weights & Biases, an optional logger (``pip install 'sdzero-mcore[wandb]'``); off while ``project`` is null.
    ``mode: offline`` writes the run under ``dir`` (default ``<output_dir>/wandb``) with no network,
    for ``wandb sync`` later."""

    project: Optional[str] = None
    entity: Optional[str] = None
    name: Optional[str] = None  # default: the output directory's name
    mode: str = _checked("online", _one_of("online", "offline"))
    dir: Optional[str] = None


@dataclass
class LoggingConfig(_Section):
    """Where training metrics go: JSONL and TensorBoard under the output directory, W&B if configured."""

    log_interval: int = _checked(1, _AT_LEAST_1)
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig(_Section):
    """Checkpoint cadence and retention."""

    save_interval: int = _checked(0, _NON_NEGATIVE)  # 0 = only at the end
    keep_last: int = _checked(2, _AT_LEAST_1)
    resume: bool = False


@dataclass
class SDZeroConfig(_Section):
    """The whole run: one section per subsystem and per training phase."""

    run_name: str = "sdzero"
    # paper = the paper's text; release = the authors' public code (princeton-pli/Self-Distillation-Zero).
    # It sets the defaults of every setting where they differ (RECIPES below, docs/method.md); a key
    # given in the config file or on the command line still wins.
    recipe: str = _checked("paper", _one_of(*RECIPE_NAMES))
    # where every phase writes; checked before any work (sdzero_mcore.preflight): not empty, not a
    # file, writable
    output_dir: str = _checked(
        "runs/sdzero", _Rule(lambda v: bool(v.strip()), "a directory path", problem="is empty; allowed:")
    )
    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # for phases that have none
    srt_collect: SRTCollectConfig = field(default_factory=SRTCollectConfig)
    srt_train: SRTTrainConfig = field(default_factory=SRTTrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rft: RFTConfig = field(default_factory=RFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    math: MathConfig = field(default_factory=MathConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------
# Recipes: the defaults that differ between the paper's text and the authors' release


_STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."
_RELEASE_STUDENT = {"prefix": _STEP_BY_STEP + "\n\n"}

# Each recipe is a partial config merged over the dataclass defaults, below the config file and the
# overrides. `paper` is the dataclass defaults themselves (the paper's text); `release` is read from
# the release's scripts (docs/method.md, "Paper vs release", names the script behind each value).
RECIPES: dict[str, dict] = {
    "paper": {},
    "release": {
        "data": {"p_r_preset": "auto"},
        "prompts": {
            "collection": {"system": "You are a helpful assistant that solves math problems step by step.",
                           "suffix": "\n\n" + _STEP_BY_STEP},
            "srt_generation": {"system": _STEP_BY_STEP},
            "srt_revision": {"system": _STEP_BY_STEP, "attempt": "user"},
            "student": _RELEASE_STUDENT,
            "teacher": _RELEASE_STUDENT,
            "eval": _RELEASE_STUDENT,
        },
        "srt_collect": {
            "n_init": 3, "n_rev": 3, "temperature": 1.0, "top_p": 0.9, "revise_correct": False, "target_kept": 6000,
            "stop_strings": ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "Question:"], "cleaning": True,
        },
        "srt_train": {"mode": "sequential", "stage2_size": 1000},
        "distill": {
            "kl": "mixed", "mixed_weight": 0.5, "teacher_keeps_end_token": True, "max_teacher_tokens": 32768,
            "teacher_sync_at_epoch_end": False,
            "optimizer": {"adam_beta2": 0.999, "warmup_steps": 20, "warmup_start_factor": 0.1},
            "validation": {"interval": 20, "k": 8, "keep_best": 3},
        },
        "math": {"extraction": "release"},
    },
}


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> SDZeroConfig:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides, validated."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string")
    layers = [] if path is None else [(_read_yaml(Path(path)), f"config file {path}")]
    layers += [(_parse_override(item), f"override {item!r}") for item in overrides]
    # the recipe named by the file or an override sets defaults below both of them
    merged = OmegaConf.structured(SDZeroConfig)
    for layer, source in layers:
        merged = _merge(merged, layer, source=source)
    recipe = merged.recipe
    if recipe in RECIPES and RECIPES[recipe]:
        merged = _merge(OmegaConf.structured(SDZeroConfig), OmegaConf.create(RECIPES[recipe]), source=f"recipe {recipe!r}")
        for layer, source in layers:
            merged = _merge(merged, layer, source=source)
    try:
        with _deferred_validation():
            cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(_describe_omegaconf_error(err)) from None
    cfg.validate()
    return cfg


def _read_yaml(path: Path) -> DictConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        # OmegaConf.load reads a top-level plain string as a key, so the shape is checked first.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if root is not None and not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"config file {path}: the top level must be a mapping of keys to values")
        return OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {path}: {_yaml_problem(err)}") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    return str(err)


def _parse_override(item: str) -> DictConfig:
    key, sep, _ = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"invalid override {item!r}: expected the form key=value, "
            f"e.g. parallel.tensor_model_parallel_size=2"
        )
    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(err)}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"override {item!r}: {_describe_omegaconf_error(err)}") from None


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    """``base`` with ``update`` merged in; errors name ``source`` (the file or the override)."""
    try:
        _check_keys(OmegaConf.to_container(update), SDZeroConfig, prefix="")
        return OmegaConf.merge(base, update)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: {_describe_omegaconf_error(err)}") from None


def _check_keys(node: Mapping[Any, Any], schema: type, prefix: str) -> None:
    """Reject keys that ``schema`` lacks and scalars given for sections, before OmegaConf sees them."""
    types = {f.name: f.type for f in fields(schema)}
    for name, value in node.items():
        key = f"{prefix}{name}"
        if name not in types:
            raise ConfigError(_unknown_key_message(key, str(name), prefix, sorted(types)))
        section = types[name]
        if is_dataclass(section):
            if not isinstance(value, Mapping):
                allowed = ", ".join(sorted(f.name for f in fields(section)))
                raise ConfigError(
                    f"{key}: expected a mapping (a section with keys {allowed}), got {_describe_value(value)}"
                )
            _check_keys(value, section, prefix=f"{key}.")


# keys that were replaced: what to write instead
_REPLACED_KEYS = {
    "model.recompute_activations": "model.recompute (none | selective | full); recompute_activations: true "
    "was model.recompute: selective",
}


def _unknown_key_message(key: str, name: str, prefix: str, allowed: list[str]) -> str:
    if key in _REPLACED_KEYS:
        return f"'{key}' was replaced by {_REPLACED_KEYS[key]}"
    section = prefix.rstrip(".")
    where = f"allowed keys under '{section}'" if section else "allowed top-level keys"
    message = f"unknown key '{key}'; {where}: {', '.join(allowed)}"
    close = difflib.get_close_matches(name, allowed, n=1)
    if close:
        message += f"; did you mean '{prefix}{close[0]}'?"
    return message


def _describe_omegaconf_error(err: OmegaConfBaseException) -> str:
    key = err.full_key
    expected = _schema_type(key) if key else None
    if isinstance(err, ValidationError) and not isinstance(err, InterpolationResolutionError) and expected:
        return f"{key}: expected {_type_name(expected)}, got {_describe_value(err.value)}"
    # OmegaConf appends 'full_key: ...' and type details on later lines; the first line is the problem.
    problem = (err.msg or str(err)).splitlines()[0]
    return f"{key}: {problem}" if key else problem


def _schema_type(key: str) -> Optional[Any]:
    """The declared type of the dotted ``key`` in SDZeroConfig, or None if there is no such field."""
    schema: Any = SDZeroConfig
    declared = None
    for name in key.split("."):
        if not is_dataclass(schema):
            return None
        declared = {f.name: f.type for f in fields(schema)}.get(name)
        if declared is None:
            return None
        schema = declared
    return declared


def _type_name(declared: Any) -> str:
    args = [arg for arg in get_args(declared) if arg is not type(None)]
    if get_origin(declared) is Union:
        return f"{_type_name(args[0])} or null"
    if get_origin(declared) is list:
        return f"list of {_type_name(args[0])}"
    return declared.__name__


def _describe_value(value: Any) -> str:
    """``value`` as the user wrote it, e.g. ``'two' (str)``."""
    if isinstance(value, ValueNode):  # OmegaConf reports some values still wrapped in their node
        value = value._value()
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    kind = {dict: "mapping", list: "list"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


# ---------------------------------------------------------------------------------------------
# Saving and identity


def config_to_yaml(cfg: SDZeroConfig) -> str:
    """The canonical YAML text of ``cfg``: every key, in declaration order."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: SDZeroConfig, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically: readers see the old file or the new one, never a part."""
    atomic_write_text(path, config_to_yaml(cfg))


def config_hash(cfg: SDZeroConfig) -> str:
    """A short stable digest of ``cfg``: equal configs give equal hashes, any change gives another."""
    return hashlib.sha256(config_to_yaml(cfg).encode("utf-8")).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Command line


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--config PATH`` and trailing ``key=value`` overrides to ``parser``."""
    parser.add_argument(
        "--config", metavar="PATH", default=None, help="YAML config file; keys it omits keep their defaults"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after --config, e.g. parallel.tensor_model_parallel_size=2 "
        "distill.optimizer.lr=1e-5; values are parsed as YAML, so lists read data.eval_datasets=[a,b]",
    )


def config_from_args(args: argparse.Namespace) -> SDZeroConfig:
    """The config that the arguments added by :func:`add_config_args` describe."""
    return load_config(args.config, args.overrides)
