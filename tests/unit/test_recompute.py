"""model.recompute: megatron-core's selective and full activation recompute give the loss and
gradients of no recompute, while the forward keeps fewer activations for the backward."""

import pytest
import torch
from megatron.core import tensor_parallel

from sdzero_mcore.config import ConfigError, load_config
from sdzero_mcore.models.builder import build_gpt_model, transformer_config_for
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import tiny_hf_config

LAYERS = 4
BATCH, SEQ = 2, 32


def _arch() -> ModelArch:
    return ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", num_hidden_layers=LAYERS).to_dict())


def _run(model) -> dict:
    """Loss, every gradient, the bytes of activations the forward saved for the backward (tensors
    that are not parameters), and how often megatron-core's checkpoint function ran."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, 1000, (BATCH, SEQ), generator=g)
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(ids, torch.arange(SEQ).expand(BATCH, -1), None, labels=labels).mean()
    forward_saved = sum(saved)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "saved_bytes": forward_saved}


@pytest.fixture(scope="module")
def runs(megatron_single_rank):
    arch = _arch()
    calls = []
    original = tensor_parallel.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    reference = None
    out = {}
    settings = {"none": {}, "selective": {"recompute": "selective"}, "full": {"recompute": "full"},
                "full_block": {"recompute": "full", "recompute_method": "block", "recompute_num_layers": 2},
                "full_uniform_2": {"recompute": "full", "recompute_num_layers": 2}}
    tensor_parallel.checkpoint = counting_checkpoint  # transformer_block and attention call it through the module
    try:
        for name, kwargs in settings.items():
            model = build_gpt_model(arch, transformer_impl="local", on_cpu=True, **kwargs)
            if reference is None:
                reference = model.state_dict()
            else:
                model.load_state_dict(reference)
            calls.clear()
            out[name] = _run(model)
            out[name]["checkpoint_calls"] = len(calls)
    finally:
        tensor_parallel.checkpoint = original
    return out


@pytest.mark.parametrize("mode", ["selective", "full", "full_block", "full_uniform_2"])
def test_same_loss_and_gradients_as_no_recompute(runs, mode):
    none, other = runs["none"], runs[mode]
    assert torch.equal(other["loss"], none["loss"])
    for name, grad in none["grads"].items():
        assert torch.equal(other["grads"][name], grad), name


def test_recompute_is_active(runs):
    saved = {mode: run["saved_bytes"] for mode, run in runs.items()}
    calls = {mode: run["checkpoint_calls"] for mode, run in runs.items()}
    print("activation bytes saved by the forward:", saved, "checkpoint calls:", calls)
    # one checkpoint per layer's core attention (selective) or per layer (full, uniform, 1 layer each);
    # uniform over 2 layers: chunks [0, 1] and [2, 3]; block: the first 2 layers
    assert calls == {"none": 0, "selective": LAYERS, "full": LAYERS, "full_block": 2, "full_uniform_2": 2}
    assert saved["full_uniform_2"] < saved["full"] < saved["full_block"] < saved["selective"] < saved["none"]
    assert saved["full"] < 0.25 * saved["none"]  # full keeps each layer's input only


def test_transformer_config_fields():
    arch = _arch()
    none = transformer_config_for(arch)
    assert none.recompute_granularity is None
    assert transformer_config_for(arch, recompute="selective").recompute_modules == ["core_attn"]
    full = transformer_config_for(arch, recompute="full", recompute_method="block", recompute_num_layers=2)
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "block", 2)
    with pytest.raises(ValueError, match="recompute_num_layers must be between 1 and the model's 4 layers"):
        transformer_config_for(arch, recompute="full", recompute_num_layers=5)
    with pytest.raises(ValueError, match=r"recompute_num_layers \(3\) must divide the model's 4 layers"):
        transformer_config_for(arch, recompute="full", recompute_num_layers=3)
    with pytest.raises(ValueError, match="recompute must be one of none, selective, full"):
        transformer_config_for(arch, recompute="partial")


def test_config_keys():
    cfg = load_config(None, ["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"])
    assert (cfg.model.recompute, cfg.model.recompute_method, cfg.model.recompute_num_layers) == ("full", "block", 2)
    assert load_config().model.recompute == "none"
    with pytest.raises(ConfigError, match="model.recompute: 'partial' is not one of: none, selective, full"):
        load_config(None, ["model.recompute=partial"])
    with pytest.raises(ConfigError, match="'model.recompute_activations' was replaced by model.recompute"):
        load_config(None, ["model.recompute_activations=true"])
