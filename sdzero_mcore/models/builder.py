"""megatron-core GPTModel built from a HF architecture (Qwen3 dense, Qwen2.5, Llama 3.x, Olmo-3).

The model computes what the HF checkpoint computes: RMSNorm with the HF epsilon, SwiGLU, RoPE with
the HF theta and Llama 3 scaling, GQA, Qwen3's per-head QK-norm, Qwen2.5's QKV bias, tied or untied
embeddings, and Olmo-3's post-norms, full-width QK-norm, sliding-window layers and per-layer-type
RoPE (``models/olmo3.py``). The vocabulary is padded as Megatron pads it and the padded ids never
get probability.

The norms are chosen here, not by megatron-core's import-time default: with apex importable and
TransformerEngine absent that default for the final norm is apex's FusedLayerNorm, which refuses
RMSNorm. The local spec uses torch's RMSNorm (megatron's WrappedTorchNorm), the TE spec TE's.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.extensions.transformer_engine import TENorm
from megatron.core.models.gpt import GPTModel, gpt_layer_specs
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from sdzero_mcore.models.attention import SDPACoreAttention
from sdzero_mcore.models.hf_config import SLIDING_ATTENTION, ModelArch
from sdzero_mcore.models.olmo3 import olmo3_layer_spec
from sdzero_mcore.parallel.pipeline import ModelChunks

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
# Core attention of the local spec: SDPA (fused kernels, context parallelism) or megatron-core's own
# unfused DotProductAttention (materialises [b, h, s, s]; no CP), kept as the reference and baseline.
LOCAL_ATTENTION_IMPLS = ("sdpa", "unfused")
# TransformerEngine's context-parallel schemes; the local SDPA attention implements all_gather.
CP_COMM_TYPES = ("p2p", "all_gather", "a2a", "a2a+p2p")
RECOMPUTE_MODES = ("none", "selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(transformer_impl: str = "auto") -> str:
    """"auto" picks TransformerEngine when it is importable and a GPU is present, else local."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise ValueError(
            f"transformer_impl must be one of {', '.join(TRANSFORMER_IMPLS)}; got {transformer_impl!r}"
        )
    if transformer_impl == "auto":
        use_te = transformer_engine_available() and torch.cuda.is_available()
        return "transformer_engine" if use_te else "local"
    if transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError("transformer_impl='transformer_engine' but transformer_engine is not installed")
    return transformer_impl


def resolve_transformer_impl_for(arch: ModelArch, transformer_impl: str = "auto") -> str:
    """:func:`resolve_transformer_impl`, except that Olmo-3 is built with the local spec only (its
    post-norm, full-width QK-norm and per-layer RoPE modules are local-spec modules): "auto" picks it."""
    impl = resolve_transformer_impl(transformer_impl)
    if arch.olmo3 and impl == "transformer_engine":
        if transformer_impl != "auto":
            raise ValueError(
                f"transformer_impl='transformer_engine' is not supported for {arch.architecture}; use 'local' or 'auto'"
            )
        return "local"
    return impl


def _sliding_window_fields(arch: ModelArch) -> dict:
    """megatron-core's sliding-window settings: HF's window W lets a query see itself and the W - 1
    keys before it, i.e. ``window_size=(W - 1, 0)``, on the layers the per-layer pattern marks 1."""
    if not arch.sliding_window:
        return {}
    pattern = [int(arch.layer_type(i) == SLIDING_ATTENTION) for i in range(arch.num_layers)]
    return {"window_size": (arch.sliding_window - 1, 0), "window_attn_skip_freq": pattern}


def transformer_config_for(
    arch: ModelArch,
    *,
    params_dtype: torch.dtype = torch.float32,
    tensor_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    perform_initialization: bool = True,
    recompute: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    use_cpu_initialization: bool = False,
    cp_comm_type: Optional[str] = None,
):
    """The TransformerConfig that reproduces ``arch``; ``recompute``: none, selective or full
    (``recompute_method`` and ``recompute_num_layers`` apply to full), megatron-core's activation recompute."""
    arch.check_tensor_parallel(tensor_model_parallel_size)
    arch.check_pipeline_parallel(pipeline_model_parallel_size)
    arch.check_virtual_pipeline_parallel(pipeline_model_parallel_size, virtual_pipeline_model_parallel_size)
    if cp_comm_type is not None and cp_comm_type not in CP_COMM_TYPES:
        raise ValueError(f"cp_comm_type must be one of {', '.join(CP_COMM_TYPES)}; got {cp_comm_type!r}")
    recompute_kwargs = recompute_config(recompute, recompute_method, recompute_num_layers, arch.num_layers)
    config = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        # Olmo-3's full-width QK-norm weights are TP-sharded, and finalize_model_grads all-reduces
        # the gradient of every q_/k_layernorm parameter over TP when this flag is set.
        qk_layernorm=arch.qk_norm and not arch.olmo3,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        context_parallel_size=context_parallel_size,
        cp_comm_type=cp_comm_type if context_parallel_size > 1 else None,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        init_method_std=arch.initializer_range,
        # Fusions that need apex or TransformerEngine kernels stay off; the TE spec brings its own.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **_sliding_window_fields(arch),
        **recompute_kwargs,
    )
    if pipeline_model_parallel_size > 1:
        # Stages exchange activations of each micro-batch's own shape (micro-batches are packed by
        # tokens, so their lengths differ): the shape goes first. Set after construction because
        # TransformerConfig refuses it beside its default MoE token dispatcher, which a dense model
        # never builds.
        config.variable_seq_lengths = True
    if virtual_pipeline_model_parallel_size is not None:
        # The interleaved schedule as Megatron-LM runs it: each exchange in one direction, started
        # early and waited for late, instead of one batch for both. With variable lengths the shapes
        # go first in one batch per exchange, and at PP = 2 the previous and the next stage are the
        # same rank: a batch that sent both ways would pair the activation's shape with the gradient's.
        config.overlap_p2p_comm = True
        config.batch_p2p_comm = False
    return config


