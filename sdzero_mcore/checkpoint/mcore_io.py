"""megatron-core distributed checkpoints of a model, with the metadata that makes them self-describing.

Layout of a checkpoint directory::

    sdzero_checkpoint.json   written last: marks the checkpoint complete; architecture, vocab, TP
    hf/                      the HF config, generation config and tokenizer files it came from
    metadata.json, .metadata, *.distcp, common.pt
                             megatron-core's torch_dist checkpoint (TP-independent layout)

The dist checkpoint stores global tensors, so a checkpoint written at one TP size loads at any
other; the vocabulary rows, padded to a TP-dependent multiple, load with megatron-core's
``allow_shape_mismatch`` handling of the embedding and output layer.

Module extra state (``*._extra_state``: TransformerEngine's FP8 metadata, e.g. of its attention,
which the local spec's attention does not have) is the one difference between the keys of a
TransformerEngine-spec and a local-spec model, so a load tolerates extra-state keys that only one
side has; any other key that only one side has fails the load.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling

from sdzero_mcore import __version__
from sdzero_mcore.checkpoint.hf_io import CheckpointError
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.parallel.cpu_compat import apply_cpu_compat

META_FILE = "sdzero_checkpoint.json"
HF_FILES_DIR = "hf"
FORMAT_VERSION = 1
# megatron-core's key suffix for module extra state (saved as a ShardedObject, not a tensor)
EXTRA_STATE_SUFFIX = "_extra_state"


def holds_mcore_checkpoint(path: Path) -> bool:
    return (path / META_FILE).is_file() or (path / "metadata.json").is_file()


def write_checkpoint_meta(
    ckpt_dir: Path,
    arch: ModelArch,
    *,
    tensor_parallel_size: int,
    padded_vocab_size: int,
    params_dtype: torch.dtype,
    **extra: Any,
) -> dict:
    """Write the completion marker, the last step of a save (one process)."""
    meta = {
        "format_version": FORMAT_VERSION,
        "created_by": f"sdzero-mcore {__version__}",
        "architecture": arch.architecture,
        "vocab_size": arch.vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "tensor_parallel_size": tensor_parallel_size,
        "params_dtype": str(params_dtype).removeprefix("torch."),
        **extra,
    }
    atomic_write_text(ckpt_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def read_checkpoint_meta(ckpt_dir: str | Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / META_FILE
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: megatron checkpoint directory does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir}: not a complete sdzero-mcore checkpoint ({META_FILE} is missing; "
            "an interrupted write leaves a hidden .NAME.tmp-* directory instead)"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt metadata ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    return meta


def checkpoint_arch(ckpt_dir: str | Path) -> ModelArch:
    """The architecture a checkpoint holds, from the HF config saved beside it."""
    read_checkpoint_meta(ckpt_dir)
    return ModelArch.from_hf_dir(Path(ckpt_dir) / HF_FILES_DIR)


def save_model(model, ckpt_dir: Path) -> None:
    """Collective: every rank of the job writes its shards of ``model`` into ``ckpt_dir``."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(_sharded_state_dict(model), str(ckpt_dir))


def _sharded_state_dict(model) -> dict:
    """megatron-core's sharded state dict of ``model``; of model chunks (virtual pipeline stages),
    one per chunk under ``chunk<v>``. Either way the tensors' keys are global (layers at megatron's
    offset), so the checkpoint loads at any pipeline layout."""
    if not isinstance(model, list):
        return model.sharded_state_dict()
    return {f"chunk{index}": chunk.sharded_state_dict() for index, chunk in enumerate(model)}


def load_model(model, ckpt_dir: str | Path) -> dict:
    """Collective: load a complete checkpoint into ``model`` (any TP size). Returns its metadata."""
    meta = read_checkpoint_meta(ckpt_dir)
    saved = checkpoint_arch(ckpt_dir)
    if saved != model.hf_arch:
        differing = [
            name
            for name in saved.__dataclass_fields__
            if name not in ("dtype", "hf_config") and getattr(saved, name) != getattr(model.hf_arch, name)
        ]
        if differing:
            raise CheckpointError(
                f"{ckpt_dir}: checkpoint architecture differs from the model in: {', '.join(differing)}"
            )
    # RETURN_ALL: megatron drops the keys the checkpoint lacks from the request and returns both
    # kinds of mismatch, so extra-state keys can be let through while every other mismatch fails.
    state_dict, checkpoint_only, model_only = dist_checkpointing.load(
        _sharded_state_dict(model), str(ckpt_dir), strict=StrictHandling.RETURN_ALL
    )
    _refuse_mismatched_keys(ckpt_dir, checkpoint_only=checkpoint_only, model_only=model_only)
    chunks = [(model, state_dict)] if not isinstance(model, list) else [
        (chunk, state_dict[f"chunk{index}"]) for index, chunk in enumerate(model)]
    for chunk, chunk_state in chunks:
        # strict=False: a module whose extra state the checkpoint lacks keeps its own (TE's fresh FP8
        # metadata); the keys torch reports are checked the same way
        incompatible = chunk.load_state_dict(chunk_state, strict=False)
        _refuse_mismatched_keys(
            ckpt_dir, checkpoint_only=incompatible.unexpected_keys, model_only=incompatible.missing_keys
        )
    return meta


def _refuse_mismatched_keys(ckpt_dir, *, checkpoint_only, model_only) -> None:
    """Raise if keys other than module extra state are in only one of the checkpoint and the model."""
    checkpoint_only = sorted(key for key in checkpoint_only if not key.endswith(EXTRA_STATE_SUFFIX))
    model_only = sorted(key for key in model_only if not key.endswith(EXTRA_STATE_SUFFIX))
    if checkpoint_only or model_only:
        raise CheckpointError(
            f"{ckpt_dir}: checkpoint and model keys differ; in the model only: {model_only or 'none'}; "
            f"in the checkpoint only: {checkpoint_only or 'none'}"
        )


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A one-process gloo group for dist-checkpoint reads outside a distributed job."""
    apply_cpu_compat()  # megatron-core's checkpoint reader synchronises CUDA; no-op with a GPU
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("reading a checkpoint tensor by tensor must run in a single process")
        yield
        return
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def checkpoint_tensor_metadata(ckpt_dir: str | Path) -> dict:
    """Global shape and dtype of every tensor key in a dist checkpoint (reads no tensor data)."""
    return dist_checkpointing.load_tensors_metadata(str(ckpt_dir))


def load_global_tensor(ckpt_dir: str | Path, key: str, metadata: dict, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """One whole tensor key of a dist checkpoint (layers stacked on dim 0). Needs a process group."""
    if key not in metadata:
        raise CheckpointError(f"{ckpt_dir}: dist checkpoint has no tensor '{key}'")
    info = metadata[key]
    target = torch.empty(info.global_shape, dtype=dtype or info.dtype)
    request = {key: ShardedTensor.from_rank_offsets(key, target, replica_id=0)}
    return dist_checkpointing.load(request, str(ckpt_dir))[key]


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk before it is published by a rename."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as handle:
                os.fsync(handle.fileno())
