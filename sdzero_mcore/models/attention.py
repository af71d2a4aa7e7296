"""Core attention for megatron-core's local layer spec: fused SDPA, with all-gather context parallelism.

megatron-core's local ``DotProductAttention`` materialises the [b, h, s, s] score matrix and
refuses CP > 1; only TransformerEngine's attention does CP. :class:`SDPACoreAttention` is a drop-in
``core_attention`` submodule (same constructor and forward as ``DotProductAttention``) that calls
``torch.nn.functional.scaled_dot_product_attention``: flash or memory-efficient kernels on a GPU,
the math kernel on CPU.

Context parallelism uses the all-gather scheme (as in Llama 3's training): each CP rank holds
sequence chunks ``r`` and ``2*CP - 1 - r`` of q, k and v; K and V are all-gathered over the CP
group and put back in sequence order, and each local query chunk attends to the keys up to and
including its own chunk with a lower-right-aligned causal mask. The backward of the all-gather is
a reduce-scatter, so each rank receives the sum of dK and dV over every query that used its keys.

Sliding-window attention follows megatron-core's configuration: ``config.window_size = (left, 0)``
on the layers ``config.window_attn_skip_freq`` marks (all layers when it is None); a query attends
the keys at distance 0..left behind it. Under CP each query chunk reads only the gathered keys its
window reaches.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from torch.nn.attention.bias import causal_lower_right

from sdzero_mcore.parallel.context_parallel import cp_chunk_ids, sequence_chunk_order

# torch >= 2.8 names it reduce_scatter_single; older releases only have reduce_scatter_tensor.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group; backward reduce-scatters the gradient (sums over ranks)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


@functools.lru_cache(maxsize=None)
def cp_chunk_order_index(cp_size: int, device: torch.device) -> torch.Tensor:
    """:func:`sequence_chunk_order` as an index tensor on ``device``, built once: made from a Python
    list at each use, it would be a host-to-device copy twice per layer per forward."""
    return torch.tensor(sequence_chunk_order(cp_size), device=device)


def sliding_window_causal_mask(
    q_start: int, q_len: int, k_start: int, k_len: int, window_left: int, device: torch.device
) -> torch.Tensor:
    """[q_len, k_len] bool, True where the query at position q_start + i may attend the key at
    k_start + j: the key is not ahead of it and at most ``window_left`` positions behind."""
    q_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + k_len, device=device)[None, :]
    distance = q_pos - k_pos
    return (distance >= 0) & (distance <= window_left)


def gather_sequence_over_cp(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[s_local, ...] on each CP rank -> [s_local * CP, ...] in sequence order (autograd-aware)."""
    cp_size = dist.get_world_size(group)
    gathered = _AllGatherSequence.apply(local, group)
    chunk = local.shape[0] // 2
    chunks = gathered.view(2 * cp_size, chunk, *local.shape[1:])
    order = cp_chunk_order_index(cp_size, local.device)
    return chunks.index_select(0, order).reshape(2 * cp_size * chunk, *local.shape[1:])


