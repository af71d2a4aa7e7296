"""Olmo-3 (``Olmo3ForCausalLM``) as a megatron-core layer spec.

An Olmo-3 decoder layer differs from megatron-core's GPT layer in three places, each filled here
through the spec's own slots rather than by changing megatron-core:

* **Post-norms.** ``h = h + RMSNorm(attn(h))`` and ``h = h + RMSNorm(mlp(h))``: no norm before the
  attention or the MLP, one on each output before the residual add. megatron-core's layer has no
  post-norm slot, so the output projections carry it (:class:`RowParallelLinearWithPostNorm`, the
  pattern NeMo uses for Gemma 2): the row-parallel projection's all-reduced output is normalised
  before the layer adds it to the residual. The pre-norm slots hold ``IdentityOp``.
* **QK-norm over the full projection width.** One RMSNorm over all query heads together (and one
  over all key heads), before RoPE, where Qwen3 normalises each head on its own.
  :class:`FullWidthRMSNorm` fills the ``q_layernorm`` / ``k_layernorm`` slots; under tensor
  parallelism each rank holds its heads' slice of the weight, and the mean square spans every
  rank's heads through one all-reduce of the sum of squares.
* **RoPE per layer type.** Sliding-window and full-attention layers have their own RoPE parameters
  (YaRN on the full layers of the released models). :class:`Olmo3SelfAttention` rotates with its
  layer type's frequencies and applies YaRN's attention factor.

Sliding-window attention itself is megatron-core's configuration (``window_size`` and the per-layer
``window_attn_skip_freq`` pattern, see ``builder.transformer_config_for``), which
:class:`~sdzero_mcore.models.attention.SDPACoreAttention` implements, also under context
parallelism.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from sdzero_mcore.models.hf_config import ModelArch, RopeSpec


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group, forward and backward.

    Each rank uses the sum for its own heads only, so the gradient that reaches the sum on one rank
    is a partial one and the ranks' parts must be added (megatron's
    ``reduce_from_tensor_model_parallel_region`` passes the gradient through unchanged, which is
    right only when every rank goes on with the same computation).
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class FullWidthRMSNorm(MegatronModule):
    """RMSNorm over all ``num_heads`` heads of a q or k projection together (Olmo-3's QK-norm).

    Takes megatron's [s, b, local heads, head_dim] and returns the same shape. The weight is the
    TP rank's slice [local heads * head_dim] of the HF ``q_norm`` / ``k_norm`` weight (ranks hold
    consecutive heads, as ``linear_qkv`` does), so it is a tensor-parallel parameter: its gradient
    is complete on each rank and is not all-reduced. In float32, as transformers computes it.
    """

    def __init__(self, config, hidden_size: int, eps: float, *, num_heads: int):
        super().__init__(config=config)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        if num_heads % tp_size:
            raise ValueError(f"FullWidthRMSNorm: {num_heads} heads do not split over tensor-parallel size {tp_size}")
        self.head_dim = hidden_size
        self.full_width = num_heads * hidden_size
        self.eps = eps
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(
            torch.ones(num_heads // tp_size * hidden_size, dtype=config.params_dtype, device=device)
        )
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(*x.shape[:-2], -1).float()
        sum_sq = flat.square().sum(-1, keepdim=True)
        if dist.is_initialized() and dist.get_world_size(self.tp_group) > 1:
            sum_sq = _AllReduceSum.apply(sum_sq, self.tp_group)
        normed = flat * torch.rsqrt(sum_sq / self.full_width + self.eps)
        return (self.weight * normed).to(x.dtype).view_as(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> ShardedStateDict:
        """The weight split along its only axis, like ``linear_qkv``'s rows."""
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict,
            prefix,
            {"weight": 0},
            sharded_offsets,
            tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"],
        )


class RowParallelLinearWithPostNorm(RowParallelLinear):
    """A row-parallel output projection followed by RMSNorm (``post_layernorm``): Olmo-3's post-norm.

    The norm sees the projection's full output (all-reduced over TP), so its weight is replicated
    like every other norm's. The projection has no bias (``add_bias_linear=False``), so there is
    nothing to add before normalising.
    """

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool, **kwargs):
        if bias:
            raise ValueError("RowParallelLinearWithPostNorm has no bias slot before its norm (bias=True)")
        super().__init__(input_size, output_size, config=config, bias=bias, **kwargs)
        self.post_layernorm = WrappedTorchNorm(config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

    def forward(self, input_):
        output, bias = super().forward(input_)
        return self.post_layernorm(output), bias


class Olmo3SelfAttention(SelfAttention):
    """Self-attention with its layer type's RoPE (``rope``) and Olmo-3's full-width QK-norm.

    GPTModel computes one rotary embedding for every layer; a layer whose type has other RoPE
    parameters rotates with its own frequencies over the same positions instead (the lengths
    match: GPTModel's embedding holds this CP rank's share of the sequence). YaRN multiplies cos
    and sin by ``rope.attention_factor``; RoPE is linear, so scaling q and k by it before the
    rotation is the same and needs no change to megatron-core's rotation.
    """

    def __init__(self, config, submodules, layer_number: int, *, rope: RopeSpec, **kwargs):
        super().__init__(config, submodules, layer_number, **kwargs)
        self.attention_factor = rope.attention_factor
        self.layer_rotary_pos_emb = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_base=rope.theta,
            use_cpu_initialization=config.use_cpu_initialization,
            cp_group=self.pg_collection.cp,
        )
        # megatron-core's RotaryEmbedding knows plain and Llama 3 frequencies only; set the HF ones.
        inv_freq = self.layer_rotary_pos_emb.inv_freq
        self.layer_rotary_pos_emb.inv_freq = rope.inv_freq(config.kv_channels).to(inv_freq.device)

    def forward(self, hidden_states, attention_mask, **kwargs):
        for unsupported in ("inference_context", "inference_params", "rotary_pos_cos", "rotary_pos_sin", "packed_seq_params"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"Olmo3SelfAttention does not support {unsupported}")
        rotary = kwargs.get("rotary_pos_emb")
        if rotary is not None:
            if isinstance(rotary, tuple):
                rotary = rotary[0]
            cp_size = dist.get_world_size(self.pg_collection.cp) if self.pg_collection.cp is not None else 1
            kwargs["rotary_pos_emb"] = self.layer_rotary_pos_emb(rotary.shape[0] * cp_size)
        return super().forward(hidden_states, attention_mask, **kwargs)

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, *rest = super().get_query_key_value_tensors(*args, **kwargs)
        if self.attention_factor != 1.0:
            query, key = query * self.attention_factor, key * self.attention_factor
        return (query, key, *rest)


def olmo3_layer_spec(arch: ModelArch, layer_type: str, core_attention) -> ModuleSpec:
    """The local-spec layer of ``layer_type`` (``full_attention`` or ``sliding_attention``).

    Which layers use the sliding window is the TransformerConfig's per-layer pattern; the spec
    differs between layer types only in the RoPE its attention uses.
    """
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=Olmo3SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal, "rope": arch.rope_for_layer_type(layer_type)},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core_attention,
                    linear_proj=RowParallelLinearWithPostNorm,
                    q_layernorm=ModuleSpec(module=FullWidthRMSNorm, params={"num_heads": arch.num_attention_heads}),
                    k_layernorm=ModuleSpec(module=FullWidthRMSNorm, params={"num_heads": arch.num_query_groups}),
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinearWithPostNorm),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )
