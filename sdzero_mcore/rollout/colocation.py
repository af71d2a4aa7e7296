"""Trainer and rollout engine taking turns on the same GPUs (docs/design.md "GPU memory of a colocated engine").

While the engine generates, the trainer needs none of its optimizer state, its fp32 master
weights or its gradient buffers: :class:`TrainStateOffload` moves them to host memory and back,
and :func:`engine_turn` orders a turn: offload, give the allocator's cached blocks back to the
device, wake the engine; afterwards put the engine to sleep and restore. The engine's KV cache is
then sized and used while the trainer holds only its bf16 model weights (and Phase 2's teacher).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from sdzero_mcore.parallel.pipeline import model_chunks


def release_cached_blocks() -> None:
    """Give the blocks PyTorch's caching allocator holds but nothing uses back to the device, so
    that another allocator (the engine's) can have them."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def offloads_train_state(rollout_cfg) -> bool:
    """``rollout.offload_train_state``; null: on where the engine shares the trainer's GPUs (a CUDA
    run whose engine is not a remote SGLang server)."""
    if rollout_cfg.offload_train_state is not None:
        return rollout_cfg.offload_train_state
    remote = rollout_cfg.backend == "sglang" and bool(rollout_cfg.sglang_url)
    return torch.cuda.is_available() and not remote


class TrainStateOffload:
    """A :class:`~sdzero_mcore.trainer.Trainer`'s optimizer state and fp32 master weights copied to
    host memory (pinned on a GPU, allocated once and reused) with their device storage freed, and
    its gradient buffers freed. :meth:`restore` brings the first two back bit for bit into the same
    tensor objects (the optimizer and the masters keep their identity) and zeroes the gradient
    buffers (every step starts by zeroing them). Both calls are no-ops when there is nothing to do."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.offloaded = False
        self._host: list[torch.Tensor] = []  # one buffer per kept tensor, in _kept_tensors() order
        self._offloaded: list[tuple[torch.Tensor, int]] = []  # (tensor, its storage's bytes) while offloaded

    def _kept_tensors(self) -> list[torch.Tensor]:
        """The tensors on the model's device whose values must survive: the optimizer state, and
        the masters that are copies (not the fp32 parameters themselves)."""
        trainer = self.trainer
        device = next(trainer.model.parameters()).device
        return [t for t in trainer.optimizer_state_tensors() if t.device == device and t.numel() > 0]

    def _host_buffer(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        # the optimizer's state tensors are replaced when a checkpoint loads: reuse only a match
        if index == len(self._host):
            self._host.append(None)
        host = self._host[index]
        if host is None or host.shape != tensor.shape or host.dtype != tensor.dtype:
            host = self._host[index] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                                                   pin_memory=torch.cuda.is_available())
        return host

    @torch.no_grad()
    def offload(self) -> None:
        if self.offloaded:
            return
        cuda = torch.cuda.is_available()
        kept = self._kept_tensors()
        for index, tensor in enumerate(kept):
            self._host_buffer(index, tensor).copy_(tensor, non_blocking=cuda)
        del self._host[len(kept):]
        if cuda:
            torch.cuda.synchronize()  # the copies have read the device storage before it is freed
        for tensor in kept:
            self._offloaded.append((tensor, tensor.untyped_storage().nbytes()))
            tensor.untyped_storage().resize_(0)
        for ddp in model_chunks(self.trainer.ddp):  # one DDP per model chunk with virtual pipeline stages
            ddp.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        self.offloaded = True

    @torch.no_grad()
    def restore(self) -> None:
        if not self.offloaded:
            return
        cuda = torch.cuda.is_available()
        for ddp in model_chunks(self.trainer.ddp):
            ddp.restore_grad_buffers(synchronize=False)
        for (tensor, nbytes), host in zip(self._offloaded, self._host):
            tensor.untyped_storage().resize_(nbytes)
            tensor.copy_(host, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        self._offloaded = []
        self.offloaded = False


@contextmanager
def engine_turn(engine, offload: Optional[TrainStateOffload] = None) -> Iterator[None]:
    """The GPU handed to ``engine`` (None on ranks without one) for the ``with`` block and back to
    the trainer after it: the trainer's state offloaded (on every rank: the engine's workers may sit
    on any of the node's GPUs) and the cached blocks released before the engine wakes."""
    if offload is not None:
        offload.offload()
    release_cached_blocks()
    if engine is not None:
        engine.wake()
    try:
        yield
    finally:
        if engine is not None:
            engine.sleep()
        if offload is not None:
            offload.restore()
