"""Olmo-3 (Olmo3ForCausalLM) in one process: reading config.json as transformers reads it (layer
types, window, RoPE per layer type), the errors for variants it cannot build, the layer spec it
builds, the sliding-window mask, the converter's layout and the release example config.

Logits and gradients against transformers at TP 1 / 2 and CP 2 are in tests/distributed
(test_parity.py, test_cp_parity.py)."""

import json

import pytest
import torch
from helpers import REPO_ROOT
from megatron.core.transformer.identity_op import IdentityOp

from sdzero_mcore.checkpoint.mapping import Kind, expected_hf_shapes, mappings_by_param_name
from sdzero_mcore.checkpoint.source import ModelSource
from sdzero_mcore.config import load_config
from sdzero_mcore.models import builder
from sdzero_mcore.models.attention import sliding_window_causal_mask
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.hf_config import ModelArch, UnsupportedModelError
from sdzero_mcore.models.olmo3 import FullWidthRMSNorm, RowParallelLinearWithPostNorm
from sdzero_mcore.models.tiny import build_char_tokenizer, save_tiny_hf_model, tiny_hf_config
from sdzero_mcore.planner import ModelShape
from sdzero_mcore.run_setup import run_prompts

OLMO3 = "Olmo3ForCausalLM"
# the released 7B's RoPE, in the transformers 4 fields its config.json uses: YaRN on the full layers
RELEASED_ROPE = {
    "rope_theta": 500000,
    "rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
        "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1,
    },
    "max_position_embeddings": 65536,
}


def _config(**overrides):
    return {**tiny_hf_config(OLMO3).to_dict(), **overrides}


def _legacy(**fields):
    """The tiny config with its RoPE in transformers 4 fields (no rope_parameters)."""
    config = _config(**fields)
    del config["rope_parameters"]
    return config


def test_olmo3_fields():
    arch = ModelArch.from_hf_config(_config())
    assert arch.olmo3 and arch.qk_norm and not arch.qkv_bias and not arch.tie_word_embeddings
    assert arch.layer_types == ("sliding_attention", "full_attention") and arch.sliding_window == 5
    assert arch.norm_eps == 1e-5
    assert (arch.rope.rope_type, arch.rope.theta, arch.rope.factor) == ("yarn", 500000.0, 4.0)
    assert (arch.sliding_rope.rope_type, arch.sliding_rope.theta) == ("default", 10000.0)
    assert arch.rope_for_layer_type(arch.layer_type(0)) is arch.sliding_rope
    assert arch.rope_for_layer_type(arch.layer_type(1)) is arch.rope


def test_transformers_defaults_fill_missing_fields():
    """No layer_types: three sliding layers then a full one; no window: 4096; no RoPE: base 500000."""
    config = _legacy(num_hidden_layers=8)
    for key in ("layer_types", "sliding_window", "rms_norm_eps"):
        del config[key]
    arch = ModelArch.from_hf_config(config)
    assert arch.layer_types == ("sliding_attention",) * 3 + ("full_attention",) + ("sliding_attention",) * 3 + (
        "full_attention",
    )
    assert arch.sliding_window == 4096 and arch.norm_eps == 1e-5
    assert arch.rope.theta == arch.sliding_rope.theta == 500000.0


