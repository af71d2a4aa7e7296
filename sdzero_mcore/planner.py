"""``sdzero plan``: GPU memory per rank for a run's training phases, and the layouts that fit.

Everything is counted in bytes per GPU from the model's shape (its config.json, read with
:class:`~sdzero_mcore.models.hf_config.ModelArch`, or :data:`KNOWN_SHAPES`), the config's batch
and sequence settings, and a layout (TP x PP x CP x DP, distributed optimizer on/off, recompute).
The layout is the planner's own input, so the search over layouts does not depend on what the
trainer accepts today.

Model state (N = the parameters on the most loaded rank, its pipeline stage's share / TP):

* weights: N x param bytes (bf16: 2; ``model.dtype: auto`` plans for a GPU, i.e. bf16);
  Phase 2 holds a frozen teacher of the same layout (again N x param bytes, no gradients);
* gradients: 4N (megatron-core DDP's fp32 ``main_grad`` buffers, ``grad_reduce_in_fp32``);
* optimizer: fp32 master copies of 16-bit weights (4N) + Adam's two moments (8N), divided by
  DP x CP with the distributed optimizer (megatron-core shards over its data-parallel group with
  context parallelism). So bf16 = 2 + 4 + 12 = 18 bytes/parameter, 6 + 12/d distributed; fp32 =
  4 + 4 + 8 = 16, 8 + 8/d: megatron-core's table (docs "Distributed Optimizer").

Activations (``layer_activation_bytes``): what autograd keeps per token and layer in megatron-core's
local spec as this project builds it (torch RMSNorm, GQA, SwiGLU, no dropout, no sequence
parallelism, fused SDPA attention: flash on a GPU, its CPU counterpart here, so no s^2 term), read
off the tensors the layer saves (``tools/measure_step_memory.py`` checks the sum against the CPU
allocator). Per token, e = activation bytes (the param dtype), t = TP, h = hidden, q = heads x
head_dim, g = query groups x head_dim, f = FFN width:

    no recompute:  e x [6h + (3q + 3g)/t + 5f/t  (+ (2q + g)/t with QK-norm)]
                   + 4 bytes x (2 + heads/t  (+ (heads + groups)/t with per-head QK-norm))
    selective:     megatron-core recomputes core attention: the same less its fp32 log-sum-exp
                   (its q, k, v inputs stay, and its output is the output projection's input)
    full:          e h per layer (its input), plus one layer's no-recompute set while it is recomputed

6h: each of the two norms keeps its input and normalised input, and the linear after it its
output (all replicated over TP without sequence parallelism); 3q + 3g: the fused QKV output (kept
whole through v's view), RoPE'd q and k, the attention output; 5f: fc1's output 2f, SwiGLU's two
f-wide intermediates, fc2's input f. (RoPE's cos/sin, 4 x seq x head_dim per layer, are left out:
negligible beside h.) Korthikanti et al., "Reducing Activation Recomputation in Large Transformer
Models" (Table 2) count 34 sbh + 5 a s^2 b for GPT's GeLU MLP with dropout in 16 bits; this is the
same counting for this layer; with TransformerEngine's fused norm + linear a norm keeps one h less.
A micro-batch holds T = micro_batch_size x sequence / CP tokens per rank (or
``max_tokens_per_micro_batch`` / CP). Pipeline stage i of p holds min(p - i, micro-batches)
micro-batches in flight (1F1B); interleaved (v chunks) p x (1 + (p - 1) / (p v)), as
megatron-core's theoretical memory counts it.

Loss: the last stage keeps the final norm's 3h (as above) and the logits [T, V/t] twice over (the
output layer's result and its padded-vocabulary masked copy in the forward; the gradient and its
masked copy in the backward): 2e per logit, plus megatron-core's fp32 softmax for cross-entropy
(SRT, RFT) when the logits are 16-bit (fp32 logits are softmaxed in place). Phase 2's top-K KL keeps
only K values per token; the teacher's top-K targets of the whole step are held (12K bytes per
student token: fp32 log-probs + int64 ids), and the teacher's forward (before the student's) holds
its logits and one layer's working set. The weight-gradient transient: with gradient-accumulation
fusion off the largest weight's gradient exists once in the param dtype before DDP adds it to
``main_grad``.

The rollout turn (colocated engine, ``rollout.offload_train_state``): the engine's share of the GPU
(``rollout.sglang_mem_fraction_static`` / ``rollout.vllm_gpu_memory_utilization``) beside the
trainer's bf16 weights (the rest is in host memory); without offloading, beside everything.
"""

