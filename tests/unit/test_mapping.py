"""The HF <-> megatron layouts of docs/design.md, checked against hand-built expectations at TP 1, 2, 4."""

import pytest
import torch
from helpers import hf_to_global

from sdzero_mcore.checkpoint.mapping import (
    DictSource,
    Kind,
    concrete_mappings,
    expected_hf_shapes,
    gather_shards,
    global_to_hf,
    hf_to_local,
    mappings_by_param_name,
    shard_global,
)
from sdzero_mcore.models.hf_config import ModelArch

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, VOCAB = 8, 4, 3, 5, 12, 301


def _arch(architecture="Qwen2ForCausalLM", tied=False):
    # A plain config dict: odd sizes (hidden 5 with 8 heads of dim 3) that transformers' own
    # config classes would refuse, but that the layouts must handle.
    config = {
        "architectures": [architecture], "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": GROUPS,
        "head_dim": HEAD_DIM, "tie_word_embeddings": tied,
    }
    return ModelArch.from_hf_config(config)


def _hf_tensors(arch):
    """Every HF tensor filled with distinct values, so any misplaced row shows."""
    tensors, offset = {}, 0
    for name, shape in expected_hf_shapes(arch).items():
        n = torch.Size(shape).numel()
        tensors[name] = torch.arange(offset, offset + n, dtype=torch.float32).reshape(shape)
        offset += n
    return tensors


