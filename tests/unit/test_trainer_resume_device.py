"""A checkpoint's optimizer and RNG state load onto the host, whatever device wrote them: a GPU run's
file holds CUDA tensors, which an unmapped ``torch.load`` would put back on the device that saved them
(a second copy beside the optimizer's own, or a crash where that device is not there)."""

import pytest
import torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

from sdzero_mcore.checkpoint.loading import build_model_from_hf
from sdzero_mcore.config import OptimizerConfig
from sdzero_mcore.losses.masked import masked_token_sum
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.trainer import Trainer

VOCAB = 300


def _ce_step(model, batch):
    ids, labels = batch
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    per_token = model(ids, positions, None, labels=labels)
    return per_token, lambda out: (*masked_token_sum(out, torch.ones_like(out, dtype=torch.bool)), {})


def _trainer(hf_dir, run_dir):
    model = build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local", on_cpu=True)
    return Trainer(model, OptimizerConfig(lr=1e-3), total_steps=2, run_dir=run_dir, phase="device", hf_files_dir=hf_dir)


def _checkpoint_after_one_step(tmp_path):
    """(hf dir, the trainer, its checkpoint) after one optimizer step on random tokens."""
    hf_dir = save_tiny_hf_model(tmp_path / "hf", vocab_size=VOCAB)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, VOCAB, (2, 8), generator=generator), torch.randint(0, VOCAB, (2, 8), generator=generator))
    trainer = _trainer(hf_dir, tmp_path / "run")
    trainer.train_step([batch], _ce_step)
    return hf_dir, trainer, trainer.save_checkpoint()


def test_a_train_state_written_on_a_gpu_loads_on_the_host(megatron_single_rank, tmp_path, monkeypatch):
    hf_dir, trainer, ckpt = _checkpoint_after_one_step(tmp_path)
    saved_optimizer = trainer.optimizer.state_dict()

    # Rewrite the trainer's own files as a GPU run writes them: every storage tagged cuda:0.
    trainer_files = [path for path in ckpt.glob("*.pt") if path.name != COMMON_STATE_FNAME]
    assert trainer_files
    for path in trainer_files:
        state = torch.load(path, map_location="cpu", weights_only=False)
        with monkeypatch.context() as patch:
            patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
            torch.save(state, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # the files now hold CUDA tensors
            torch.load(trainer_files[0], weights_only=False)

    resumed = _trainer(hf_dir, tmp_path / "run")
    resumed.load_checkpoint(ckpt)
    assert resumed.state.step == 1
    loaded_optimizer = resumed.optimizer.state_dict()
    assert loaded_optimizer["state"].keys() == saved_optimizer["state"].keys()
    for index, state in saved_optimizer["state"].items():
        for key, value in state.items():
            assert loaded_optimizer["state"][index][key].device == value.device
            assert torch.equal(loaded_optimizer["state"][index][key], value), (index, key)
    resumed.close()
    trainer.close()


def test_a_checkpoint_in_the_earlier_one_file_per_rank_layout_still_resumes(megatron_single_rank, tmp_path):
    """Checkpoints written before the optimizer file went per model-parallel rank hold optimizer,
    masters, scheduler and RNG in one train_state_rank<N>.pt: they resume to the same state."""
    hf_dir, trainer, ckpt = _checkpoint_after_one_step(tmp_path)
    saved_optimizer = trainer.optimizer.state_dict()

    (optimizer_file,) = ckpt.glob("optimizer_tp*_pp*.pt")
    (rng_file,) = ckpt.glob("rng_state_rank*.pt")
    legacy = torch.load(optimizer_file, weights_only=False) | torch.load(rng_file, weights_only=False)
    torch.save(legacy, ckpt / "train_state_rank00000.pt")
    optimizer_file.unlink()
    rng_file.unlink()

    resumed = _trainer(hf_dir, tmp_path / "run")
    resumed.load_checkpoint(ckpt)
    assert resumed.state.step == 1
    loaded_optimizer = resumed.optimizer.state_dict()
    for index, state in saved_optimizer["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded_optimizer["state"][index][key], value), (index, key)
    resumed.close()
    trainer.close()