from __future__ import annotations

import io
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from sdzero_mcore.config import ConfigError, SDZeroConfig, load_config
from sdzero_mcore.models.hf_config import ModelArch, pad_vocab_size
from sdzero_mcore.plan_args import RECOMPUTE

GIB = 2**30
FP32 = 4
PHASES = ("srt_train", "distill", "rft")  # Phase 1 training, Phase 2, the RFT baseline


# ---------------------------------------------------------------------------------------------
# Model shapes


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a dense decoder: sizes, tying, biases and norms."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    qk_norm: str = "none"  # none | per_head (Qwen3: one head_dim weight each) | full (Olmo-3: q and k widths)
    source: str = ""

    @classmethod
    def from_arch(cls, arch: ModelArch, name: str, source: str) -> "ModelShape":
        return cls(
            name=name, vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, num_layers=arch.num_layers,
            num_attention_heads=arch.num_attention_heads, num_query_groups=arch.num_query_groups,
            head_dim=arch.head_dim, ffn_hidden_size=arch.ffn_hidden_size, tie_word_embeddings=arch.tie_word_embeddings,
            qkv_bias=arch.qkv_bias, qk_norm=_qk_norm_kind(arch), source=source,
        )

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_query_groups * self.head_dim

    def layer_params(self, tp: int = 1) -> float:
        """One transformer layer's parameters on one TP rank (norm weights are replicated)."""
        h, q, g, f = self.hidden_size, self.q_width, self.kv_width, self.ffn_hidden_size
        sharded = h * (q + 2 * g) + q * h + 3 * h * f + (q + 2 * g if self.qkv_bias else 0)
        replicated = 2 * h
        if self.qk_norm == "per_head":
            replicated += 2 * self.head_dim
        elif self.qk_norm == "full":
            sharded += q + g
        return sharded / tp + replicated

    def embedding_params(self, tp: int = 1, divisible_by: int = 128) -> float:
        return pad_vocab_size(self.vocab_size, divisible_by, tp) * self.hidden_size / tp

    def total_params(self, divisible_by: int = 128) -> float:
        """Every parameter at TP 1 (padded vocabulary), the output layer counted once when tied."""
        embeddings = self.embedding_params(1, divisible_by) * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params(1) + embeddings + self.hidden_size

    def check_tensor_parallel(self, tp: int) -> None:
        if self.num_attention_heads % tp or self.num_query_groups % tp:
            raise ConfigError(f"TP {tp} does not divide {self.name}'s {self.num_attention_heads} attention heads "
                              f"and {self.num_query_groups} query groups")


def _qk_norm_kind(arch: ModelArch) -> str:
    if not arch.qk_norm:
        return "none"
    return "full" if arch.olmo3 else "per_head"


def _shape(name, vocab, hidden, layers, heads, groups, head_dim, ffn, tied, source, qkv_bias=False, qk_norm="none"):
    return ModelShape(name, vocab, hidden, layers, heads, groups, head_dim, ffn, tied, qkv_bias, qk_norm, source)


# Shapes of models that the examples name, for planning before anything is downloaded; each from the
# model's config.json on the Hugging Face Hub (the address beside it). --hf-config or model.hf_dir wins.
KNOWN_SHAPES: dict[str, ModelShape] = {s.name: s for s in (
    _shape("Qwen3-4B-Instruct-2507", 151936, 2560, 36, 32, 8, 128, 9728, True,
           "https://huggingface.co/Qwen/Qwen3-4B-Instruct-2507/blob/main/config.json", qk_norm="per_head"),
    _shape("Olmo-3-7B-Instruct", 100278, 4096, 32, 32, 32, 128, 11008, False,
           "https://huggingface.co/allenai/Olmo-3-7B-Instruct/blob/main/config.json", qk_norm="full"),
    _shape("Llama-3.3-70B-Instruct", 128256, 8192, 80, 64, 8, 128, 28672, False,
           "https://huggingface.co/meta-llama/Llama-3.3-70B-Instruct/blob/main/config.json"),
    _shape("Qwen2.5-72B-Instruct", 152064, 8192, 80, 64, 8, 128, 29568, False,
           "https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/config.json", qkv_bias=True),
)}


