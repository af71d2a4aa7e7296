"""Argument checks, backend choice and tensor-parallel reductions shared by the kernels.

Nothing here imports the trainer: ``sdzero_kernels`` stands on torch and triton alone.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
KL_MODES = ("reverse", "forward", "mixed")
TAIL_MODES = ("renorm", "bucket")
MAX_K = 256
# Rows processed together by the PyTorch path: bounds its float32 temporaries to [ROW_CHUNK, V].
ROW_CHUNK = 1024
# Fused-linear ops (hidden states and the output weight in, no [T, V] logits): vocabulary columns
# computed together, so at most [T, VOCAB_CHUNK] logits are alive at once.
VOCAB_CHUNK = 8192


def use_triton(tensor: torch.Tensor) -> bool:
    """Triton on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1; PyTorch otherwise.

    ``SDZERO_KERNELS_BACKEND=torch|triton`` overrides the choice (the tests use it).
    """
    forced = os.environ.get("SDZERO_KERNELS_BACKEND", "auto")
    if forced not in ("auto", "torch", "triton"):
        raise ValueError(f"SDZERO_KERNELS_BACKEND must be auto, torch or triton; got {forced!r}")
    if forced != "auto":
        return forced == "triton"
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------
# Argument checks: ValueError naming the argument; nothing is silently clamped or cast away.


def check_logits(name: str, logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must be [T, V] or [..., V] with V >= 1, got shape {tuple(logits.shape)}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_temperature(temperature) -> float:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


def check_mixed_weight(mixed_weight) -> float:
    if not isinstance(mixed_weight, (int, float)) or not 0.0 <= mixed_weight <= 1.0:
        raise ValueError(f"mixed_weight must be in [0, 1], got {mixed_weight!r}")
    return float(mixed_weight)


def forward_weight(kl: str, mixed_weight: float) -> float:
    """Weight of KL(teacher || student) in the loss; reverse KL gets 1 minus it."""
    return {"reverse": 0.0, "forward": 1.0, "mixed": mixed_weight}[kl]


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"tensors must be on one device: {listed}")


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] as [T, V] with unit stride along V (a view whenever the layout allows)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits.reshape(-1, logits.shape[-1])


# ------------------------------------------------------------------------------------------
# Tensor parallelism: each rank holds the vocab shard [rank * V_local, (rank + 1) * V_local).


def tp_size_rank(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None:
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def combine_lse(row_max: torch.Tensor, row_sum: torch.Tensor, tp_group, *weighted: torch.Tensor):
    """Global log-sum-exp per row from per-shard (max, sum of exp(x - max)): a MAX then a SUM all-reduce.

    ``weighted`` are per-shard sums of exp(x - max) * f(x) for some f; they are rescaled and summed
    alongside, and returned divided by the global sum, i.e. as expectations of f under softmax(x).
    Returns (lse, *expectations).
    """
    if tp_size_rank(tp_group)[0] > 1:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
        # in the sums' dtype: float64 sums (the fused-linear ops) keep their precision
        factor = torch.where(torch.isneginf(row_max), 0.0, torch.exp((row_max - global_max).to(row_sum.dtype)))
        stacked = torch.stack([row_sum, *weighted]) * factor
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=tp_group)
        row_max, row_sum, weighted = global_max, stacked[0], tuple(stacked[1:])
    return (row_max + torch.log(row_sum), *(w / row_sum for w in weighted))


def all_reduce_max(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    if tp_size_rank(tp_group)[0] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=tp_group)
    return tensor


def gather_student_logits(
    student: torch.Tensor, teacher_ids: torch.Tensor, tp_group, inv_temp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits / temperature at the teacher's global ids, complete on every TP rank.

    Returns (z [T, K] float32, local column of each id (clamped), whether this rank owns it).
    """
    tp_size, tp_rank = tp_size_rank(tp_group)
    local_vocab = student.shape[-1]
    local_ids = teacher_ids - tp_rank * local_vocab
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    local_ids = local_ids.clamp(0, local_vocab - 1)
    z = torch.gather(student, 1, local_ids).float() * inv_temp
    z = z.masked_fill(~owned, float("-inf"))
    return all_reduce_max(z, tp_group), local_ids, owned