class SDPACoreAttention(MegatronModule):
    """``core_attention`` for megatron-core layer specs, backed by ``scaled_dot_product_attention``.

    Inputs are megatron's [s, b, heads, head_dim] query and [s, b, groups, head_dim] key/value
    (GQA when groups < heads); the output is [s, b, heads * head_dim]. Masking follows
    ``DotProductAttention``: a given ``attention_mask`` (bool, True = masked out) is used as is;
    without one, a causal ``attn_mask_type`` means the causal mask. Under CP only the causal mask
    over padded-right sequences is supported (what GPT training uses). On a sliding-window layer the
    window is applied on top of either (it needs the causal mask type).
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPACoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        # Keys at distance 0..window_left behind the query; None = no window on this layer.
        self.window_left: Optional[int] = None
        window_size = getattr(config, "window_size", None)
        if is_layer_window_attention(window_size, getattr(config, "window_attn_skip_freq", None), self.layer_number):
            left, right = window_size
            if right != 0:
                raise ValueError(
                    f"SDPACoreAttention supports causal sliding windows only: config.window_size={window_size} "
                    "must look 0 positions ahead"
                )
            self.window_left = None if left < 0 else left
        if cp_comm_type not in (None, "all_gather"):
            raise ValueError(
                f"SDPACoreAttention implements cp_comm_type='all_gather' only, got {cp_comm_type!r}; "
                "TransformerEngine's attention has the other schemes"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        # apply_query_key_layer_scaling needs no counterpart: DotProductAttention divides the scores
        # by layer_number and multiplies them back inside its fp32 softmax, so only this scale remains.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _dropout_p(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _sdpa(self, query, key, value, attn_mask=None, is_causal=False):
        """[b, h, sq, d] x [b, g, sk, d] -> [b, h, sq, d], in megatron's RNG stream for dropout."""
        kwargs = dict(
            attn_mask=attn_mask,
            dropout_p=self._dropout_p(),
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        if kwargs["dropout_p"] > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(query, key, value, **kwargs)
        return F.scaled_dot_product_attention(query, key, value, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("SDPACoreAttention does not support packed sequences (packed_seq_params)")
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        if query.shape[2] % key.shape[2]:
            raise ValueError(f"query heads ({query.shape[2]}) must be a multiple of key/value groups ({key.shape[2]})")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        cp_size = dist.get_world_size(self.cp_group) if self.cp_group is not None else 1
        if self.window_left is not None and not causal:
            raise ValueError(f"a sliding-window layer needs the causal attn_mask_type, got {mask_type}")

        # [s, b, h, d] -> [b, h, s, d]; a permuted view, the head dim stays contiguous.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = query.shape[0], key.shape[0]
        window = None
        if self.window_left is not None and cp_size == 1:  # lower-right aligned, as the causal mask
            window = sliding_window_causal_mask(sk - sq, sq, 0, sk, self.window_left, query.device)
        if cp_size > 1:
            if attention_mask is not None or not causal:
                raise ValueError(
                    "context parallelism with SDPACoreAttention needs the causal mask and no "
                    f"attention_mask (got attn_mask_type={mask_type}, attention_mask "
                    f"{'set' if attention_mask is not None else 'None'})"
                )
            out = self._cp_causal_attention(q, key, value, cp_size)
        elif attention_mask is not None:
            allowed = ~attention_mask.bool()
            out = self._sdpa(q, k, v, attn_mask=allowed if window is None else allowed & window)
        elif window is not None:
            out = self._sdpa(q, k, v, attn_mask=window)
        else:
            out = self._sdpa(q, k, v, is_causal=causal)
        return out.permute(2, 0, 1, 3).reshape(sq, query.shape[1], -1)

    def _cp_causal_attention(self, q, key, value, cp_size: int) -> torch.Tensor:
        local_len = key.shape[0]
        if local_len % 2:
            raise ValueError(f"a CP rank's sequence holds two equal chunks; got local length {local_len}")
        chunk = local_len // 2
        full_k = gather_sequence_over_cp(key, self.cp_group).permute(1, 2, 0, 3)
        full_v = gather_sequence_over_cp(value, self.cp_group).permute(1, 2, 0, 3)
        outputs = []
        for half, chunk_id in enumerate(cp_chunk_ids(cp_size, dist.get_rank(self.cp_group))):
            q_chunk = q[:, :, half * chunk : (half + 1) * chunk]
            q_start, visible = chunk_id * chunk, (chunk_id + 1) * chunk  # keys up to the end of this chunk
            if self.window_left is None:
                k_start, mask = 0, causal_lower_right(chunk, visible)
            else:  # only the keys the chunk's windows reach
                k_start = max(0, q_start - self.window_left)
                mask = sliding_window_causal_mask(q_start, chunk, k_start, visible - k_start, self.window_left, q.device)
            k_part, v_part = full_k[:, :, k_start:visible], full_v[:, :, k_start:visible]
            outputs.append(self._sdpa(q_chunk, k_part, v_part, attn_mask=mask))
        return torch.cat(outputs, dim=2)
