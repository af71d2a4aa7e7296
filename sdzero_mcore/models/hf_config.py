"""What a HF ``config.json`` says about a decoder-only model, in the terms megatron-core needs.

Reads both config styles: transformers 5 (``rope_parameters``, ``dtype``) and transformers 4
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``). Anything the builders cannot reproduce
exactly (sliding windows, other activations, other RoPE types, biases Megatron has no slot for)
is refused here with the field that caused it, instead of silently producing a different model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch


@dataclass(frozen=True)
class _Family:
    qk_norm: bool  # per-head RMSNorm on queries and keys before RoPE (Qwen3)
    qkv_bias: bool  # biases on q/k/v projections only (Qwen2.5)


SUPPORTED_ARCHITECTURES: dict[str, _Family] = {
    "LlamaForCausalLM": _Family(qk_norm=False, qkv_bias=False),
    "Qwen2ForCausalLM": _Family(qk_norm=False, qkv_bias=True),
    "Qwen3ForCausalLM": _Family(qk_norm=True, qkv_bias=False),
}

_MODEL_TYPE_TO_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The HF config describes a model this project cannot build exactly."""


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters; ``rope_type`` is "default" or "llama3"."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """Per-pair inverse frequencies [head_dim // 2] in float32, as transformers computes them."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.rope_type == "default":
            return inv_freq
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
    # The config.json it came from, kept so that exports write the same config back.
    hf_config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

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
    layer_types = config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        raise refuse(f"layer_types {sorted(set(layer_types))} is not supported; supported: ['full_attention']")
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
        num_layers=int(need("num_hidden_layers")),
        num_attention_heads=num_heads,
        num_query_groups=num_groups,
        head_dim=head_dim,
        ffn_hidden_size=int(need("intermediate_size")),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=_parse_rope(config, refuse),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        dtype=_DTYPES[dtype_name],
        initializer_range=float(config.get("initializer_range", 0.02)),
        hf_config=dict(config),
    )


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
