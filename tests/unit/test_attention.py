"""SDPACoreAttention against megatron-core's DotProductAttention (local spec), CP = 1, float32."""

import pytest
import torch

from sdzero_mcore.models.attention import SDPACoreAttention

TOL = 1e-5


def _config(heads: int, groups: int, head_dim: int):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
        use_cpu_initialization=True,
    )


def _both(config, mask_type):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    kwargs = dict(config=config, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    return SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)


def _qkv(seq, batch, heads, groups, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(seq, batch, heads, head_dim, generator=generator)
    k = torch.randn(seq, batch, groups, head_dim, generator=generator)
    v = torch.randn(seq, batch, groups, head_dim, generator=generator)
    return [t.requires_grad_() for t in (q, k, v)]


def _run(module, q, k, v, mask, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in (q, k, v)]


@pytest.mark.parametrize(
    "heads,groups,seq", [(4, 4, 9), (4, 2, 16), (8, 1, 5), (6, 3, 1)], ids=["mha", "gqa2", "mqa", "seq1"]
)
def test_causal_forward_and_gradients_equal_dot_product_attention(megatron_single_rank, heads, groups, seq):
    from megatron.core.transformer.enums import AttnMaskType

    head_dim, batch = 16, 2
    ours, theirs = _both(_config(heads, groups, head_dim), AttnMaskType.causal)
    q, k, v = _qkv(seq, batch, heads, groups, head_dim, seed=heads * 100 + seq)
    grad_out = torch.randn(seq, batch, heads * head_dim, generator=torch.Generator().manual_seed(7))
    out_a, grads_a = _run(ours, q, k, v, None, grad_out)
    out_b, grads_b = _run(theirs, q, k, v, None, grad_out)
    assert out_a.shape == (seq, batch, heads * head_dim)
    assert (out_a - out_b).abs().max().item() < TOL
    for name, a, b in zip("qkv", grads_a, grads_b):
        assert (a - b).abs().max().item() < TOL, name


def test_explicit_padding_mask_equals_dot_product_attention(megatron_single_rank):
    """A given mask (True = masked out, megatron's convention) replaces the causal default."""
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups, head_dim, seq, batch = 4, 2, 8, 7, 2
    ours, theirs = _both(_config(heads, groups, head_dim), AttnMaskType.padding)
    q, k, v = _qkv(seq, batch, heads, groups, head_dim, seed=3)
    keep = torch.ones(batch, 1, seq, seq, dtype=torch.bool).tril()
    keep[1, :, :, 5:] = False  # the second sequence has two padded keys
    mask = ~keep
    grad_out = torch.randn(seq, batch, heads * head_dim, generator=torch.Generator().manual_seed(1))
    out_a, grads_a = _run(ours, q, k, v, mask, grad_out)
    out_b, grads_b = _run(theirs, q, k, v, mask, grad_out)
    assert (out_a - out_b).abs().max().item() < TOL
    for a, b in zip(grads_a, grads_b):
        assert (a - b).abs().max().item() < TOL


def test_unsupported_inputs_are_refused(megatron_single_rank):
    from megatron.core.transformer.enums import AttnMaskType

    config = _config(4, 2, 8)
    module = SDPACoreAttention(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    q, k, v = _qkv(4, 1, 4, 2, 8, seed=0)
    with pytest.raises(ValueError, match="attention_bias"):
        module(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="multiple of key/value groups"):
        module(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), None)
    with pytest.raises(ValueError, match="cp_comm_type='all_gather' only"):
        SDPACoreAttention(
            config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", cp_comm_type="p2p"
        )


def test_builder_uses_sdpa_in_the_local_spec():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from sdzero_mcore.models.builder import layer_spec_for
    from sdzero_mcore.models.hf_config import ModelArch
    from sdzero_mcore.models.tiny import tiny_hf_config

    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM").to_dict())
    core = lambda spec: spec.submodules.self_attention.submodules.core_attention  # noqa: E731
    assert core(layer_spec_for(arch, "local")) is SDPACoreAttention
    assert core(layer_spec_for(arch, "local", local_attention="unfused")) is DotProductAttention
    with pytest.raises(ValueError, match="local_attention must be one of sdpa, unfused"):
        layer_spec_for(arch, "local", local_attention="flash")


def test_cp_comm_type_reaches_the_transformer_config():
    from sdzero_mcore.models.builder import transformer_config_for
    from sdzero_mcore.models.hf_config import ModelArch
    from sdzero_mcore.models.tiny import tiny_hf_config

    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM").to_dict())
    assert transformer_config_for(arch, context_parallel_size=2, cp_comm_type="a2a").cp_comm_type == "a2a"
    assert transformer_config_for(arch, context_parallel_size=1, cp_comm_type="a2a").cp_comm_type is None
    with pytest.raises(ValueError, match="cp_comm_type must be one of p2p, all_gather, a2a, a2a\\+p2p"):
        transformer_config_for(arch, context_parallel_size=2, cp_comm_type="ring")