def check_teacher_topk_inputs(student: torch.Tensor, teacher_logprobs, teacher_ids, tp_group) -> None:
    """Shapes, dtypes, devices and the id range (checked on the device: no host sync per call)."""
    check_topk_targets(
        "student_logits", student, tuple(student.shape[:-1]), student.shape[-1], teacher_logprobs, teacher_ids, tp_group
    )


def check_topk_targets(
    name: str, student: torch.Tensor, lead: tuple, local_vocab: int, teacher_logprobs, teacher_ids, tp_group
) -> None:
    """The teacher's top-K [*lead, K] against a student input ``name`` (its leading shape ``lead``,
    ``local_vocab`` ids on this TP rank)."""
    for arg, value in (("teacher_logprobs", teacher_logprobs), ("teacher_ids", teacher_ids)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    if tuple(teacher_logprobs.shape[:-1]) != lead or teacher_logprobs.dim() != len(lead) + 1:
        raise ValueError(
            f"teacher_logprobs must be [..., K] matching {name} {tuple(student.shape)}; "
            f"got {tuple(teacher_logprobs.shape)}"
        )
    if tuple(teacher_ids.shape) != tuple(teacher_logprobs.shape):
        raise ValueError(
            f"teacher_ids must have the shape of teacher_logprobs {tuple(teacher_logprobs.shape)}; "
            f"got {tuple(teacher_ids.shape)}"
        )
    if not teacher_logprobs.is_floating_point():
        raise ValueError(f"teacher_logprobs must be a floating tensor, got {teacher_logprobs.dtype}")
    if teacher_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_ids must be int64 or int32, got {teacher_ids.dtype}")
    k = teacher_ids.shape[-1]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"teacher_ids must hold 1..{MAX_K} ids per token, got K={k}")
    check_same_device(**{name: student, "teacher_logprobs": teacher_logprobs, "teacher_ids": teacher_ids})
    vocab = local_vocab * tp_size_rank(tp_group)[0]
    if k > vocab:
        raise ValueError(f"teacher_ids has K={k} ids per token, more than the vocabulary size {vocab}")
    if teacher_ids.numel():
        in_range = ((teacher_ids >= 0) & (teacher_ids < vocab)).all()
        try:
            # on a GPU the device checks the flag: reading it here would wait for all queued work at
            # every call; a bad id fails at the step's next sync instead (on the CPU: right here)
            torch._assert_async(in_range, f"teacher_ids must lie in [0, {vocab})")
        except RuntimeError:
            low, high = teacher_ids.min().item(), teacher_ids.max().item()
            raise ValueError(f"teacher_ids must lie in [0, {vocab}); found ids in [{low}, {high}]") from None


# ------------------------------------------------------------------------------------------
# Fused-linear ops: the output layer applied chunk by chunk, inside the loss


def check_hidden_and_weight(hidden, weight, hidden_name: str = "hidden", weight_name: str = "weight") -> None:
    """hidden [T, H] and this rank's output-weight shard [V_local, H], one floating dtype, one device."""
    for name, value in ((hidden_name, hidden), (weight_name, weight)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name} must be bfloat16, float16 or float32, got {value.dtype}")
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name} {tuple(hidden.shape)} and {weight_name} {tuple(weight.shape)} must share the hidden size (last dim)"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have one dtype")
    check_same_device(**{hidden_name: hidden, weight_name: weight})


def check_fused_topk_loss_args(hidden, weight, teacher_logprobs, teacher_ids, kl, mixed_weight, temperature,
                               tp_group) -> tuple[float, float]:
    """The checks of a fused-linear top-K loss's arguments; returns (forward-KL weight, 1 / temperature)."""
    check_hidden_and_weight(hidden, weight)
    check_choice("kl", kl, KL_MODES)
    mixed_weight = check_mixed_weight(mixed_weight)
    temperature = check_temperature(temperature)
    check_topk_targets("hidden", hidden, (hidden.shape[0],), weight.shape[0], teacher_logprobs, teacher_ids, tp_group)
    return forward_weight(kl, mixed_weight), 1.0 / temperature