def recompute_config(recompute: str, method: str, num_layers: int, model_layers: int) -> dict:
    """megatron-core's TransformerConfig fields for ``recompute``."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE_MODES)}; got {recompute!r}")
    if recompute == "none":
        return {}
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if method not in RECOMPUTE_METHODS:
        raise ValueError(f"recompute_method must be one of {', '.join(RECOMPUTE_METHODS)}; got {method!r}")
    if not 1 <= num_layers <= model_layers:
        raise ValueError(f"recompute_num_layers must be between 1 and the model's {model_layers} layers; got {num_layers}")
    if method == "uniform" and model_layers % num_layers:
        # megatron-core's uniform method steps through the layers in chunks of this size
        raise ValueError(f"recompute_num_layers ({num_layers}) must divide the model's {model_layers} layers "
                         "with recompute_method uniform")
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


def layer_spec_for(arch: ModelArch, transformer_impl: str = "auto", local_attention: str = "sdpa", layer: int = 0):
    """TransformerEngine's layer spec when TE is in use, otherwise megatron-core's local spec with
    its core attention swapped for :class:`SDPACoreAttention` (``local_attention="sdpa"``).
    Olmo-3's spec depends on the layer's type (``layer``, 0-based global index)."""
    if local_attention not in LOCAL_ATTENTION_IMPLS:
        raise ValueError(f"local_attention must be one of {', '.join(LOCAL_ATTENTION_IMPLS)}; got {local_attention!r}")
    impl = resolve_transformer_impl_for(arch, transformer_impl)
    if arch.olmo3:
        if local_attention != "sdpa":
            # megatron-core's DotProductAttention builds its sliding-window mask on "cuda" and
            # ignores a given attention mask on window layers.
            raise ValueError(f"local_attention={local_attention!r} is not supported for {arch.architecture}; use 'sdpa'")
        return olmo3_layer_spec(arch, arch.layer_type(layer), SDPACoreAttention)
    if impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    # The spec is built fresh by each call, so setting its submodules changes no shared state.
    if local_attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.input_layernorm = WrappedTorchNorm
    spec.submodules.pre_mlp_layernorm = WrappedTorchNorm
    if arch.qk_norm:
        spec.submodules.self_attention.submodules.q_layernorm = WrappedTorchNorm
        spec.submodules.self_attention.submodules.k_layernorm = WrappedTorchNorm
    return spec


def stage_layers(config: TransformerConfig, vp_stage: Optional[int] = None) -> range:
    """The 0-based global indices of the layers this pipeline stage builds (Olmo-3's layer types
    and windows go by global index); with virtual stages, those of its model chunk ``vp_stage``."""
    offset = get_transformer_layer_offset(config, vp_stage)
    return range(offset, offset + get_num_layers_to_build(config, vp_stage))


def block_spec_for(arch: ModelArch, transformer_impl: str = "auto", local_attention: str = "sdpa",
                   layers: Optional[range] = None):
    """The decoder block: :func:`layer_spec_for` for each layer of ``layers`` (0-based global
    indices; default: all of them, a pipeline stage builds its share) and a final norm of the same
    implementation as the layers' norms (built on the last stage only)."""
    impl = resolve_transformer_impl_for(arch, transformer_impl)
    layers = range(arch.num_layers) if layers is None else layers
    return TransformerBlockSubmodules(
        layer_specs=[layer_spec_for(arch, impl, local_attention, layer) for layer in layers],
        layer_norm=TENorm if impl == "transformer_engine" else WrappedTorchNorm,
    )


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, padded_vocab_size: int) -> torch.Tensor:
    """Give the ids in [vocab_size, padded_vocab_size) the lowest logit, on a full or TP-local shard.

    The lowest finite value rather than -inf: softmax still assigns them exactly zero, while
    p * log p style terms downstream stay 0 instead of NaN.
    """
    local = logits.shape[-1]
    if local == padded_vocab_size:  # gathered logits, or TP = 1
        start = 0
    else:
        start = parallel_state.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    ids = torch.arange(start, start + local, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, torch.finfo(logits.dtype).min)


