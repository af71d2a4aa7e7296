"""Checkpoints load across layer specs: a model whose modules carry ``_extra_state`` (TransformerEngine's
attention saves its FP8 metadata as ``core_attention._extra_state``; the local spec's attention has
none) loads a checkpoint written without those keys, and the reverse; any other key mismatch fails."""

from pathlib import Path

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from sdzero_mcore.checkpoint import mcore_io
from sdzero_mcore.checkpoint.hf_io import CheckpointError, copy_non_weight_files
from sdzero_mcore.models import builder
from sdzero_mcore.models.attention import SDPACoreAttention
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.models.tiny import save_tiny_hf_model

ATTENTION_EXTRA_STATE = "decoder.layers.0.self_attention.core_attention._extra_state"


class CoreAttentionWithExtraState(SDPACoreAttention):
    """SDPA core attention that saves and restores module extra state, as TE's DotProductAttention does."""

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.restored_extra_state = state


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("extra_state") / "hf", vocab_size=300)


def _build(hf_dir: Path, *, extra_state: bool, seed: int):
    """A local-spec model of the tiny architecture; with ``extra_state`` its attention carries extra state."""
    torch.manual_seed(seed)
    attention = CoreAttentionWithExtraState if extra_state else SDPACoreAttention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "SDPACoreAttention", attention)
        return build_gpt_model(ModelArch.from_hf_dir(hf_dir), transformer_impl="local", on_cpu=True)


def _save(model, ckpt_dir: Path, hf_dir: Path, *, drop_key: str | None = None) -> Path:
    """A complete sdzero-mcore checkpoint of ``model``, optionally without the tensor ``drop_key``."""
    ckpt_dir.mkdir(parents=True)
    sharded = {name: value for name, value in model.sharded_state_dict().items() if name != drop_key}
    dist_checkpointing.save(sharded, str(ckpt_dir))
    copy_non_weight_files(hf_dir, ckpt_dir / mcore_io.HF_FILES_DIR)
    mcore_io.write_checkpoint_meta(
        ckpt_dir, model.hf_arch, tensor_parallel_size=1, padded_vocab_size=model.padded_vocab_size,
        params_dtype=torch.float32,
    )
    return ckpt_dir


def _assert_same_weights(loaded, saved) -> None:
    saved_params = dict(saved.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, saved_params[name]), name


def test_model_with_extra_state_loads_a_checkpoint_without_it(megatron_single_rank, hf_dir, tmp_path):
    plain = _build(hf_dir, extra_state=False, seed=1)
    assert not any(key.endswith("core_attention._extra_state") for key in plain.state_dict())
    ckpt = _save(plain, tmp_path / "plain", hf_dir)
    with_extra = _build(hf_dir, extra_state=True, seed=2)
    assert ATTENTION_EXTRA_STATE in with_extra.state_dict()
    mcore_io.load_model(with_extra, ckpt)
    _assert_same_weights(with_extra, plain)


def test_model_without_extra_state_loads_a_checkpoint_with_it(megatron_single_rank, hf_dir, tmp_path):
    with_extra = _build(hf_dir, extra_state=True, seed=3)
    ckpt = _save(with_extra, tmp_path / "with_extra", hf_dir)
    saved_keys = {saved.key for saved in load_sharded_metadata(str(ckpt)).values()}
    assert "decoder.layers.self_attention.core_attention._extra_state" in saved_keys
    plain = _build(hf_dir, extra_state=False, seed=4)
    mcore_io.load_model(plain, ckpt)
    _assert_same_weights(plain, with_extra)


def test_extra_state_in_both_is_restored(megatron_single_rank, hf_dir, tmp_path):
    ckpt = _save(_build(hf_dir, extra_state=True, seed=5), tmp_path / "with_extra", hf_dir)
    model = _build(hf_dir, extra_state=True, seed=6)
    mcore_io.load_model(model, ckpt)
    assert torch.equal(model.decoder.layers[0].self_attention.core_attention.restored_extra_state, torch.tensor([7.0]))


@pytest.mark.parametrize("extra_state", [False, True])
def test_a_weight_missing_from_the_checkpoint_still_fails(megatron_single_rank, hf_dir, tmp_path, extra_state):
    ckpt = _save(_build(hf_dir, extra_state=False, seed=7), tmp_path / "partial", hf_dir,
                 drop_key="decoder.final_layernorm.weight")
    model = _build(hf_dir, extra_state=extra_state, seed=8)
    with pytest.raises(CheckpointError, match="decoder.final_layernorm.weight"):
        mcore_io.load_model(model, ckpt)


def test_a_checkpoint_weight_the_model_does_not_load_fails(megatron_single_rank, hf_dir, tmp_path):
    ckpt = _save(_build(hf_dir, extra_state=False, seed=9), tmp_path / "full", hf_dir)
    model = _build(hf_dir, extra_state=False, seed=10)
    # a model that would silently leave the checkpoint's final norm unread
    sharded_state_dict = model.sharded_state_dict
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model, "sharded_state_dict", lambda: {
            name: value for name, value in sharded_state_dict().items() if name != "decoder.final_layernorm.weight"
        })
        with pytest.raises(CheckpointError, match="decoder.final_layernorm.weight"):
            mcore_io.load_model(model, ckpt)