def _mapping(arch, mcore_name):
    return mappings_by_param_name(arch)[mcore_name]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_rows_grouped_per_query_group(tp):
    arch = _arch()
    hf = _hf_tensors(arch)
    attn = "model.layers.0.self_attn"
    q, k, v = (hf[f"{attn}.{p}_proj.weight"] for p in "qkv")
    heads_per_group = HEADS // GROUPS
    groups_per_rank = GROUPS // tp
    for rank in range(tp):
        expected_rows = []
        for group in range(rank * groups_per_rank, (rank + 1) * groups_per_rank):
            for head in range(group * heads_per_group, (group + 1) * heads_per_group):
                expected_rows.append(q[head * HEAD_DIM : (head + 1) * HEAD_DIM])
            expected_rows.append(k[group * HEAD_DIM : (group + 1) * HEAD_DIM])
            expected_rows.append(v[group * HEAD_DIM : (group + 1) * HEAD_DIM])
        expected = torch.cat(expected_rows)
        for suffix in ("weight", "bias"):
            mapping = _mapping(arch, f"decoder.layers.0.self_attention.linear_qkv.{suffix}")
            local = hf_to_local(mapping, DictSource(hf), arch, rank, tp, arch.padded_vocab_size(tp))
            if suffix == "weight":
                assert torch.equal(local, expected)
            else:
                bias = {p: hf[f"{attn}.{p}_proj.bias"] for p in "qkv"}
                rows = [
                    torch.cat([bias["q"].reshape(GROUPS, -1)[g], bias["k"].reshape(GROUPS, -1)[g], bias["v"].reshape(GROUPS, -1)[g]])
                    for g in range(rank * groups_per_rank, (rank + 1) * groups_per_rank)
                ]
                assert torch.equal(local, torch.cat(rows))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fc1_is_gate_shard_then_up_shard(tp):
    arch = _arch()
    hf = _hf_tensors(arch)
    gate, up = hf["model.layers.1.mlp.gate_proj.weight"], hf["model.layers.1.mlp.up_proj.weight"]
    mapping = _mapping(arch, "decoder.layers.1.mlp.linear_fc1.weight")
    n = FFN // tp
    for rank in range(tp):
        local = hf_to_local(mapping, DictSource(hf), arch, rank, tp, arch.padded_vocab_size(tp))
        assert torch.equal(local, torch.cat([gate[rank * n : (rank + 1) * n], up[rank * n : (rank + 1) * n]]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_and_vocab_shards(tp):
    arch = _arch()
    hf = _hf_tensors(arch)
    o_proj, down = hf["model.layers.0.self_attn.o_proj.weight"], hf["model.layers.0.mlp.down_proj.weight"]
    embed = hf["model.embed_tokens.weight"]
    padded = arch.padded_vocab_size(tp)
    assert padded % (128 * tp) == 0 and padded - VOCAB < 128 * tp
    rows = padded // tp
    source = DictSource(hf)
    for rank in range(tp):
        proj = hf_to_local(_mapping(arch, "decoder.layers.0.self_attention.linear_proj.weight"), source, arch, rank, tp, padded)
        fc2 = hf_to_local(_mapping(arch, "decoder.layers.0.mlp.linear_fc2.weight"), source, arch, rank, tp, padded)
        emb = hf_to_local(_mapping(arch, "embedding.word_embeddings.weight"), source, arch, rank, tp, padded)
        assert torch.equal(proj, o_proj.chunk(tp, dim=1)[rank])
        assert torch.equal(fc2, down.chunk(tp, dim=1)[rank])
        padded_embed = torch.cat([embed, torch.zeros(padded - VOCAB, HIDDEN)])
        assert torch.equal(emb, padded_embed[rank * rows : (rank + 1) * rows])


def test_vocab_rank_with_only_padding():
    """Vocab 301 at TP=4 pads to 512: rank 3 holds rows 384..511, all padding."""
    arch = _arch()
    local = hf_to_local(_mapping(arch, "output_layer.weight"), DictSource(_hf_tensors(arch)), arch, 3, 4, 512)
    assert local.shape == (128, HIDDEN) and local.dtype == torch.float32 and not local.any()


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM", "Olmo3ForCausalLM"])
def test_shards_gather_to_global_and_back_to_hf(architecture, tp):
    arch = _arch(architecture, tied=architecture == "Qwen3ForCausalLM")
    hf = _hf_tensors(arch)
    padded = arch.padded_vocab_size(tp)
    seen = {}
    for mapping in concrete_mappings(arch):
        shards = [hf_to_local(mapping, DictSource(hf), arch, rank, tp, padded) for rank in range(tp)]
        full = gather_shards(mapping, shards)
        assert torch.equal(full, hf_to_global(mapping, hf, arch, padded))
        for rank in range(tp):
            assert torch.equal(shard_global(mapping, full, rank, tp), shards[rank])
        seen.update(global_to_hf(mapping, full, arch))
    assert seen.keys() == hf.keys()
    for name in hf:
        assert torch.equal(seen[name], hf[name]), name


def test_mapping_kinds_and_aliases():
    arch = _arch("Qwen3ForCausalLM", tied=True)
    table = mappings_by_param_name(arch)
    assert table["decoder.layers.0.input_layernorm.weight"] is table[
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"
    ]
    assert table["decoder.layers.1.pre_mlp_layernorm.weight"].hf == ("model.layers.1.post_attention_layernorm.weight",)
    assert table["decoder.layers.0.self_attention.q_layernorm.weight"].kind is Kind.REPLICATED
    assert "output_layer.weight" not in table  # tied
    assert "decoder.layers.0.self_attention.linear_qkv.bias" not in table  # Qwen3 has no QKV bias
    assert _mapping(_arch(), "output_layer.weight").checkpoint_key == "output_layer.weight"
    assert (
        table["decoder.layers.1.mlp.linear_fc2.weight"].checkpoint_key == "decoder.layers.mlp.linear_fc2.weight"
    )


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_olmo3_full_width_qk_norm_follows_the_heads(tp):
    """Rank r's q_norm / k_norm slice scales the heads of rank r's linear_qkv rows."""
    arch = _arch("Olmo3ForCausalLM")
    hf = _hf_tensors(arch)
    q_norm, k_norm = hf["model.layers.1.self_attn.q_norm.weight"], hf["model.layers.1.self_attn.k_norm.weight"]
    assert q_norm.shape == (HEADS * HEAD_DIM,) and k_norm.shape == (GROUPS * HEAD_DIM,)
    q_map = _mapping(arch, "decoder.layers.1.self_attention.q_layernorm.weight")
    k_map = _mapping(arch, "decoder.layers.1.self_attention.k_layernorm.weight")
    assert q_map.kind is k_map.kind is Kind.COLUMN
    heads, groups = HEADS // tp, GROUPS // tp
    for rank in range(tp):
        q_local = hf_to_local(q_map, DictSource(hf), arch, rank, tp, arch.padded_vocab_size(tp))
        k_local = hf_to_local(k_map, DictSource(hf), arch, rank, tp, arch.padded_vocab_size(tp))
        assert torch.equal(q_local, q_norm[rank * heads * HEAD_DIM : (rank + 1) * heads * HEAD_DIM])
        assert torch.equal(k_local, k_norm[rank * groups * HEAD_DIM : (rank + 1) * groups * HEAD_DIM])


@pytest.mark.parametrize("architecture", ["Qwen2ForCausalLM", "Olmo3ForCausalLM"])
def test_a_loaded_model_carries_megatron_tensor_parallel_attributes(megatron_single_rank, tmp_path, architecture):
    """Built without initialisation (its weights come from the checkpoint), a model still marks its
    split weights as megatron-core's initialisers would; code such as the distributed optimizer's
    gradient norm reads them to tell a TP shard from a replica."""
    from sdzero_mcore.checkpoint.loading import build_model_from_hf
    from sdzero_mcore.checkpoint.mapping import PARTITION_DIM, model_param_mappings
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    hf_dir = save_tiny_hf_model(tmp_path / "hf", architecture, vocab_size=VOCAB)
    model = build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local")
    params = dict(model.named_parameters())
    marked = {name: (getattr(params[name], "tensor_model_parallel", False), getattr(params[name], "partition_dim", None))
              for name in params}
    for name, mapping in model_param_mappings(model).items():
        dim = PARTITION_DIM.get(mapping.kind)
        assert marked[name] == ((True, dim) if dim is not None else (False, None)), (name, mapping.kind)
    assert marked["embedding.word_embeddings.weight"] == (True, 0)
    assert marked["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1)