@pytest.mark.parametrize(
    "config",
    [
        _config(),  # rope_parameters by layer type: another base on the sliding layers, YaRN on the full
        _legacy(**RELEASED_ROPE),  # the released models' fields
        # a transformers 4 rope_theta is the full layers' base only; the sliding layers keep 500000
        _legacy(rope_theta=10000.0),
        _legacy(rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0, "mscale": 2.0, "mscale_all_dim": 1.0}),
        _legacy(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64}),
    ],
    ids=["rope_parameters", "released_7b", "legacy_theta", "yarn_mscale", "llama3"],
)
def test_rope_per_layer_type_matches_transformers(config):
    from transformers import Olmo3Config
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    arch = ModelArch.from_hf_config(config)
    reference = Olmo3RotaryEmbedding(Olmo3Config.from_dict(config))
    for layer_type in ("sliding_attention", "full_attention"):
        rope = arch.rope_for_layer_type(layer_type)
        expected = getattr(reference, f"{layer_type}_inv_freq")
        assert torch.allclose(rope.inv_freq(arch.head_dim), expected, rtol=1e-6, atol=0), layer_type
        assert rope.attention_factor == pytest.approx(getattr(reference, f"{layer_type}_attention_scaling"), rel=1e-12)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"layer_types": ["sliding_attention", "chunked_attention"]}, r"layer_types \['chunked_attention'\]"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries, num_hidden_layers is 2"),
        ({"sliding_window": None}, "sliding_window=None"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, "rope_parameters .* keys it by layer type"),
        ({"rope_parameters": {"full_attention": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}},
         "rope_parameters.full_attention.rope_type 'dynamic'"),
        ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}},
         "rope_parameters.sliding_attention.partial_rotary_factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"architectures": ["Olmo2ForCausalLM"]}, r"architectures \['Olmo2ForCausalLM'\] is not supported"),
        ({"architectures": ["OlmoHybridForCausalLM"]}, r"architectures \['OlmoHybridForCausalLM'\]"),
    ],
)
def test_unsupported_variants_name_the_field(overrides, field):
    config = _legacy(**overrides) if "rope_scaling" in overrides else _config(**overrides)
    with pytest.raises(UnsupportedModelError, match=f"x/config.json: .*{field}"):
        ModelArch.from_hf_config(config, source="x/config.json")


def test_sliding_window_mask_is_transformers_window():
    """transformers' sliding_window W: a query sees itself and the W - 1 keys before it."""
    window = 3
    mask = sliding_window_causal_mask(0, 6, 0, 6, window - 1, torch.device("cpu"))
    q, k = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(mask, (k <= q) & (k > q - window))
    # a later query chunk against the keys from position 2: the same band, shifted
    assert torch.equal(sliding_window_causal_mask(4, 2, 2, 4, window - 1, torch.device("cpu")), mask[4:6, 2:6])


def test_hf_shapes_and_kinds_match_transformers():
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(OLMO3)
    arch = ModelArch.from_hf_config(config.to_dict())
    model = AutoModelForCausalLM.from_config(config)
    assert expected_hf_shapes(arch) == {name: tuple(p.shape) for name, p in model.state_dict().items()}
    table = mappings_by_param_name(arch)
    attn = "decoder.layers.0.self_attention"
    assert table[f"{attn}.q_layernorm.weight"].kind is Kind.COLUMN
    assert table[f"{attn}.linear_proj.post_layernorm.weight"].hf == ("model.layers.0.post_attention_layernorm.weight",)
    assert table["decoder.layers.1.mlp.linear_fc2.post_layernorm.weight"].hf == (
        "model.layers.1.post_feedforward_layernorm.weight",
    )


def test_layer_spec(megatron_single_rank):
    arch = ModelArch.from_hf_config(_config())
    model = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    assert not model.config.qk_layernorm  # the full-width norms' TP-sharded grads must not be all-reduced
    table = mappings_by_param_name(arch)
    assert {name for name, _ in model.named_parameters()} <= table.keys()
    # the memory planner counts what is built: full-width QK-norm weights, two norms per layer
    shape = ModelShape.from_arch(arch, "tiny-olmo3", "config.json")
    assert shape.qk_norm == "full" and shape.total_params() == sum(p.numel() for p in model.parameters())
    for index, layer in enumerate(model.decoder.layers):
        assert isinstance(layer.input_layernorm, IdentityOp) and isinstance(layer.pre_mlp_layernorm, IdentityOp)
        attention = layer.self_attention
        assert isinstance(attention.linear_proj, RowParallelLinearWithPostNorm)
        assert isinstance(layer.mlp.linear_fc2, RowParallelLinearWithPostNorm)
        for norm, width in ((attention.q_layernorm, 4 * 16), (attention.k_layernorm, 2 * 16)):
            assert isinstance(norm, FullWidthRMSNorm) and norm.weight.shape == (width,)
            assert norm.weight.tensor_model_parallel and norm.weight.partition_dim == 0
        # layer 0 slides (window 5: keys 0..4 behind), layer 1 attends to everything before it
        assert attention.core_attention.window_left == (4 if index == 0 else None)
        rope = arch.rope_for_layer_type(arch.layer_type(index))
        assert torch.equal(attention.layer_rotary_pos_emb.inv_freq, rope.inv_freq(arch.head_dim))
        assert attention.attention_factor == rope.attention_factor


