"""The one mapping between HF tensor names/layouts and megatron-core parameters.

Every conversion goes through here: HF -> a TP rank's local shard (import), TP shards -> the
global Megatron tensor (gather, used by resharding), global Megatron tensor -> HF tensors
(export). Layout facts (docs/design.md):

* ``linear_qkv`` rows are grouped per query group: [q heads of group 0; k_0; v_0; q heads of
  group 1; ...]; biases the same. TP splits whole groups, so rank r holds groups
  [r*G/TP, (r+1)*G/TP) in that order and the global layout does not depend on TP.
* ``linear_fc1`` is [gate; up] globally, and each TP rank holds [gate_shard; up_shard].
* Row-parallel weights (``linear_proj``, ``linear_fc2``) split along the input dimension.
* The vocabulary (embedding, output layer) is padded to Megatron's multiple and split in rows.
* Olmo-3's full-width QK-norm weights [heads * head_dim] split in rows like the heads they scale;
  its post-norms sit in the output projections (``linear_proj.post_layernorm``,
  ``linear_fc2.post_layernorm``), and it has no input norms.

Names: ``mcore`` is the TransformerEngine-style parameter name, which is also what megatron-core's
distributed checkpoints use for both layer specs (the local spec maps its separate norms onto
these keys). ``local_alias`` is the local spec's own module name for the same parameter.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.parallel.pipeline import model_chunks

LAYER = "{layer}"


class Kind(enum.Enum):
    REPLICATED = "replicated"  # same tensor on every TP rank (norms)
    ROW = "row"  # split along dim 1
    VOCAB = "vocab"  # padded vocabulary rows, split along dim 0
    QKV = "qkv"  # q, k, v fused and grouped per query group, split along dim 0
    GATE_UP = "gate_up"  # gate and up fused, each split along dim 0
    COLUMN = "column"  # split along dim 0 in TP-rank order (Olmo-3's full-width QK-norm weights)


@dataclass(frozen=True)
class WeightMapping:
    mcore: str
    hf: tuple[str, ...]
    kind: Kind
    local_alias: Optional[str] = None

    @property
    def per_layer(self) -> bool:
        return LAYER in self.mcore

    @property
    def checkpoint_key(self) -> str:
        """Key in a megatron-core distributed checkpoint, where layers are stacked on a new dim 0."""
        return re.sub(r"\.layers\.(\{layer\}|\d+)\.", ".layers.", self.mcore)

    def for_layer(self, layer: int) -> "WeightMapping":
        fmt = lambda name: name.replace(LAYER, str(layer))  # noqa: E731
        return replace(
            self,
            mcore=fmt(self.mcore),
            hf=tuple(fmt(name) for name in self.hf),
            local_alias=fmt(self.local_alias) if self.local_alias else None,
        )


def weight_mappings(arch: ModelArch) -> list[WeightMapping]:
    """Mappings for ``arch`` with ``{layer}`` placeholders, in export order."""
    if arch.olmo3:
        return _olmo3_mappings(arch)
    attn = f"decoder.layers.{LAYER}.self_attention"
    mlp = f"decoder.layers.{LAYER}.mlp"
    hf_attn = f"model.layers.{LAYER}.self_attn"
    hf_mlp = f"model.layers.{LAYER}.mlp"
    qkv_names = tuple(f"{hf_attn}.{p}_proj.weight" for p in "qkv")
    mappings = [
        WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.VOCAB),
        WeightMapping(
            f"{attn}.linear_qkv.layer_norm_weight",
            (f"model.layers.{LAYER}.input_layernorm.weight",),
            Kind.REPLICATED,
            local_alias=f"decoder.layers.{LAYER}.input_layernorm.weight",
        ),
        WeightMapping(f"{attn}.linear_qkv.weight", qkv_names, Kind.QKV),
    ]
    if arch.qkv_bias:
        bias_names = tuple(f"{hf_attn}.{p}_proj.bias" for p in "qkv")
        mappings.append(WeightMapping(f"{attn}.linear_qkv.bias", bias_names, Kind.QKV))
    if arch.qk_norm:
        mappings += [
            WeightMapping(f"{attn}.q_layernorm.weight", (f"{hf_attn}.q_norm.weight",), Kind.REPLICATED),
            WeightMapping(f"{attn}.k_layernorm.weight", (f"{hf_attn}.k_norm.weight",), Kind.REPLICATED),
        ]
    mappings += [
        WeightMapping(f"{attn}.linear_proj.weight", (f"{hf_attn}.o_proj.weight",), Kind.ROW),
        WeightMapping(
            f"{mlp}.linear_fc1.layer_norm_weight",
            (f"model.layers.{LAYER}.post_attention_layernorm.weight",),
            Kind.REPLICATED,
            local_alias=f"decoder.layers.{LAYER}.pre_mlp_layernorm.weight",
        ),
        WeightMapping(
            f"{mlp}.linear_fc1.weight",
            (f"{hf_mlp}.gate_proj.weight", f"{hf_mlp}.up_proj.weight"),
            Kind.GATE_UP,
        ),
        WeightMapping(f"{mlp}.linear_fc2.weight", (f"{hf_mlp}.down_proj.weight",), Kind.ROW),
        WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED),
    ]
    if not arch.tie_word_embeddings:
        mappings.append(WeightMapping("output_layer.weight", ("lm_head.weight",), Kind.VOCAB))
    return mappings


def _olmo3_mappings(arch: ModelArch) -> list[WeightMapping]:
    attn = f"decoder.layers.{LAYER}.self_attention"
    mlp = f"decoder.layers.{LAYER}.mlp"
    hf_layer = f"model.layers.{LAYER}"
    mappings = [
        WeightMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), Kind.VOCAB),
        WeightMapping(
            f"{attn}.linear_qkv.weight", tuple(f"{hf_layer}.self_attn.{p}_proj.weight" for p in "qkv"), Kind.QKV
        ),
        WeightMapping(f"{attn}.q_layernorm.weight", (f"{hf_layer}.self_attn.q_norm.weight",), Kind.COLUMN),
        WeightMapping(f"{attn}.k_layernorm.weight", (f"{hf_layer}.self_attn.k_norm.weight",), Kind.COLUMN),
        WeightMapping(f"{attn}.linear_proj.weight", (f"{hf_layer}.self_attn.o_proj.weight",), Kind.ROW),
        WeightMapping(
            f"{attn}.linear_proj.post_layernorm.weight", (f"{hf_layer}.post_attention_layernorm.weight",), Kind.REPLICATED
        ),
        WeightMapping(
            f"{mlp}.linear_fc1.weight",
            (f"{hf_layer}.mlp.gate_proj.weight", f"{hf_layer}.mlp.up_proj.weight"),
            Kind.GATE_UP,
        ),
        WeightMapping(f"{mlp}.linear_fc2.weight", (f"{hf_layer}.mlp.down_proj.weight",), Kind.ROW),
        WeightMapping(
            f"{mlp}.linear_fc2.post_layernorm.weight", (f"{hf_layer}.post_feedforward_layernorm.weight",), Kind.REPLICATED
        ),
        WeightMapping("decoder.final_layernorm.weight", ("model.norm.weight",), Kind.REPLICATED),
    ]
    if not arch.tie_word_embeddings:
        mappings.append(WeightMapping("output_layer.weight", ("lm_head.weight",), Kind.VOCAB))
    return mappings


def concrete_mappings(arch: ModelArch) -> list[WeightMapping]:
    """Every mapping with its layer filled in: layer params layer by layer, then the rest."""
    out = []
    for mapping in weight_mappings(arch):
        if mapping.per_layer:
            out.extend(mapping.for_layer(i) for i in range(arch.num_layers))
        else:
            out.append(mapping)
    return out


def expected_hf_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor the architecture has, from its config."""
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    q_rows, kv_rows = arch.num_attention_heads * d, arch.num_query_groups * d
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        layer, attn, mlp = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        if arch.olmo3:  # post-norms after attention and MLP, QK-norm over the full projection width
            shapes.update(
                {
                    f"{layer}.post_feedforward_layernorm.weight": (h,),
                    f"{attn}.q_norm.weight": (q_rows,),
                    f"{attn}.k_norm.weight": (kv_rows,),
                }
            )
        else:
            shapes[f"{layer}.input_layernorm.weight"] = (h,)
            if arch.qk_norm:
                shapes.update({f"{attn}.q_norm.weight": (d,), f"{attn}.k_norm.weight": (d,)})
        shapes.update(
            {
                f"{layer}.post_attention_layernorm.weight": (h,),
                f"{attn}.q_proj.weight": (q_rows, h),
                f"{attn}.k_proj.weight": (kv_rows, h),
                f"{attn}.v_proj.weight": (kv_rows, h),
                f"{attn}.o_proj.weight": (h, q_rows),
                f"{mlp}.gate_proj.weight": (ffn, h),
                f"{mlp}.up_proj.weight": (ffn, h),
                f"{mlp}.down_proj.weight": (h, ffn),
            }
        )
        if arch.qkv_bias:
            shapes.update({f"{attn}.q_proj.bias": (q_rows,), f"{attn}.k_proj.bias": (kv_rows,), f"{attn}.v_proj.bias": (kv_rows,)})
    return shapes