def resolve_shape(cfg: SDZeroConfig, hf_config: Optional[str] = None) -> ModelShape:
    """The model's shape: ``hf_config`` (a config.json), else ``model.hf_dir``'s config.json, else
    :data:`KNOWN_SHAPES` by the directory's name."""
    if hf_config is not None:
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"--hf-config: no such file {path}")
        return ModelShape.from_arch(ModelArch.from_hf_dir(path.parent), path.parent.name, str(path))
    hf_dir = cfg.model.hf_dir
    if hf_dir is None:
        raise ConfigError("model.hf_dir is not set; give --hf-config path/to/config.json")
    if (Path(hf_dir) / "config.json").is_file():
        return ModelShape.from_arch(ModelArch.from_hf_dir(hf_dir), Path(hf_dir).name, str(Path(hf_dir) / "config.json"))
    name = Path(hf_dir).name
    for known in KNOWN_SHAPES.values():
        if name == known.name or name.startswith(known.name + "-"):  # e.g. a converted ...-mcore-tp8 directory
            return known
    raise ConfigError(f"model.hf_dir: {hf_dir}/config.json does not exist and {name!r} is not a known shape "
                      f"({', '.join(KNOWN_SHAPES)}); give --hf-config path/to/config.json")


# ---------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    distributed: bool = False
    recompute: str = "none"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def describe(self) -> str:
        vpp = f" (vpp {self.vpp})" if self.vpp else ""
        return f"TP{self.tp} x PP{self.pp}{vpp} x CP{self.cp} x DP{self.dp}"


# ---------------------------------------------------------------------------------------------
# The formulas


def layer_activation_bytes(shape: ModelShape, tokens: float, tp: int, act_bytes: int, recompute: str) -> float:
    """Bytes autograd keeps for one layer over ``tokens`` tokens on one rank (module docstring)."""
    h, q, g, f = shape.hidden_size, shape.q_width, shape.kv_width, shape.ffn_hidden_size
    heads = shape.num_attention_heads / tp
    elements = 6 * h + (3 * q + 3 * g) / tp + 5 * f / tp
    fp32 = 2 + heads  # the two norms' inverse RMS, attention's log-sum-exp
    if shape.qk_norm != "none":
        elements += (2 * q + g) / tp
        fp32 += (shape.num_attention_heads + shape.num_query_groups) / tp if shape.qk_norm == "per_head" else 2
    if recompute == "none":
        return tokens * (act_bytes * elements + FP32 * fp32)
    if recompute == "selective":  # megatron-core recomputes core attention: only its log-sum-exp goes
        return tokens * (act_bytes * elements + FP32 * (fp32 - heads))
    if recompute == "full":
        return tokens * act_bytes * h
    raise ConfigError(f"recompute: {recompute!r} is not one of: {', '.join(RECOMPUTE)}")


def stage_layers(num_layers: int, pp: int) -> int:
    """Layers on the most loaded pipeline stage."""
    return math.ceil(num_layers / pp)