def check_vocab_chunk(vocab_chunk) -> int:
    if not isinstance(vocab_chunk, int) or isinstance(vocab_chunk, bool) or vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be a positive int, got {vocab_chunk!r}")
    return vocab_chunk


def shard_vocab_rows(local_vocab: int, vocab_size: Optional[int], tp_group) -> tuple[int, int]:
    """(global id of this rank's first weight row, how many of its rows are real ids).

    The rows from ``vocab_size`` on are the padding megatron adds to the vocabulary; the dense path
    gives them the lowest logit (zero probability, zero gradient), so the fused ops skip them."""
    offset = tp_size_rank(tp_group)[1] * local_vocab
    if vocab_size is None:
        return offset, local_vocab
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    return offset, max(0, min(local_vocab, vocab_size - offset))


def vocab_chunks(real_rows: int, vocab_chunk: int):
    """(start, stop) of each chunk of this shard's real rows."""
    return [(start, min(real_rows, start + vocab_chunk)) for start in range(0, real_rows, vocab_chunk)]


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The logits of vocabulary rows [start, stop) at every row of ``hidden``, in the model's dtype,
    as the output layer computes them (one matmul, no bias)."""
    return hidden @ weight[start:stop].t()


def merge_max_sum(row_max, row_sum, chunk_max, chunk_sum, *weighted_pairs):
    """Fold one chunk's (max, sum of exp(x - max), weighted sums) into the running ones (online softmax).

    ``weighted_pairs`` are (running, chunk) pairs of sums of exp(x - max) * f, rescaled alongside.
    The rescaling factors are formed in the sums' dtype."""
    new_max = torch.maximum(row_max, chunk_max)
    shift = torch.where(torch.isneginf(new_max), 0.0, new_max)  # never forms inf - inf
    old_scale = torch.exp((row_max - shift).to(row_sum.dtype))
    chunk_scale = torch.exp((chunk_max - shift).to(row_sum.dtype))
    merged = tuple(run * old_scale + chunk * chunk_scale for run, chunk in weighted_pairs)
    return (new_max, row_sum * old_scale + chunk_sum * chunk_scale, *merged)


def row_max_sum(x: torch.Tensor, *weights: torch.Tensor):
    """Per row of ``x``: (max, sum of exp(x - max), sums of exp(x - max) * f for each f), the sums
    accumulated in float64: a float32 sum over ~1e5 ids carries relative errors of ~1e-7, which
    the top-K tail mass (1 - sum of K probabilities) and KL = E[z_s - z_t] - (L_s - L_t) amplify."""
    x_max = x.max(dim=1).values
    e = (x - torch.where(torch.isneginf(x_max), 0.0, x_max)[:, None]).exp_()  # in place: one temporary, not two
    return (
        x_max,
        e.sum(dim=1, dtype=torch.float64),
        *(torch.where(e > 0, e * f, 0.0).sum(dim=1, dtype=torch.float64) for f in weights),
    )


class OnlineSoftmax:
    """Per-row softmax statistics of logits streamed in vocabulary chunks: the running (max, sum of
    exp(x - max), sums of exp(x - max) * f for ``num_weighted`` functions f), the sums in float64
    (:func:`row_max_sum`), folded chunk by chunk (:func:`merge_max_sum`) and combined over TP at
    the end (:func:`combine_lse`)."""

    def __init__(self, num_rows: int, num_weighted: int, device, max_dtype: torch.dtype = torch.float32):
        self.row_max = torch.full((num_rows,), float("-inf"), dtype=max_dtype, device=device)
        self.row_sum = torch.zeros(num_rows, dtype=torch.float64, device=device)
        self.weighted = [torch.zeros(num_rows, dtype=torch.float64, device=device) for _ in range(num_weighted)]

    def add(self, x: torch.Tensor, *weights: torch.Tensor) -> None:
        """Fold one chunk's logits x [T, chunk] (and f(x) for each weighted sum) in."""
        chunk_max, chunk_sum, *chunk_weighted = row_max_sum(x, *weights)
        self.row_max, self.row_sum, *self.weighted = merge_max_sum(
            self.row_max, self.row_sum, chunk_max, chunk_sum, *zip(self.weighted, chunk_weighted))

    def combine(self, tp_group):
        """(log-sum-exp, *expectations of each f under the softmax) over the whole vocabulary."""
        return combine_lse(self.row_max, self.row_sum, tp_group, *self.weighted)