def build_gpt_model(
    arch: ModelArch,
    *,
    params_dtype: torch.dtype = torch.float32,
    transformer_impl: str = "auto",
    local_attention: str = "sdpa",
    cp_comm_type: str = "p2p",
    parallel_output: bool = True,
    make_vocab_size_divisible_by: int = 128,
    perform_initialization: bool = True,
    recompute: str = "none",
    recompute_method: str = "uniform",
    recompute_num_layers: int = 1,
    max_sequence_length: Optional[int] = None,
    on_cpu: Optional[bool] = None,
):
    """A GPTModel for ``arch`` at the tensor/context/pipeline-parallel sizes of megatron's parallel_state.

    At pipeline-parallel size PP > 1 it is this rank's stage: layers [offset, offset + L / PP)
    (``TransformerLayer.layer_number`` - 1 is a layer's global index), the embedding on the first
    stage, the final norm and the output layer on the last (with tied embeddings, the last stage's
    output layer is a copy of the embedding that megatron-core keeps in step). With virtual
    pipeline stages (VPP set in parallel_state) it is a :class:`ModelChunks` of VPP GPTModels, chunk
    v built with ``vp_stage=v`` (its L / (PP x VPP) layers at megatron-core's global offset; the
    embedding in the first stage's chunk 0, the output layer in the last stage's last chunk).

    ``parallel_output=True`` returns vocab-parallel logits [b, s, V_padded / TP] (what the
    distillation kernels take); False gathers them to [b, s, V_padded]. Either way the padded ids
    are masked. The model carries ``hf_arch`` and ``padded_vocab_size`` for the converters.
    ``on_cpu`` (default: when no GPU is visible) keeps the parameters in host memory.
    Context parallelism uses TE's ``cp_comm_type`` scheme with the TE spec, and the all-gather
    scheme of :class:`SDPACoreAttention` with the local spec.
    """
    if on_cpu is None:
        on_cpu = not torch.cuda.is_available()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    impl = resolve_transformer_impl_for(arch, transformer_impl)
    if impl == "local":
        if cp > 1 and local_attention != "sdpa":
            raise ValueError(
                f"context_parallel_size={cp} needs local_attention='sdpa' (megatron-core's unfused "
                "DotProductAttention has no context parallelism) or transformer_impl='transformer_engine'"
            )
        cp_comm_type = "all_gather"
    config = transformer_config_for(
        arch,
        params_dtype=params_dtype,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        perform_initialization=perform_initialization,
        recompute=recompute,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        use_cpu_initialization=on_cpu,
        cp_comm_type=cp_comm_type,
    )
    padded_vocab_size = arch.padded_vocab_size(tp, make_vocab_size_divisible_by)
    build = dict(arch=arch, config=config, impl=impl, local_attention=local_attention, padded_vocab_size=padded_vocab_size,
                 max_sequence_length=max_sequence_length, parallel_output=parallel_output, on_cpu=on_cpu)
    if vpp is None:
        return _build_stage(**build, pipelined=pp > 1)
    # the chunks share one config: the schedule and the DDP wrappers read it from the first
    return ModelChunks(_build_stage(**build, pipelined=True, vp_stage=vp_stage) for vp_stage in range(vpp))


def _build_stage(*, arch: ModelArch, config: TransformerConfig, impl: str, local_attention: str, padded_vocab_size: int,
                 max_sequence_length: Optional[int], parallel_output: bool, on_cpu: bool, pipelined: bool,
                 vp_stage: Optional[int] = None):
    """One GPTModel: the whole model, this rank's pipeline stage (``pipelined``), or its model chunk
    ``vp_stage`` of virtual pipeline stages."""
    stage = {}
    if pipelined:  # at PP = 1 megatron's defaults (one stage with everything) are what is built
        stage = {"pre_process": parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                 "post_process": parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)}
    if vp_stage is not None:
        stage["vp_stage"] = vp_stage
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec_for(arch, impl, local_attention,
                                              stage_layers(config, vp_stage) if pipelined else None),
        vocab_size=padded_vocab_size,
        max_sequence_length=max_sequence_length or arch.max_position_embeddings,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope.theta,
        **stage,
    )
    # megatron-core hard-codes three of Llama 3's four scaling constants; set the frequencies the
    # HF config asks for instead (also right for unscaled RoPE). inv_freq is not a parameter or a
    # buffer, so this does not touch checkpoints.
    inv_freq = arch.rope.inv_freq(arch.head_dim)
    model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)

    vocab_size = arch.vocab_size

    def _mask_hook(module, inputs, output):
        logits, bias = output
        return mask_padded_vocab(logits, vocab_size, padded_vocab_size), bias

    if model.post_process:
        model.output_layer.register_forward_hook(_mask_hook)
    model.hf_arch = arch
    model.padded_vocab_size = padded_vocab_size
    if not on_cpu:
        model.cuda(torch.cuda.current_device())
    return model