def in_flight(stage: int, layout: Layout, micro_batches: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at once (megatron-core's 1F1B schedules)."""
    if layout.pp == 1:
        return 1.0
    if layout.vpp:
        return layout.pp * (1 + (layout.pp - 1) / (layout.pp * layout.vpp))
    return float(min(layout.pp - stage, micro_batches))


def stage_params(shape: ModelShape, layout: Layout, stage: int, divisible_by: int = 128) -> float:
    """Parameters on one rank of pipeline stage ``stage``: its layers, the embedding on the first
    stage, the final norm and output layer on the last (a tied output layer at PP > 1 is a copy)."""
    params = stage_layers(shape.num_layers, layout.pp) * shape.layer_params(layout.tp)
    embedding = shape.embedding_params(layout.tp, divisible_by)
    first, last = stage == 0, stage == layout.pp - 1
    if first:
        params += embedding
    if last:
        params += shape.hidden_size + (embedding if not (shape.tie_word_embeddings and first) else 0)
    return params


def optimizer_bytes_per_param(param_bytes: int, distributed: bool, shards: int) -> float:
    """fp32 masters (none when the parameters are fp32) and Adam's two moments, sharded when distributed."""
    state = (0 if param_bytes == FP32 else FP32) + 2 * FP32
    return state / shards if distributed else state


def bytes_per_param(param_bytes: int, distributed: bool, shards: int) -> float:
    """Weights + fp32 gradients + optimizer: megatron-core's distributed-optimizer table."""
    return param_bytes + FP32 + optimizer_bytes_per_param(param_bytes, distributed, shards)


@dataclass(frozen=True)
class PhaseInputs:
    """What one phase's memory depends on besides the model and the layout."""

    name: str
    micro_batch_tokens: int  # tokens of one micro-batch before the CP split
    micro_batches: int  # per DP rank per step (pipeline in-flight count)
    loss: str  # cross_entropy | topk_kl
    teacher_tokens: int = 0  # Phase 2: the teacher's tokens per micro-batch
    step_student_tokens: int = 0  # Phase 2: student tokens of the whole step on this DP rank (held targets)
    top_k: int = 0
    distributed: bool = False


@dataclass
class Estimate:
    """One phase at one layout: bytes per GPU for each line of the table (the worst pipeline stage)."""

    phase: str
    layout: Layout
    student_weights: float
    teacher_weights: float
    gradients: float
    optimizer: float
    activations: dict  # recompute -> bytes (layers + loss)
    loss: float
    teacher_forward: float
    targets: float
    transient: float
    stage: int = 0

    def training(self, recompute: Optional[str] = None) -> float:
        recompute = recompute or self.layout.recompute
        student = self.activations[recompute] + self.transient
        return (self.student_weights + self.teacher_weights + self.gradients + self.optimizer + self.targets
                + max(student, self.teacher_forward))


def estimate_phase(shape: ModelShape, layout: Layout, phase: PhaseInputs, *, param_bytes: int = 2,
                   divisible_by: int = 128) -> Estimate:
    """The phase's bytes per GPU on its most loaded pipeline stage (module docstring)."""
    shape.check_tensor_parallel(layout.tp)
    tokens = phase.micro_batch_tokens / layout.cp
    vocab_local = pad_vocab_size(shape.vocab_size, divisible_by, layout.tp) / layout.tp
    shards = layout.dp * layout.cp
    worst = None
    for stage in range(layout.pp):
        params = stage_params(shape, layout, stage, divisible_by)
        layers = stage_layers(shape.num_layers, layout.pp)
        flying = in_flight(stage, layout, phase.micro_batches)
        last = stage == layout.pp - 1
        loss = 0.0
        if last:
            # the final norm's input, normalised input and output (the output layer's input), its inverse RMS
            loss = tokens * (3 * param_bytes * shape.hidden_size + FP32)
            # the logits and their padded-vocabulary masked copy (forward), their gradient and its masked
            # copy (backward); cross-entropy also keeps an fp32 softmax when the logits are 16-bit
            loss += tokens * vocab_local * (2 * param_bytes + (FP32 if phase.loss == "cross_entropy" and param_bytes < FP32 else 0))
        activations = {}
        for mode in RECOMPUTE:
            per_layer = layer_activation_bytes(shape, tokens, layout.tp, param_bytes, mode)
            held = flying * layers * per_layer
            if mode == "full":  # the layer being recomputed holds its whole set for a moment
                held += layer_activation_bytes(shape, tokens, layout.tp, param_bytes, "none")
            activations[mode] = held + loss
        teacher_forward = targets = 0.0
        if phase.teacher_tokens:
            teacher_tokens = phase.teacher_tokens / layout.cp
            teacher_forward = layer_activation_bytes(shape, teacher_tokens, layout.tp, param_bytes, "none")
            if last:
                teacher_forward += teacher_tokens * vocab_local * param_bytes
            targets = phase.step_student_tokens * phase.top_k * (FP32 + 8) if last else 0.0
        h = shape.hidden_size
        largest_weight = max(shape.embedding_params(layout.tp, divisible_by), 2 * shape.ffn_hidden_size * h / layout.tp,
                             (shape.q_width + 2 * shape.kv_width) * h / layout.tp)
        estimate = Estimate(
            phase=phase.name, layout=layout, stage=stage,
            student_weights=params * param_bytes,
            teacher_weights=params * param_bytes if phase.teacher_tokens else 0.0,
            gradients=params * FP32,
            optimizer=params * optimizer_bytes_per_param(param_bytes, phase.distributed, shards),
            activations=activations, loss=loss, teacher_forward=teacher_forward, targets=targets,
            transient=largest_weight * param_bytes,
        )
        if worst is None or estimate.training() > worst.training():
            worst = estimate
    return worst


# ---------------------------------------------------------------------------------------------
# The config's phases and the rollout turn


def param_bytes_for(cfg: SDZeroConfig) -> int:
    """Bytes per weight on a GPU: ``auto`` is bfloat16 there."""
    return {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}[cfg.model.dtype]


def _micro_tokens(section, seq: int) -> int:
    budget = getattr(section, "max_tokens_per_micro_batch", None)
    return budget if budget else section.micro_batch_size * seq


def phase_inputs(cfg: SDZeroConfig, dp: int) -> list[PhaseInputs]:
    """Each training phase's batch and sequence settings, for ``dp`` data-parallel ranks."""
    def distributed(section) -> bool:
        return bool(getattr(section.optimizer, "distributed", False))

    srt, rft, dist = cfg.srt_train, cfg.rft, cfg.distill
    student_seq = cfg.data.max_prompt_tokens + dist.max_response_tokens
    per_rank_prompts = math.ceil(dist.prompts_per_step / dp)
    return [
        PhaseInputs("srt_train", _micro_tokens(srt, srt.max_seq_length), math.ceil(srt.global_batch_size / dp / srt.micro_batch_size),
                    "cross_entropy", distributed=distributed(srt)),
        PhaseInputs("distill", _micro_tokens(dist, student_seq), math.ceil(per_rank_prompts / dist.micro_batch_size), "topk_kl",
                    teacher_tokens=dist.micro_batch_size * dist.max_teacher_tokens,
                    step_student_tokens=per_rank_prompts * student_seq, top_k=dist.top_k, distributed=distributed(dist)),
        PhaseInputs("rft", _micro_tokens(rft, rft.max_seq_length), math.ceil(rft.global_batch_size / dp / rft.micro_batch_size),
                    "cross_entropy", distributed=distributed(rft)),
    ]


def rollout_turn(cfg: SDZeroConfig, estimate: Estimate, gpu_bytes: float) -> tuple[Optional[float], str]:
    """(bytes per GPU while a colocated engine generates, what the engine's share is), or (None, why) when
    the engine has no budget; a remote SGLang server takes nothing on the trainer's GPUs."""
    rollout = cfg.rollout
    if rollout.backend == "sglang" and rollout.sglang_url:
        return 0.0, "remote SGLang server: nothing on these GPUs"
    if rollout.backend == "hf":
        return None, "hf engine: no memory budget (the CPU oracle, not a GPU engine)"
    if rollout.backend == "sglang":
        share, what = rollout.sglang_mem_fraction_static * gpu_bytes, f"sglang_mem_fraction_static {rollout.sglang_mem_fraction_static}"
    elif rollout.vllm_kv_cache_gb is not None:
        share = rollout.vllm_kv_cache_gb * 1e9 + 2 * estimate.student_weights  # its own weights, roughly ours at its TP
        what = f"vllm_kv_cache_gb {rollout.vllm_kv_cache_gb} + weights"
    else:
        share, what = rollout.vllm_gpu_memory_utilization * gpu_bytes, f"vllm_gpu_memory_utilization {rollout.vllm_gpu_memory_utilization}"
    offload = rollout.offload_train_state is not False
    trainer = estimate.student_weights + estimate.teacher_weights
    if not offload:
        trainer += estimate.gradients + estimate.optimizer
    return share + trainer, what + ("" if offload else "; offload_train_state false: the trainer's state stays")


# ---------------------------------------------------------------------------------------------
# Loading the config


def load_plan_config(path: str, overrides: Sequence[str]) -> tuple[SDZeroConfig, dict]:
    """The validated config and the layout keys the command line sets beside it (dotted key ->
    value; ``--recompute`` fills it). Every layout key of the file and the overrides, the virtual
    pipeline size included, is the config's own, validated like the rest."""
    return load_config(path, overrides), {}


def config_layout(cfg: SDZeroConfig, layout_keys: dict, gpus: Optional[int]) -> Layout:
    """The layout the config (and the layout keys) describe on ``gpus`` GPUs (default: DP 1)."""
    tp, cp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.context_parallel_size
    pp = int(layout_keys.get("parallel.pipeline_model_parallel_size", cfg.parallel.pipeline_model_parallel_size))
    vpp = layout_keys.get("parallel.virtual_pipeline_model_parallel_size", cfg.parallel.virtual_pipeline_model_parallel_size)
    recompute = layout_keys.get("model.recompute", cfg.model.recompute)
    if recompute not in RECOMPUTE:
        raise ConfigError(f"model.recompute: {recompute!r} is not one of: {', '.join(RECOMPUTE)}")
    distributed = any(bool(v) for k, v in layout_keys.items() if k.endswith(".optimizer.distributed")) or any(
        getattr(getattr(cfg, name).optimizer, "distributed", False) for name in PHASES)
    model_parallel = tp * pp * cp
    gpus = gpus or model_parallel
    if pp < 1 or gpus % model_parallel:
        raise ConfigError(f"TP {tp} x PP {pp} x CP {cp} = {model_parallel} does not divide --gpus {gpus}")
    return Layout(tp=tp, pp=pp, cp=cp, dp=gpus // model_parallel, vpp=vpp, distributed=distributed, recompute=recompute)


def phases_with_layout(cfg: SDZeroConfig, layout_keys: dict, dp: int) -> list[PhaseInputs]:
    """:func:`phase_inputs` with each phase's ``<phase>.optimizer.distributed`` from the layout keys."""
    out = []
    for phase in phase_inputs(cfg, dp):
        key = f"{phase.name}.optimizer.distributed"
        out.append(replace(phase, distributed=bool(layout_keys[key])) if key in layout_keys else phase)
    return out


# ---------------------------------------------------------------------------------------------
# Search


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(cfg: SDZeroConfig, shape: ModelShape, gpus: int, gpu_bytes: float, reserve_bytes: float,
                   recompute: str, layout_keys: Optional[dict] = None, limit: int = 10) -> list[tuple[Layout, float, str]]:
    """Layouts of ``gpus`` GPUs whose every phase (training and rollout turn) fits, fewest model-parallel
    GPUs first, then least memory: (layout, peak bytes per GPU, the phase of the peak)."""
    param_bytes = param_bytes_for(cfg)
    found = []
    for tp in divisors(gpus):
        if shape.num_attention_heads % tp or shape.num_query_groups % tp:
            continue
        for pp in divisors(gpus // tp):
            if pp > shape.num_layers:
                continue
            for cp in divisors(gpus // (tp * pp)):
                dp = gpus // (tp * pp * cp)
                for distributed in (False, True):
                    if distributed and dp * cp == 1:
                        continue  # nothing to shard over
                    layout = Layout(tp=tp, pp=pp, cp=cp, dp=dp, distributed=distributed, recompute=recompute)
                    keys = {k: v for k, v in (layout_keys or {}).items() if not k.endswith(".optimizer.distributed")}
                    phases = [replace(p, distributed=distributed) for p in phases_with_layout(cfg, keys, dp)]
                    peak, where = 0.0, ""
                    for phase in phases:
                        estimate = estimate_phase(shape, layout, phase, param_bytes=param_bytes)
                        turn, _ = rollout_turn(cfg, estimate, gpu_bytes)
                        for value, name in ((estimate.training(), phase.name), (turn or 0.0, f"{phase.name} rollout")):
                            if value > peak:
                                peak, where = value, name
                    if peak + reserve_bytes <= gpu_bytes:
                        found.append((layout, peak + reserve_bytes, where))
    found.sort(key=lambda item: (item[0].tp * item[0].pp * item[0].cp, item[0].distributed, item[1]))
    return found[:limit]


# ---------------------------------------------------------------------------------------------
# Report


def _gib(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def render_plan(cfg: SDZeroConfig, shape: ModelShape, layout: Layout, *, gpu_gib: float, reserve_gib: float,
                layout_keys: Optional[dict] = None, search_gpus: Optional[int] = None) -> str:
    gpu_bytes, reserve = gpu_gib * GIB, reserve_gib * GIB
    param_bytes = param_bytes_for(cfg)
    phases = phases_with_layout(cfg, layout_keys or {}, layout.dp)
    estimates = [estimate_phase(shape, layout, phase, param_bytes=param_bytes) for phase in phases]
    out = io.StringIO()
    out.write(f"model: {shape.name}, {shape.total_params() / 1e9:.2f}B parameters ({shape.source})\n")
    out.write(f"layout: {layout.describe()} = {layout.gpus} GPUs, distributed optimizer "
              f"{'on' if layout.distributed else 'off'} (per phase below), recompute {layout.recompute}; "
              f"weights {'bf16' if param_bytes == 2 else 'fp32'}; GiB per GPU, worst pipeline stage\n\n")
    headers = ["GiB per GPU"] + [f"{e.phase}" for e in estimates]
    rows = [
        ["worst pipeline stage"] + [f"{e.stage} of {layout.pp}" for e in estimates],
        ["tokens per micro-batch / CP"] + [f"{p.micro_batch_tokens // layout.cp}" for p in phases],
        ["distributed optimizer"] + [("on" if p.distributed else "off") for p in phases],
        ["student weights"] + [_gib(e.student_weights) for e in estimates],
        ["teacher weights (frozen)"] + [_gib(e.teacher_weights) for e in estimates],
        ["gradients (fp32 main_grad)"] + [_gib(e.gradients) for e in estimates],
        ["optimizer (fp32 master + Adam)"] + [_gib(e.optimizer) for e in estimates],
    ]
    for mode in RECOMPUTE:
        rows.append([f"activations, recompute {mode}"] + [_gib(e.activations[mode]) for e in estimates])
    rows += [
        ["  of which logits / loss"] + [_gib(e.loss) for e in estimates],
        ["teacher forward (before student)"] + [_gib(e.teacher_forward) for e in estimates],
        ["teacher top-K targets of the step"] + [_gib(e.targets) for e in estimates],
        ["weight-gradient transient"] + [_gib(e.transient) for e in estimates],
        ["CUDA context, NCCL, fragmentation"] + [_gib(reserve) for _ in estimates],
        [f"training total (recompute {layout.recompute})"] + [_gib(e.training() + reserve) for e in estimates],
    ]
    turns = [rollout_turn(cfg, e, gpu_bytes) for e in estimates]
    rows.append(["rollout turn (engine + trainer)"] + [_gib(None if t is None else t + reserve) for t, _ in turns])
    peaks = [max(e.training(), t or 0.0) + reserve for e, (t, _) in zip(estimates, turns)]
    rows.append([f"peak vs GPU {gpu_gib:g} GiB"] + [f"{p / GIB:.1f} {'fits' if p <= gpu_bytes else 'OVER'}" for p in peaks])
    widths = [max(len(str(row[i])) for row in [headers] + rows) for i in range(len(headers))]
    for row in [headers] + rows:
        out.write("  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip() + "\n")
    out.write(f"rollout engine: {turns[0][1]}\n")
    if search_gpus:
        found = search_layouts(cfg, shape, search_gpus, gpu_bytes, reserve, layout.recompute, layout_keys)
        out.write(f"\nsmallest layouts of {search_gpus} GPUs that fit every phase (recompute {layout.recompute}, "
                  f"GPU {gpu_gib:g} GiB):\n")
        if not found:
            out.write("  none; try --recompute full, more GPUs, shorter sequences or smaller micro-batches\n")
        for candidate, peak, where in found:
            out.write(f"  {candidate.describe():28s} distributed optimizer {'on ' if candidate.distributed else 'off'}"
                      f"  peak {peak / GIB:6.1f} GiB ({where})\n")
    return out.getvalue()


def run_plan(args) -> int:
    try:
        cfg, layout_keys = load_plan_config(args.config, args.overrides)
        if args.recompute:
            layout_keys["model.recompute"] = args.recompute
        shape = resolve_shape(cfg, args.hf_config)
        layout = config_layout(cfg, layout_keys, args.gpus)
        print(render_plan(cfg, shape, layout, gpu_gib=args.gpu_memory_gib, reserve_gib=args.reserve_gib,
                          layout_keys=layout_keys, search_gpus=args.gpus), end="")
    except (ConfigError, ValueError, FileNotFoundError) as error:
        print(f"sdzero plan: {error}", file=sys.stderr)
        return 2
    return 0
