"""Parsing HF config.json files: supported features, refusals, RoPE, vocab padding, TP checks."""

import json

import pytest
import torch

from sdzero_mcore.models.hf_config import ModelArch, RopeSpec, UnsupportedModelError, pad_vocab_size
from sdzero_mcore.models.tiny import tiny_hf_config


def _config(architecture="Qwen3ForCausalLM", **overrides):
    return {**tiny_hf_config(architecture).to_dict(), **overrides}


def test_qwen3_features():
    arch = ModelArch.from_hf_config(_config())
    assert arch.architecture == "Qwen3ForCausalLM"
    assert arch.qk_norm and not arch.qkv_bias and arch.tie_word_embeddings
    assert (arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (4, 2, 32)
    assert arch.heads_per_group == 2 and arch.rope.theta == 1_000_000.0 and arch.rope.rope_type == "default"


def test_qwen2_has_qkv_bias_and_head_dim_from_hidden():
    arch = ModelArch.from_hf_config(_config("Qwen2ForCausalLM"))
    assert arch.qkv_bias and not arch.qk_norm and not arch.tie_word_embeddings
    assert arch.head_dim == 64 // 4


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_hf_config("LlamaForCausalLM")
    arch = ModelArch.from_hf_config(hf.to_dict())
    assert arch.rope.rope_type == "llama3" and arch.rope.original_max_position_embeddings == 64
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**hf.to_dict()), device="cpu")
    assert torch.allclose(arch.rope.inv_freq(arch.head_dim), expected, rtol=1e-6, atol=0)
    unscaled = RopeSpec(theta=arch.rope.theta).inv_freq(arch.head_dim)
    assert not torch.allclose(unscaled, expected)  # the scaling really changes frequencies


def test_transformers4_style_rope_fields():
    config = _config("LlamaForCausalLM")
    del config["rope_parameters"]
    config.update(
        rope_theta=500000.0,
        rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        torch_dtype="bfloat16",
    )
    arch = ModelArch.from_hf_config(config)
    assert arch.rope == RopeSpec(500000.0, "llama3", 32.0, 1.0, 4.0, 8192)
    assert arch.dtype == torch.bfloat16


def test_unsupported_architecture_lists_supported():
    with pytest.raises(UnsupportedModelError) as err:
        ModelArch.from_hf_config(_config(architectures=["MistralForCausalLM"]), source="x/config.json")
    message = str(err.value)
    assert "x/config.json" in message and "MistralForCausalLM" in message
    assert "LlamaForCausalLM, Olmo3ForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in message


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "rope_type"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"dtype": "float8"}, "dtype"),
    ],
)
def test_features_that_would_change_the_model_are_refused(overrides, field):
    with pytest.raises(UnsupportedModelError, match=field):
        ModelArch.from_hf_config(_config(**overrides))


def test_missing_field_is_named(tmp_path):
    config = _config()
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: missing field 'hidden_size'"):
        ModelArch.from_hf_dir(tmp_path)


def test_missing_and_corrupt_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelArch.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelArch.from_hf_dir(tmp_path)


@pytest.mark.parametrize(
    "vocab, tp, padded", [(1111, 1, 1152), (1111, 2, 1280), (1111, 4, 1536), (151936, 1, 151936), (151936, 4, 152064), (128, 1, 128)]
)
def test_vocab_padding_follows_megatron(vocab, tp, padded):
    assert pad_vocab_size(vocab, 128, tp) == padded


def test_tensor_parallel_must_divide_heads_and_groups():
    arch = ModelArch.from_hf_config(_config())  # 4 heads, 2 KV heads
    arch.check_tensor_parallel(2)
    with pytest.raises(ValueError, match=r"does not divide num_attention_heads=4 and num_key_value_heads=2.*1, 2"):
        arch.check_tensor_parallel(3)
    with pytest.raises(ValueError, match=r"does not divide num_key_value_heads=2;"):
        arch.check_tensor_parallel(4)


def test_pipeline_parallel_must_divide_the_layers():
    arch = ModelArch.from_hf_config({**_config(), "num_hidden_layers": 6})
    arch.check_pipeline_parallel(3)
    with pytest.raises(ValueError, match=r"pipeline-parallel size 4 does not divide num_hidden_layers=6; valid sizes for this model: 1, 2, 3, 6"):
        arch.check_pipeline_parallel(4)
    with pytest.raises(ValueError, match="must be >= 1"):
        arch.check_pipeline_parallel(0)