# --------------------------------------------------------------------------------------------
# Layout transforms. Each works on weights and on biases (any trailing dims).


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: ModelArch) -> torch.Tensor:
    """[q; k; v] in HF order -> rows grouped per query group, for however many groups are given."""
    d, hpg = arch.head_dim, arch.heads_per_group
    groups = k.shape[0] // d
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(groups, hpg * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1
    )
    return grouped.reshape(groups * (hpg + 2) * d, *rest)


def split_qkv(qkv: torch.Tensor, arch: ModelArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`merge_qkv`."""
    d, hpg = arch.head_dim, arch.heads_per_group
    groups = qkv.shape[0] // ((hpg + 2) * d)
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (hpg + 2) * d, *rest)
    q, k, v = torch.split(grouped, [hpg * d, d, d], dim=1)
    return (
        q.reshape(groups * hpg * d, *rest).contiguous(),
        k.reshape(groups * d, *rest).contiguous(),
        v.reshape(groups * d, *rest).contiguous(),
    )


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class TensorSource(Protocol):
    """Where HF tensors come from: a safetensors checkpoint on disk, or a dict in memory."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Tensor ``name``, or only its slice [start, stop) along ``dim`` when ``dim`` is given."""
        ...


class DictSource:
    """A :class:`TensorSource` over tensors already in memory."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        tensor = self.tensors[name]
        return tensor if dim is None else tensor.narrow(dim, start, stop - start)


def hf_to_local(
    mapping: WeightMapping, source: TensorSource, arch: ModelArch, tp_rank: int, tp_size: int, padded_vocab: int
) -> torch.Tensor:
    """The TP-local shard of a Megatron parameter, reading only the slices of HF tensors it needs."""
    kind, names = mapping.kind, mapping.hf
    if kind is Kind.REPLICATED:
        return source.read(names[0])
    if kind is Kind.ROW:
        n = source.shape(names[0])[1] // tp_size
        return source.read(names[0], 1, tp_rank * n, (tp_rank + 1) * n)
    if kind is Kind.COLUMN:
        n = source.shape(names[0])[0] // tp_size
        return source.read(names[0], 0, tp_rank * n, (tp_rank + 1) * n)
    if kind is Kind.VOCAB:
        rows = padded_vocab // tp_size
        start = min(tp_rank * rows, arch.vocab_size)
        stop = min(start + rows, arch.vocab_size)
        # A rank whose rows are all padding reads an empty slice, which keeps the dtype.
        return _pad_rows(source.read(names[0], 0, start, stop), rows)
    if kind is Kind.QKV:
        groups = arch.num_query_groups // tp_size
        q_rows, kv_rows = groups * arch.heads_per_group * arch.head_dim, groups * arch.head_dim
        q = source.read(names[0], 0, tp_rank * q_rows, (tp_rank + 1) * q_rows)
        k = source.read(names[1], 0, tp_rank * kv_rows, (tp_rank + 1) * kv_rows)
        v = source.read(names[2], 0, tp_rank * kv_rows, (tp_rank + 1) * kv_rows)
        return merge_qkv(q, k, v, arch)
    if kind is Kind.GATE_UP:
        n = arch.ffn_hidden_size // tp_size
        rows = (0, tp_rank * n, (tp_rank + 1) * n)
        return torch.cat([source.read(names[0], *rows), source.read(names[1], *rows)])
    raise AssertionError(kind)


def gather_shards(mapping: WeightMapping, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global Megatron tensor from the TP shards of ranks 0..TP-1 (inverse of shard_global)."""
    kind = mapping.kind
    if kind is Kind.REPLICATED:
        return shards[0]
    if kind is Kind.ROW:
        return torch.cat(list(shards), dim=1)
    if kind in (Kind.VOCAB, Kind.QKV, Kind.COLUMN):
        return torch.cat(list(shards), dim=0)
    if kind is Kind.GATE_UP:
        gates, ups = zip(*(shard.chunk(2, dim=0) for shard in shards))
        return torch.cat([*gates, *ups], dim=0)
    raise AssertionError(kind)


def shard_global(mapping: WeightMapping, tensor: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of a global Megatron tensor."""
    kind = mapping.kind
    if kind is Kind.REPLICATED:
        return tensor
    if kind is Kind.ROW:
        return tensor.chunk(tp_size, dim=1)[tp_rank]
    if kind in (Kind.VOCAB, Kind.QKV, Kind.COLUMN):
        return tensor.chunk(tp_size, dim=0)[tp_rank]
    if kind is Kind.GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    raise AssertionError(kind)


def global_to_hf(mapping: WeightMapping, tensor: torch.Tensor, arch: ModelArch) -> dict[str, torch.Tensor]:
    """HF tensors from a global Megatron tensor; vocabulary padding is stripped."""
    kind, names = mapping.kind, mapping.hf
    if kind is Kind.QKV:
        return dict(zip(names, split_qkv(tensor, arch)))
    if kind is Kind.GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        return {names[0]: gate.contiguous(), names[1]: up.contiguous()}
    if kind is Kind.VOCAB:
        return {names[0]: tensor[: arch.vocab_size].contiguous()}
    return {names[0]: tensor.contiguous()}


def mappings_by_param_name(arch: ModelArch) -> dict[str, WeightMapping]:
    """Concrete mappings keyed by every name a Megatron parameter can have (TE or local spec)."""
    table = {}
    for mapping in concrete_mappings(arch):
        table[mapping.mcore] = mapping
        if mapping.local_alias:
            table[mapping.local_alias] = mapping
    return table


_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED_OUTPUT_WEIGHT = "output_layer.weight"


def model_param_mappings(model) -> dict[str, WeightMapping]:
    """Each parameter of a built model -> its concrete mapping, at global layer indices.

    A pipeline stage names its layers from 0; its layer i is global layer
    ``decoder.layers[i].layer_number - 1`` (megatron-core's offset). With tied embeddings the last
    stage of PP > 1 holds a copy of the embedding as ``output_layer.weight``
    (:func:`is_tied_output_copy`): it maps to the embedding. At PP = 1 this is
    :func:`mappings_by_param_name` looked up by name."""
    arch = model.hf_arch
    table = mappings_by_param_name(arch)
    out = {}
    for name, _ in model.named_parameters():
        if name == TIED_OUTPUT_WEIGHT and arch.tie_word_embeddings:
            out[name] = table["embedding.word_embeddings.weight"]
            continue
        match = _LOCAL_LAYER.match(name)
        if match:
            layer = model.decoder.layers[int(match.group(1))].layer_number - 1
            key = f"decoder.layers.{layer}." + name[match.end():]
        else:
            key = name
        if key not in table:
            raise ValueError(f"parameter {name!r} has no HF mapping for {arch.architecture}")
        out[name] = table[key]
    return out


# The dimension each kind is split along over TP (megatron-core's ``partition_dim``); REPLICATED: none
PARTITION_DIM = {Kind.ROW: 1, Kind.VOCAB: 0, Kind.QKV: 0, Kind.GATE_UP: 0, Kind.COLUMN: 0}


def mark_tensor_parallel_params(model) -> None:
    """Set megatron-core's tensor-parallel attributes (``tensor_model_parallel``, ``partition_dim``,
    ``partition_stride``) on every parameter split over TP, as its weight initialisers do.

    megatron-core sets them only when it initialises a weight (``perform_initialization``). A model
    built to receive checkpoint weights skips that initialisation, and code that reads the
    attributes would then take every rank's shard of a split weight for a replica: the distributed
    optimizer's gradient norm (``param_is_not_tensor_parallel_duplicate``) counted TP rank 0's
    shards only. Parameters that have them already (biases, which megatron marks unconditionally)
    are left as they are."""
    for chunk in model_chunks(model):
        params = dict(chunk.named_parameters())
        for name, mapping in model_param_mappings(chunk).items():
            dim = PARTITION_DIM.get(mapping.kind)
            if dim is not None and not hasattr(params[name], "tensor_model_parallel"):
                set_tensor_model_parallel_attributes(params[name], True, dim, 1)


def is_tied_output_copy(model, name: str) -> bool:
    """Whether parameter ``name`` is the last pipeline stage's copy of a tied embedding (its values
    and gradients equal the first stage's embedding: counted and exported once, from there)."""
    return name == TIED_OUTPUT_WEIGHT and model.hf_arch.tie_word_embeddings
