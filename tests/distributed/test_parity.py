"""HF -> megatron-core parity: logits, gradients, checkpoints and resharding, at TP = 1, 2 and 4 (gloo ranks).

Every supported architecture, Olmo-3 included (its tiny config has a sliding-window layer whose
window, 5, is shorter than the 24-token test sequence, a full-attention layer with YaRN, and
another RoPE base on the sliding layer)."""

import pytest
import torch
from helpers import ARCHITECTURES, VOCAB, hf_reference, parity_worker
from safetensors.torch import load_file

from sdzero_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf
from sdzero_mcore.checkpoint.mcore_io import read_checkpoint_meta
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers

LOGITS_TOL = 1e-4  # float32, max abs diff (the bound)
GRAD_TOL = 1e-5  # float32, max abs diff relative to the gradient's scale


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module", params=ARCHITECTURES)
def converted(request, tmp_path_factory):
    """A tiny HF model, its transformers reference run, its TP=2 conversion and megatron runs at TP 2 and 1."""
    root = tmp_path_factory.mktemp(request.param)
    hf_dir = save_tiny_hf_model(root / "hf", request.param, vocab_size=VOCAB)
    reference = hf_reference(hf_dir)
    meta = hf_to_mcore(hf_dir, root / "mcore_tp2", tensor_parallel_size=2, progress=False)
    run_local_workers(parity_worker, 2, str(root / "mcore_tp2"), [2, 1], str(root / "runs.pt"))
    return {
        "arch": request.param,
        "root": root,
        "hf_dir": hf_dir,
        "meta": meta,
        "reference": reference,
        "runs": torch.load(root / "runs.pt"),
    }


@pytest.mark.parametrize("tp", [2, 1])
def test_logits_match_transformers(converted, tp):
    run, ref = converted["runs"][tp], converted["reference"]
    diff = (run["logits"] - ref["logits"]).abs().max().item()
    print(f"{converted['arch']} TP={tp} max |logits - transformers| = {diff:.3e}")
    assert diff < LOGITS_TOL
    assert torch.allclose(run["loss"], ref["loss"], atol=1e-5)


def test_padded_vocab_is_masked_and_tp_dependent(converted):
    runs = converted["runs"]
    # 1111 pads to a multiple of 128 x TP: 1152 at TP=1, 1280 at TP=2; the TP=2 checkpoint loads at both.
    assert runs[1]["padded_vocab_size"] == 1152 and runs[2]["padded_vocab_size"] == 1280
    assert converted["meta"]["padded_vocab_size"] == 1280
    for run in runs.values():
        assert run["padded_logits_max"].item() == torch.finfo(torch.float32).min


def test_tp2_gradients_equal_tp1(converted):
    tp1, tp2 = converted["runs"][1]["grads"], converted["runs"][2]["grads"]
    assert tp1.keys() == tp2.keys() and len(tp1) > 0
    worst = max(_max_rel(tp2[name], tp1[name]) for name in tp1)
    print(f"{converted['arch']} max relative |grad TP2 - grad TP1| = {worst:.3e}")
    assert worst < GRAD_TOL
    # and both are the gradients transformers computes, parameter by parameter
    ref = converted["reference"]["grads"]
    assert ref.keys() == tp1.keys()
    for name in ref:
        assert _max_rel(tp1[name], ref[name]) < 1e-4, name


def test_resharding_streams_exactly_the_hf_tensors(converted):
    """What the rollout engine receives from the model at TP = 2 and 1: the HF checkpoint's tensors."""
    original = load_file(str(converted["hf_dir"] / "model.safetensors"))
    for tp, run in converted["runs"].items():
        resharded = run["resharded"]
        assert resharded.keys() == original.keys(), tp
        for name, tensor in original.items():
            assert torch.equal(resharded[name], tensor), (tp, name)


def test_round_trip_is_bit_exact(converted, tmp_path):
    out = tmp_path / "hf_back"
    mcore_to_hf(converted["root"] / "mcore_tp2", out, progress=False)
    original = load_file(str(converted["hf_dir"] / "model.safetensors"))
    back = load_file(str(out / "model.safetensors"))
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_export_loads_in_transformers_with_tokenizer(converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf_back"
    mcore_to_hf(converted["root"] / "mcore_tp2", out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == converted["arch"]
    assert model.config.vocab_size == VOCAB
    assert tokenizer.decode(tokenizer("12+3=15").input_ids) == "12+3=15"


def test_tp4_conversion_loads_at_tp1(tmp_path):
    """Written at TP=4 (four ranks, vocab 1111 padded to 1536), read back at TP=1 and exported exactly."""
    hf_dir = save_tiny_hf_model(
        tmp_path / "hf", "Qwen3ForCausalLM", vocab_size=VOCAB, num_attention_heads=8, num_key_value_heads=4
    )
    reference = hf_reference(hf_dir)
    meta = hf_to_mcore(hf_dir, tmp_path / "mcore_tp4", tensor_parallel_size=4, progress=False)
    assert meta["tensor_parallel_size"] == 4 and meta["padded_vocab_size"] == 1536
    run_local_workers(parity_worker, 1, str(tmp_path / "mcore_tp4"), [1], str(tmp_path / "runs.pt"))
    run = torch.load(tmp_path / "runs.pt")[1]
    assert (run["logits"] - reference["logits"]).abs().max().item() < LOGITS_TOL
    mcore_to_hf(tmp_path / "mcore_tp4", tmp_path / "back", progress=False)
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back/model.safetensors"))
    assert all(torch.equal(back[name], original[name]) for name in original)
    assert read_checkpoint_meta(tmp_path / "mcore_tp4")["source"] == str(hf_dir.absolute())
