"""Tiny HF models and an offline character tokenizer, for the embedded demo and the tests.

Nothing here downloads: the tokenizer is built from a fixed character set, and models are
randomly initialised ``transformers`` models of the supported architectures.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Olmo3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARACTERS = string.printable  # digits, letters, punctuation, whitespace incl. newline


def build_char_tokenizer():
    """A PreTrainedTokenizerFast with one token per printable character plus chat specials."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(CHARACTERS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


_TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    # Qwen3: tied embeddings, GQA, per-head QK-norm, head_dim independent of hidden/heads.
    "Qwen3ForCausalLM": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True, rope_theta=1_000_000.0,
    ),
    # Qwen2.5: biases on q/k/v, untied embeddings.
    "Qwen2ForCausalLM": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=1_000_000.0,
    ),
    # Llama 3: RoPE scaling with a short original context so that the scaling is exercised.
    "LlamaForCausalLM": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500_000.0,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
    # Olmo-3: post-norms, full-width QK-norm, GQA, untied embeddings; a sliding layer then a full
    # one, a window (5) shorter than the tests' sequences, and a RoPE per layer type: another base
    # on the sliding layer, YaRN (as the released models have) on the full one.
    "Olmo3ForCausalLM": dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {
                "rope_type": "yarn", "rope_theta": 500_000.0, "factor": 4.0,
                "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
            },
        },
        pad_token_id=0, bos_token_id=None, eos_token_id=3,
    ),
}


def tiny_hf_config(architecture: str = "Qwen3ForCausalLM", vocab_size: int = 1111, **overrides):
    """A transformers config for a tiny model of ``architecture`` (vocab not a multiple of 128)."""
    config_cls = {
        "Qwen3ForCausalLM": Qwen3Config,
        "Qwen2ForCausalLM": Qwen2Config,
        "LlamaForCausalLM": LlamaConfig,
        "Olmo3ForCausalLM": Olmo3Config,
    }
    if architecture not in config_cls:
        raise ValueError(f"no tiny config for {architecture!r}; choose from {', '.join(config_cls)}")
    kwargs = {**_TINY_DEFAULTS[architecture], "vocab_size": vocab_size, "max_position_embeddings": 512, **overrides}
    config = config_cls[architecture](**kwargs)
    config.architectures = [architecture]
    return config


def save_tiny_hf_model(
    out_dir: str | Path,
    architecture: str = "Qwen3ForCausalLM",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    with_tokenizer: bool = True,
    max_shard_size: str | None = None,
    **config_overrides,
) -> Path:
    """Write a randomly initialised tiny HF model (and the char tokenizer) to ``out_dir``."""
    out_dir = Path(out_dir)
    config = tiny_hf_config(architecture, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    # Norm weights start at 1 in HF; randomise them so the converters' handling of every tensor
    # (not just the matrices) shows up in parity checks.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **save_kwargs)
    if with_tokenizer:
        build_char_tokenizer().save_pretrained(out_dir)
    return out_dir
