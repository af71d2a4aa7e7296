"""What a HF ``config.json`` says about a decoder-only model, in the terms megatron-core needs.

Reads both config styles: transformers 5 (``rope_parameters``, ``dtype``) and transformers 4
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``). Anything the builders cannot reproduce
exactly (sliding windows outside Olmo-3, other activations, other RoPE types, biases Megatron has
no slot for) is refused here with the field that caused it, instead of silently producing a
different model.

Olmo-3 (``Olmo3ForCausalLM``) differs from the others in four ways, all read here: norms after
the attention and MLP outputs instead of before them, QK-norm over the whole q and k projection
width instead of per head, sliding-window attention on the layers ``layer_types`` marks
``sliding_attention``, and one RoPE per layer type (``rope_parameters`` keyed by layer type; YaRN
on the full-attention layers of the released 7B and 32B models).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch


@dataclass(frozen=True)
class _Family:
    qk_norm: bool  # RMSNorm on queries and keys before RoPE (Qwen3 per head, Olmo-3 full width)
    qkv_bias: bool  # biases on q/k/v projections only (Qwen2.5)
    olmo3: bool = False  # post-norms, full-width QK-norm, sliding-window layers, RoPE per layer type


SUPPORTED_ARCHITECTURES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family(qk_norm=False, qkv_bias=False),
    "Olmo3ForCausalLM": _Family(qk_norm=True, qkv_bias=False, olmo3=True),
    "Qwen2ForCausalLM": _Family(qk_norm=False, qkv_bias=True),
    "Qwen3ForCausalLM": _Family(qk_norm=True, qkv_bias=False),
}

_MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "olmo3": "Olmo3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Olmo-3's attention kinds (config.json ``layer_types``).
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
OLMO3_LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
# transformers' Olmo3Config defaults for fields a config.json leaves out: the RoPE base of a layer
# type whose parameters name none (its default_theta), the window, the context and the norm epsilon.
OLMO3_DEFAULT_ROPE_THETA = 500000.0
OLMO3_DEFAULT_SLIDING_WINDOW = 4096
OLMO3_DEFAULT_MAX_POSITIONS = 2048
OLMO3_RMS_NORM_EPS = 1e-5

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The HF config describes a model this project cannot build exactly."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; ``rope_type`` is "default", "llama3" or "yarn" (Olmo-3 only).

    YaRN also scales cos and sin by ``attention_factor`` (the others leave it at 1); ``beta_fast``
    and ``beta_slow`` bound its interpolation ramp.
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Per-pair inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.rope_type == "default":
            return inv_freq
        if self.rope_type == "yarn":
            return self._yarn_inv_freq(head_dim)
        # Llama 3 scaling: long wavelengths are divided by `factor`, short ones kept, and the band
        # in between interpolated smoothly.
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)

    def _yarn_inv_freq(self, head_dim: int) -> torch.Tensor:
        # transformers' _compute_yarn_parameters, step for step (truncate=True, its default): the
        # pairs that turn fewer than beta_slow times over the original context are interpolated
        # (divided by factor), those that turn more than beta_fast times kept, a linear ramp between.
        pos_freqs = self.theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)

        def correction_dim(rotations: float) -> float:
            return (head_dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
                2 * math.log(self.theta)
            )

        low = max(math.floor(correction_dim(self.beta_fast)), 0)
        high = min(math.ceil(correction_dim(self.beta_slow)), head_dim - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extrapolation_share = 1 - ramp
        return interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share


def pad_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisible_by x TP."""
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class ModelArch:
    """The architecture of a supported HF causal LM."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope: RopeSpec
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: torch.dtype
    initializer_range: float = 0.02
    # Olmo-3: norms after the attention and MLP outputs (no input norms) and QK-norm over the whole
    # q / k projection width; one attention kind per layer (``layer_types``, empty = all full), the
    # sliding layers' window (keys at distance < sliding_window) and RoPE (``sliding_rope``; ``rope``
    # is the full-attention layers').
    olmo3: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: Optional[int] = None
    sliding_rope: Optional[RopeSpec] = None
    # The config.json it came from, kept so that exports write the same config back.
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def layer_type(self, layer: int) -> str:
        """``full_attention`` or ``sliding_attention`` for layer ``layer`` (0-based)."""
        return self.layer_types[layer] if self.layer_types else FULL_ATTENTION

    def rope_for_layer_type(self, layer_type: str) -> RopeSpec:
        return self.sliding_rope if layer_type == SLIDING_ATTENTION and self.sliding_rope else self.rope

    def padded_vocab_size(self, tensor_parallel_size: int, divisible_by: int = 128) -> int:
        return pad_vocab_size(self.vocab_size, divisible_by, tensor_parallel_size)

    def check_tensor_parallel(self, tensor_parallel_size: int) -> None:
        """Refuse a TP size that does not split attention heads and query groups evenly."""
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {tensor_parallel_size}")
        problems = []
        if self.num_attention_heads % tensor_parallel_size:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups % tensor_parallel_size:
            problems.append(f"num_key_value_heads={self.num_query_groups}")
        if problems:
            valid = [n for n in range(1, self.num_query_groups + 1) if self.num_query_groups % n == 0]
            raise ValueError(
                f"tensor-parallel size {tensor_parallel_size} does not divide {' and '.join(problems)}; "
                f"valid sizes for this model: {', '.join(map(str, valid))}"
            )

    def check_pipeline_parallel(self, pipeline_parallel_size: int) -> None:
        """Refuse a pipeline-parallel size that does not split the layers evenly over the stages."""
        if pipeline_parallel_size < 1:
            raise ValueError(f"pipeline-parallel size must be >= 1, got {pipeline_parallel_size}")
        if self.num_layers % pipeline_parallel_size:
            valid = [n for n in range(1, self.num_layers + 1) if self.num_layers % n == 0]
            raise ValueError(
                f"pipeline-parallel size {pipeline_parallel_size} does not divide num_hidden_layers={self.num_layers}; "
                f"valid sizes for this model: {', '.join(map(str, valid))}"
            )

    def check_virtual_pipeline_parallel(self, pipeline_parallel_size: int, virtual_size: Optional[int]) -> None:
        """Refuse a virtual pipeline size (model chunks per stage) that does not split each stage's
        layers evenly (None: no virtual stages)."""
        if virtual_size is None:
            return
        per_stage = self.num_layers // pipeline_parallel_size
        if virtual_size < 1 or per_stage % virtual_size:
            valid = [n for n in range(2, per_stage + 1) if per_stage % n == 0]
            raise ValueError(
                f"{virtual_size} does not divide the {per_stage} layers per pipeline stage (num_hidden_layers="
                f"{self.num_layers} / pipeline-parallel size {pipeline_parallel_size}); valid sizes at this "
                f"pipeline-parallel size: {', '.join(map(str, valid)) or 'none'}"
            )

    @classmethod
    def from_hf_dir(cls, hf_dir: str | Path) -> "ModelArch":
        path = Path(hf_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the HF checkpoint directory {hf_dir}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_hf_config(config, source=str(path))

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> "ModelArch":
        return _parse(config, source)


def _parse(config: Mapping[str, Any], source: str) -> ModelArch:
    def need(key: str) -> Any:
        if config.get(key) is None:
            raise ValueError(f"{source}: missing field '{key}'")
        return config[key]

    def refuse(message: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{source}: {message}")

    architectures = config.get("architectures") or []
    if not architectures and config.get("model_type") in _MODEL_TYPE_TO_ARCHITECTURE:
        architectures = [_MODEL_TYPE_TO_ARCHITECTURE[config["model_type"]]]
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise refuse(f"architectures {list(architectures)} is not supported; supported: {supported}")
    architecture = architectures[0]
    family = SUPPORTED_ARCHITECTURES[architecture]

    hidden_size = int(need("hidden_size"))
    num_heads = int(need("num_attention_heads"))
    num_groups = int(config.get("num_key_value_heads") or num_heads)
    if num_heads % num_groups:
        raise ValueError(
            f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_groups}"
        )
    head_dim = int(config.get("head_dim") or hidden_size // num_heads)

    if config.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act={config['hidden_act']!r} is not supported; supported: 'silu'")
    if config.get("use_sliding_window"):
        raise refuse("use_sliding_window=true is not supported (every layer must use full attention)")
    num_layers = int(need("num_hidden_layers"))
    if family.olmo3:
        layer_fields = _parse_olmo3(config, num_layers, refuse)
    else:
        layer_types = config.get("layer_types") or []
        if any(kind != FULL_ATTENTION for kind in layer_types):
            raise refuse(
                f"layer_types {sorted(set(layer_types))} is not supported for {architecture}; supported: "
                f"['{FULL_ATTENTION}'] (sliding-window layers: Olmo3ForCausalLM)"
            )
        layer_fields = {"rope": _parse_rope(config, refuse)}
    if config.get("mlp_bias"):
        raise refuse("mlp_bias=true is not supported")
    if config.get("attention_bias"):
        raise refuse("attention_bias=true is not supported (it adds an output-projection bias)")

    dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if dtype_name not in _DTYPES:
        raise refuse(f"dtype {dtype_name!r} is not supported; supported: {', '.join(_DTYPES)}")

    return ModelArch(
        architecture=architecture,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_attention_heads=num_heads,
        num_query_groups=num_groups,
        head_dim=head_dim,
        ffn_hidden_size=int(need("intermediate_size")),
        norm_eps=float(config.get("rms_norm_eps", OLMO3_RMS_NORM_EPS if family.olmo3 else 1e-6)),
        max_position_embeddings=int(
            config.get("max_position_embeddings", OLMO3_DEFAULT_MAX_POSITIONS if family.olmo3 else 4096)
        ),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        dtype=_DTYPES[dtype_name],
        initializer_range=float(config.get("initializer_range", 0.02)),
        hf_config=dict(config),
        **layer_fields,
    )


def _parse_olmo3(config: Mapping[str, Any], num_layers: int, refuse) -> dict[str, Any]:
    """The Olmo-3 fields of :class:`ModelArch`, read as transformers' Olmo3Config reads them."""
    layer_types = config.get("layer_types")
    if layer_types is None:  # Olmo3Config's default: three sliding layers, then a full one
        layer_types = [SLIDING_ATTENTION if (i + 1) % 4 else FULL_ATTENTION for i in range(num_layers)]
    unknown = sorted(set(layer_types) - set(OLMO3_LAYER_TYPES))
    if unknown:
        raise refuse(f"layer_types {unknown} is not supported; supported: {list(OLMO3_LAYER_TYPES)}")
    if len(layer_types) != num_layers:
        raise refuse(f"layer_types has {len(layer_types)} entries, num_hidden_layers is {num_layers}")
    window = config.get("sliding_window", OLMO3_DEFAULT_SLIDING_WINDOW)
    if SLIDING_ATTENTION in layer_types and (not isinstance(window, int) or window < 1):
        raise refuse(f"sliding_window={window!r}: layer_types has sliding_attention layers, which need a window >= 1")
    ropes = _parse_olmo3_rope(config, refuse)
    return {
        "olmo3": True,
        "layer_types": tuple(layer_types),
        "sliding_window": int(window) if SLIDING_ATTENTION in layer_types else None,
        "rope": ropes[FULL_ATTENTION],
        "sliding_rope": ropes[SLIDING_ATTENTION],
    }


