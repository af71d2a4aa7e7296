"""Lets megatron-core (0.16.x) GPTModel run forward, backward and distributed checkpointing on CPU.

megatron-core assumes CUDA in a handful of places that are not about computation:

* ``torch.cuda.current_device()`` names the device for buffers it allocates (rotary frequencies,
  tensor-parallel gathers, checkpoint barriers); on a CPU-only machine the current device is the CPU.
* ``torch.cuda.synchronize()`` fences the distributed-checkpoint writer; with no CUDA stream there is
  nothing to wait for.
* The model-parallel RNG tracker keeps per-name *CUDA* generator states and forks them around
  tensor-parallel initialisation and dropout. On CPU the same bookkeeping is done on the CPU
  generator, so dropout masks still differ between tensor-parallel ranks and stay reproducible.
* The fused-softmax path builds its default causal mask with ``device="cuda"``.
* Under context parallelism, RoPE picks this rank's positions with an index tensor it pins and
  moves to CUDA; on CPU the same index is built in host memory.
* The pipeline schedules (``get_forward_backward_func()``) count the step's loss tokens in a
  tensor created with ``device="cuda"``; the schedules module sees a ``torch`` whose ``zeros``
  puts such a tensor on the CPU, and is otherwise torch itself.
* With tied embeddings at pipeline-parallel size > 1, the last stage's copy of the embedding is
  moved with ``weight.data.cuda()`` before the all-reduce that makes it equal to the first
  stage's (``LanguageModule.setup_embeddings_and_output_layer``); during that method only,
  ``Tensor.cuda()`` leaves a CPU tensor where it is.
* megatron-core's optimizers (used by the distributed optimizer, ``optimizer.distributed``) keep
  a few scalars (the unit loss scale, the multi-tensor applier's overflow flag, the gradient norm)
  in tensors created with ``device="cuda"``: their modules see the same ``torch``, whose
  ``tensor`` and ``zeros`` put them on the CPU; the norm of the local multi-tensor fallback
  (``megatron.core.utils.local_multi_tensor_l2_norm``) is replaced by the same computation without
  the device.
* The DistributedOptimizer sorts the parameters it shards by ``Tensor.type()`` and accepts only
  ``torch.cuda.{Float,BFloat16,Half}Tensor``; gradient clipping asserts that a gradient is a
  ``torch.cuda.FloatTensor``. While those two run (and only then), ``Tensor.type()`` of a CPU
  tensor answers with the CUDA name of its dtype.

:func:`apply_cpu_compat` installs these redirections only when CUDA is absent, once per process.
It never changes behaviour on a machine with a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types

import torch
from megatron.core.fusions import fused_softmax
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
from megatron.core.optimizer import clip_grads, distrib_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mcore_random

_lock = threading.Lock()
_applied = False


def apply_cpu_compat(force: bool = False) -> bool:
    """Install the CPU redirections if CUDA is unavailable (or ``force``). Returns whether they are on.

    Idempotent. ``force`` exists for tests that check the redirections themselves.
    """
    global _applied
    with _lock:
        if _applied:
            return True
        if torch.cuda.is_available() and not force:
            return False
        _redirect_torch_cuda()
        _install_cpu_rng_tracker()
        _redirect_default_causal_mask()
        _redirect_rope_cp_slicing()
        _redirect_schedule_token_counter()
        _redirect_tied_embedding_copy()
        _redirect_optimizer_scalars()
        _accept_cpu_tensors_in_optimizer()
        _applied = True
        return True


def _cpu_current_device() -> torch.device:
    return torch.device("cpu")


def _no_synchronize(device=None) -> None:  # noqa: ARG001 - signature of torch.cuda.synchronize
    return None


def _redirect_torch_cuda() -> None:
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = _no_synchronize


def _get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):  # noqa: ARG001
    # torch.get_rng_state already returns a copy.
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe=False):  # noqa: ARG001
    torch.set_rng_state(new_state)


def _install_cpu_rng_tracker() -> None:
    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """megatron-core's RNG tracker with the CPU generator in place of the CUDA one."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            # The CUDA tracker warns when the CPU generator moves inside a fork; here the CPU
            # generator *is* the forked stream, so that check does not apply.
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    mcore_random._get_cuda_rng_state = _get_cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    # initialize_rng_tracker looks the class up by this module-level name when it builds a tracker.
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mcore_random.initialize_rng_tracker(force_reset=True)


@functools.lru_cache(maxsize=32)
def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _redirect_default_causal_mask() -> None:
    fused_softmax.get_default_causal_mask = _cpu_causal_mask


def _cpu_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """megatron-core's get_pos_emb_on_this_cp_rank without pinned memory or CUDA: chunks r and 2CP-1-r."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    chunked = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1 :])
    chunked = chunked.index_select(seq_dim, index)
    return chunked.view(*chunked.shape[:seq_dim], -1, *chunked.shape[seq_dim + 2 :])


def _redirect_rope_cp_slicing() -> None:
    # rotary_pos_embedding imported the function by name, so both bindings are replaced.
    rope_utils.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _cpu_pos_emb_on_this_cp_rank


def _cpu_instead_of_cuda(device):
    return "cpu" if device is not None and torch.device(device).type == "cuda" else device


class _TorchOnCpu(types.ModuleType):
    """torch, except that ``zeros(..., device="cuda")`` and ``tensor(..., device="cuda")`` allocate
    on the CPU (the schedules' token counter, the optimizers' scalars)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs):
        return torch.zeros(*size, device=_cpu_instead_of_cuda(device), **kwargs)

    @staticmethod
    def tensor(data, *, device=None, **kwargs):
        return torch.tensor(data, device=_cpu_instead_of_cuda(device), **kwargs)


def _redirect_schedule_token_counter() -> None:
    schedules.torch = _TorchOnCpu("torch")


def _cpu_multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):  # noqa: ARG001
    """megatron-core's local_multi_tensor_l2_norm (the L2 norm of the per-tensor L2 norms, in fp32)
    with the result on the CPU."""
    l2 = [[torch.norm(tensor) for tensor in tensor_list] for tensor_list in tensor_lists]
    l2_reduced = torch.norm(torch.tensor(l2))
    return torch.tensor([float(l2_reduced)], dtype=torch.float), None


def _redirect_optimizer_scalars() -> None:
    mcore_optimizer.torch = _TorchOnCpu("torch")
    clip_grads.torch = _TorchOnCpu("torch")
    clip_grads.l2_norm_impl = _cpu_multi_tensor_l2_norm


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float16: "torch.cuda.HalfTensor",
}


@contextlib.contextmanager
def _cpu_tensors_typed_as_cuda():
    """Within the block, ``Tensor.type()`` (no arguments) of a CPU tensor of a floating dtype
    returns the CUDA type name; every other call is torch's own."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _typed_as_cuda(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cpu_tensors_typed_as_cuda():
            return fn(*args, **kwargs)

    return wrapper


def _accept_cpu_tensors_in_optimizer() -> None:
    optimizer_cls = distrib_optimizer.DistributedOptimizer
    optimizer_cls.__init__ = _typed_as_cuda(optimizer_cls.__init__)
    # optimizer.py imported the clipping function by name, so both bindings are replaced.
    clip = _typed_as_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    mcore_optimizer.clip_grad_by_total_norm_fp32 = clip


@contextlib.contextmanager
def _tensor_cuda_keeps_cpu_tensors():
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _redirect_tied_embedding_copy() -> None:
    original = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self) -> None:
        with _tensor_cuda_keeps_cpu_tensors():
            original(self)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
