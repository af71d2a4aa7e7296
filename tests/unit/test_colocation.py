"""The trainer's state in host memory while a colocated engine generates: the round trip frees the
device storage and brings the optimizer state and fp32 masters back bit for bit, so that training
goes on exactly as without it."""

import pytest
import torch

from sdzero_mcore.checkpoint.loading import build_model_from_hf
from sdzero_mcore.config import load_config
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.rollout import colocation
from sdzero_mcore.rollout.colocation import TrainStateOffload, engine_turn
from sdzero_mcore.trainer import Trainer

BATCH, SEQ = 2, 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("colocation") / "hf", vocab_size=128)


def _trainer(hf_dir, run_dir, dtype=torch.bfloat16, distributed=False) -> Trainer:
    # bfloat16 weights: the trainer keeps fp32 master copies, which the offload must carry too
    model = build_model_from_hf(hf_dir, params_dtype=dtype, transformer_impl="local")
    overrides = ["distill.optimizer.lr=1e-2", f"distill.optimizer.distributed={str(distributed).lower()}"]
    optimizer = load_config(overrides=overrides).distill.optimizer
    return Trainer(model, optimizer, total_steps=3, run_dir=run_dir, phase="colocation", hf_files_dir=hf_dir)


def _step(trainer: Trainer, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)

    def forward_step(model, _):
        logits = model(ids, positions, None)
        return logits, lambda out: (out.float().logsumexp(-1).sum() - out.float()[..., 0].sum(), torch.tensor(BATCH * SEQ), {})

    return trainer.train_step([0], forward_step)


def _state(trainer: Trainer) -> dict:
    tensors = {f"optimizer.{i}.{k}": v for i, state in enumerate(trainer.optimizer.state.values())
               for k, v in state.items()}
    # fp32 masters of 16-bit weights (an fp32 weight is its own master, and the model's weights stay)
    tensors.update({f"master.{n}": m for n, m in trainer.masters.items() if m is not trainer._params[n]})
    return tensors


def test_distributed_optimizer_state_round_trip(megatron_single_rank, hf_dir, tmp_path):
    """optimizer.distributed: megatron-core's optimizer state and fp32 master slices go to the host and back."""
    trainer = _trainer(hf_dir, tmp_path / "d", distributed=True)
    _step(trainer, seed=1)
    masters = [m for group in trainer.optimizer.chained_optimizers[0].shard_fp32_from_float16_groups for m in group]
    before = [(tensor, tensor.clone()) for tensor in trainer.optimizer_state_tensors() if tensor.numel() > 0]
    assert masters and all(any(m is tensor for tensor, _ in before) for m in masters)
    offload = TrainStateOffload(trainer)
    offload.offload()
    assert all(tensor.untyped_storage().nbytes() == 0 for tensor, _ in before)
    offload.restore()
    assert all(torch.equal(tensor, copy) for tensor, copy in before)
    assert torch.isfinite(torch.tensor(_step(trainer, seed=2)["loss"]))


def test_offload_round_trip_is_bit_identical_and_training_goes_on_alike(megatron_single_rank, hf_dir, tmp_path):
    offloaded, reference = _trainer(hf_dir, tmp_path / "a"), _trainer(hf_dir, tmp_path / "b")
    for trainer in (offloaded, reference):
        _step(trainer, seed=1)  # the optimizer state exists after a step
    before = {name: (tensor, tensor.clone()) for name, tensor in _state(offloaded).items()}
    assert any(name.startswith("optimizer.") for name in before) and any(name.startswith("master.") for name in before)

    offload = TrainStateOffload(offloaded)
    offload.offload()
    assert offload.offloaded
    for name, (tensor, _) in before.items():
        assert tensor.untyped_storage().nbytes() == 0, f"{name} still holds its memory"
    for buffer in offloaded.ddp.buffers:
        assert buffer.grad_data.untyped_storage().nbytes() == 0
    offload.offload()  # already offloaded: nothing more

    offload.restore()
    assert not offload.offloaded
    after = _state(offloaded)
    assert after.keys() == before.keys()
    for name, (tensor, copy) in before.items():
        assert after[name] is tensor, f"{name} is a new tensor: the optimizer would not see it"
        assert torch.equal(tensor, copy), name
    for buffer in offloaded.ddp.buffers:
        assert buffer.grad_data.untyped_storage().nbytes() == buffer.grad_data.numel() * buffer.grad_data.element_size()

    # the next step is the step the trainer would have made without the round trip, bit for bit
    metrics = _step(offloaded, seed=2), _step(reference, seed=2)
    assert metrics[0]["loss"] == metrics[1]["loss"] and metrics[0]["grad_norm"] == metrics[1]["grad_norm"]
    for (name, p), (_, q) in zip(offloaded.model.named_parameters(), reference.model.named_parameters()):
        assert torch.equal(p, q), name

    # a second round trip reuses the host buffers
    offload.offload()
    offload.restore()
    assert all(torch.equal(t, _state(reference)[n]) for n, t in _state(offloaded).items())


def _grad_buffer_bytes(trainer: Trainer) -> list[int]:
    return [buffer.grad_data.untyped_storage().nbytes() for buffer in trainer.ddp.buffers]


def test_gradient_buffers_come_back_when_nothing_else_was_offloaded(megatron_single_rank, hf_dir, tmp_path):
    """fp32 weights (their own masters) before the first step (no optimizer state yet): as the engine
    starts, only the gradient buffers leave, and they must come back."""
    trainer = _trainer(hf_dir, tmp_path, dtype=torch.float32)
    full = _grad_buffer_bytes(trainer)
    offload = TrainStateOffload(trainer)
    offload.offload()
    assert _grad_buffer_bytes(trainer) == [0] * len(full)
    offload.restore()
    assert _grad_buffer_bytes(trainer) == full
    assert _step(trainer, seed=1)["num_tokens"] == BATCH * SEQ


class RecordingEngine:
    def __init__(self, events: list):
        self.events = events

    def wake(self):
        self.events.append("wake")

    def sleep(self):
        self.events.append("sleep")


def test_engine_turn_frees_the_trainers_memory_before_the_engine_wakes(megatron_single_rank, hf_dir, tmp_path,
                                                                         monkeypatch):
    events = []
    monkeypatch.setattr(colocation, "release_cached_blocks", lambda: events.append("release cached blocks"))
    offload = TrainStateOffload(_trainer(hf_dir, tmp_path))
    for method in ("offload", "restore"):
        original = getattr(offload, method)
        monkeypatch.setattr(offload, method, lambda original=original, method=method: (events.append(method), original()))
    with engine_turn(RecordingEngine(events), offload):
        events.append("generate")
    assert events == ["offload", "release cached blocks", "wake", "generate", "sleep", "restore"]
    events.clear()
    with pytest.raises(RuntimeError, match="generation failed"), engine_turn(None, offload):  # a rank without the engine
        raise RuntimeError("generation failed")
    assert events == ["offload", "release cached blocks", "restore"]  # restored also when the turn fails