def _parse_olmo3_rope(config: Mapping[str, Any], refuse) -> dict[str, RopeSpec]:
    # Olmo3Config.convert_rope_params_to_dict: `rope_parameters` keyed by layer type (transformers
    # 5), or the transformers 4 fields, which describe the full-attention layers only: `rope_scaling`
    # updates their parameters and `rope_theta` is their base, while the sliding layers keep
    # the default base (OLMO3_DEFAULT_ROPE_THETA) unless `rope_parameters` names one.
    nested = config.get("rope_parameters")
    if nested is not None and (not isinstance(nested, Mapping) or not set(nested) <= set(OLMO3_LAYER_TYPES)):
        raise refuse(
            f"rope_parameters {nested!r} is not supported: Olmo3ForCausalLM keys it by layer type "
            f"({', '.join(OLMO3_LAYER_TYPES)})"
        )
    params = {kind: dict((nested or {}).get(kind) or {"rope_type": "default"}) for kind in OLMO3_LAYER_TYPES}
    if config.get("rope_scaling"):
        params[FULL_ATTENTION].update(config["rope_scaling"])
    legacy_theta = config.get("rope_theta")
    params[FULL_ATTENTION].setdefault("rope_theta", OLMO3_DEFAULT_ROPE_THETA if legacy_theta is None else legacy_theta)
    params[SLIDING_ATTENTION].setdefault("rope_theta", OLMO3_DEFAULT_ROPE_THETA)
    field_of = {
        FULL_ATTENTION: "rope_parameters.full_attention" if nested else "rope_scaling",
        SLIDING_ATTENTION: "rope_parameters.sliding_attention",
    }
    max_positions = int(config.get("max_position_embeddings", OLMO3_DEFAULT_MAX_POSITIONS))
    return {kind: _olmo3_rope(params[kind], field_of[kind], max_positions, refuse) for kind in OLMO3_LAYER_TYPES}


