"""The model builder picks its norm implementation itself: megatron-core's import-time default for the
final norm is apex's FusedLayerNorm whenever apex is importable and TransformerEngine is not, and
FusedLayerNorm refuses RMSNorm, which every supported architecture uses."""

import pytest
import torch
from megatron.core.fusions.fused_layer_norm import FusedLayerNorm
from megatron.core.models import backends
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer import transformer_block
from megatron.core.transformer.identity_op import IdentityOp

from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import tiny_hf_config


@pytest.fixture
def apex_without_transformer_engine(monkeypatch):
    """megatron-core's module-level norm choices as its imports make them with apex installed and TE absent."""
    monkeypatch.setattr(transformer_block, "HAVE_TE", False)
    monkeypatch.setattr(transformer_block, "HAVE_APEX", True)
    monkeypatch.setattr(transformer_block, "LayerNormImpl", FusedLayerNorm)
    monkeypatch.setattr(gpt_layer_specs, "HAVE_APEX", True)
    monkeypatch.setattr(gpt_layer_specs, "LNImpl", FusedLayerNorm)
    monkeypatch.setattr(backends, "HAVE_APEX", True)
    monkeypatch.setattr(backends, "LNImpl", FusedLayerNorm)


def _norms(model) -> dict:
    """The norm modules by name; the spec's unused norm slots hold IdentityOp."""
    return {
        name: module
        for name, module in model.named_modules()
        if name.endswith("norm") and not isinstance(module, IdentityOp)
    }


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
def test_local_spec_norms_are_torch_rmsnorm_when_apex_is_importable(
    megatron_single_rank, apex_without_transformer_engine, architecture
):
    arch = ModelArch.from_hf_config(tiny_hf_config(architecture).to_dict())
    model = build_gpt_model(arch, transformer_impl="local", on_cpu=True)
    norms = _norms(model)
    expected = {"decoder.final_layernorm"} | {
        f"decoder.layers.{layer}.{name}"
        for layer in range(arch.num_layers)
        for name in ("input_layernorm", "pre_mlp_layernorm")
        + (("self_attention.q_layernorm", "self_attention.k_layernorm") if arch.qk_norm else ())
    }
    assert set(norms) == expected
    for name, norm in norms.items():
        assert type(norm) is torch.nn.RMSNorm, name
        assert norm.eps == arch.norm_eps, name
    assert not any(isinstance(module, FusedLayerNorm) for module in model.modules())
    # and the model runs
    ids = torch.randint(0, arch.vocab_size, (1, 6))
    logits = model(ids, torch.arange(6)[None], attention_mask=None)
    assert torch.isfinite(logits[..., : arch.vocab_size]).all()