def test_full_width_qk_norm_is_one_rms_over_all_heads(megatron_single_rank):
    arch = ModelArch.from_hf_config(_config())
    model = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    norm = model.decoder.layers[0].self_attention.q_layernorm
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
    x = torch.randn(3, 2, 4, 16)  # [s, b, heads, head_dim]
    flat = x.reshape(3, 2, 64)
    expected = norm.weight * flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + arch.norm_eps)
    assert torch.allclose(norm(x).reshape(3, 2, 64), expected, rtol=1e-6, atol=1e-6)
    per_head = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + arch.norm_eps)
    assert not torch.allclose(norm(x), norm.weight.view(4, 16) * per_head, atol=1e-3)  # not Qwen3's per-head norm


def test_builder_refusals(megatron_single_rank, monkeypatch):
    arch = ModelArch.from_hf_config(_config())
    with pytest.raises(ValueError, match="local_attention='unfused' is not supported for Olmo3ForCausalLM"):
        build_gpt_model(arch, transformer_impl="local", local_attention="unfused", on_cpu=True)
    # as on a GPU machine with TransformerEngine: auto would pick TE, and picks local for Olmo-3
    monkeypatch.setattr(builder, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ValueError, match="transformer_impl='transformer_engine' is not supported for Olmo3ForCausalLM"):
        builder.layer_spec_for(arch, "transformer_engine")
    assert builder.resolve_transformer_impl("auto") == "transformer_engine"
    assert builder.resolve_transformer_impl_for(arch, "auto") == "local"


def test_release_example_loads_and_picks_the_olmo_phrase(tmp_path):
    cfg = load_config(REPO_ROOT / "examples" / "olmo3_7b_release.yaml")
    qwen = load_config(REPO_ROOT / "examples" / "qwen3_4b_release.yaml")
    assert cfg.recipe == "release" and cfg.model.hf_dir == "checkpoints/Olmo-3-7B-Instruct"
    assert (cfg.model.dtype, cfg.parallel.tensor_model_parallel_size) == ("bfloat16", 4)
    assert (cfg.rollout.backend, cfg.data.p_r_preset) == ("vllm", "auto")
    # the release's settings are the Qwen example's, model and engine aside
    for section in ("data", "srt_collect", "srt_train", "distill", "prompts", "math", "eval"):
        assert getattr(cfg, section) == getattr(qwen, section), section
    # a tiny Olmo-3 in a directory whose name says nothing: the architecture picks the OLMo phrase
    model_dir = save_tiny_hf_model(tmp_path / "model", OLMO3, vocab_size=128)
    assert json.loads((model_dir / "config.json").read_text())["architectures"] == [OLMO3]
    prompts = run_prompts(cfg, ModelSource(model_dir, "hf"), build_char_tokenizer())
    assert prompts.phrases.incorrect == "Wrong. I need to redo all."
    assert prompts.phrases.correct == "Let me rephrase the above solution."


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_gradients(megatron_single_rank, recompute):
    """megatron-core's recompute re-runs the Olmo-3 layers (their own RoPE, windows, norms) exactly."""
    arch = ModelArch.from_hf_config(_config())
    ids = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for kwargs in ({}, {"recompute": recompute}):
        torch.manual_seed(0)
        model = build_gpt_model(arch, transformer_impl="local", on_cpu=True, **kwargs)
        model.train()
        model(ids, torch.arange(12).expand(2, -1), None, labels=ids).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7), name