def fused_linear_grads(hidden: torch.Tensor, weight: torch.Tensor, chunks, chunk_grad, tp_group, *,
                       main_grad: Optional[torch.Tensor] = None, weight_grad_needed: bool = True):
    """The backward of a fused-linear op: for each vocabulary chunk (start, stop), the gradient of
    its logits ``chunk_grad(start, stop)`` [T, stop - start] (recomputed from h and W by the
    caller), then dh += g @ W_chunk and dW_chunk = g.T @ h; dh summed over the TP group, as the
    output layer's input gradient is. One chunk's gradient is alive at a time (a function's
    temporaries are freed when it returns). Returns (dh in h's dtype, dW; padding rows zero).

    ``main_grad`` (:func:`main_grad_of` the weight, captured in the forward): dW_chunk is added
    into it instead and dW is returned as None (gradient-accumulation fusion); so it is when
    ``weight_grad_needed`` is False (``ctx.needs_input_grad``), and then nothing is formed."""
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    fused = main_grad is not None and weight_grad_needed
    grad_weight = torch.zeros_like(weight) if weight_grad_needed and not fused else None  # padding rows keep zero
    for start, stop in chunks:
        grad = chunk_grad(start, stop).to(weight.dtype)
        grad_hidden += (grad @ weight[start:stop]).float()
        if fused:
            main_grad[start:stop] += grad.t() @ hidden
        elif grad_weight is not None:
            grad_weight[start:stop] = grad.t() @ hidden
        del grad
    all_reduce_sum(grad_hidden, tp_group)
    return grad_hidden.to(hidden.dtype), grad_weight


def all_reduce_sum(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    if tp_size_rank(tp_group)[0] > 1:
        dist.all_reduce(tensor, group=tp_group)
    return tensor


def local_teacher_ids(teacher_ids: torch.Tensor, local_vocab: int, tp_group):
    """The teacher's global ids as rows of this rank's weight shard: (row, clamped; whether owned)."""
    local_ids = teacher_ids - tp_size_rank(tp_group)[1] * local_vocab
    owned = (local_ids >= 0) & (local_ids < local_vocab)
    return local_ids.clamp(0, local_vocab - 1), owned


# ------------------------------------------------------------------------------------------
# Gradient-accumulation fusion (megatron-core DDP's ``main_grad``) and the chunked backward


def main_grad_of(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The gradient buffer megatron-core's DDP gives ``weight`` (``weight.main_grad``: a view of its
    contiguous fp32 buffer with ``grad_reduce_in_fp32``), or None (no DDP).

    A fused-linear op whose weight has one adds its weight gradient into it in the backward and
    returns no gradient (None) for the weight, instead of allocating a [V_local, H] gradient that
    DDP's post-accumulation hook would then add into the same buffer. Unlike megatron's own fused
    linear layers it does not set ``weight.grad_added_to_main_grad`` nor return a dummy [V, H]
    gradient: with a tied embedding the lookup's gradient still arrives as ``weight.grad``, and
    the hook adds ``weight.grad`` only while that flag is False. The autograd engine runs the
    hook with an undefined gradient too (``weight.grad`` stays None, nothing is added); DDP's
    ``overlap_grad_reduce=True`` asserts a gradient there, so that mode needs the unfused path
    (the trainer runs with it off)."""
    main_grad = getattr(weight, "main_grad", None)
    if isinstance(main_grad, torch.Tensor) and main_grad.shape == weight.shape:
        return main_grad
    return None