def _olmo3_rope(params: Mapping[str, Any], field_name: str, max_positions: int, refuse) -> RopeSpec:
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse(f"{field_name}.partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    if rope_type == "default":
        return RopeSpec(theta=theta)
    original = int(params.get("original_max_position_embeddings", max_positions))
    if rope_type == "llama3":
        return RopeSpec(
            theta=theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=original,
        )
    if rope_type == "yarn":
        factor = params.get("factor")
        factor = float(max_positions / original if factor is None else factor)
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # YaRN's default, with DeepSeek's mscale / mscale_all_dim variant
            mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        return RopeSpec(
            theta=theta,
            rope_type="yarn",
            factor=factor,
            original_max_position_embeddings=original,
            beta_fast=float(params.get("beta_fast") or 32),
            beta_slow=float(params.get("beta_slow") or 1),
            attention_factor=float(attention_factor),
        )
    raise refuse(f"{field_name}.rope_type {rope_type!r} is not supported; supported: 'default', 'llama3', 'yarn'")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(config: Mapping[str, Any], refuse) -> RopeSpec:
    # transformers 5 keeps everything in `rope_parameters`; transformers 4 splits it into
    # `rope_theta` and an optional `rope_scaling` dict (whose type key was once called "type").
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling")
    if scaling:
        params = {**scaling, **params}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeSpec(theta=float(theta))
    if rope_type == "llama3":
        return RopeSpec(
            theta=float(theta),
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise refuse(f"rope_type {rope_type!r} is not supported; supported: 'default', 'llama3'")
