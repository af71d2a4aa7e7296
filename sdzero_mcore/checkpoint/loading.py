"""Build a megatron-core model and fill it from a HF checkpoint or an sdzero-mcore checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from sdzero_mcore.checkpoint import mcore_io
from sdzero_mcore.checkpoint.hf_io import CheckpointError, HFCheckpointReader
from sdzero_mcore.checkpoint.mapping import expected_hf_shapes, hf_to_local, mark_tensor_parallel_params, model_param_mappings
from sdzero_mcore.models.builder import build_gpt_model
from sdzero_mcore.models.hf_config import ModelArch
from sdzero_mcore.parallel.pipeline import model_chunks


def open_hf_checkpoint(hf_dir: str | Path) -> tuple[ModelArch, HFCheckpointReader]:
    """Parse config.json and check every weight shard against it before anything is loaded."""
    arch = ModelArch.from_hf_dir(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    optional = ["lm_head.weight"] if arch.tie_word_embeddings else []
    reader.check_against(expected_hf_shapes(arch), f"{Path(hf_dir) / 'config.json'}", optional=optional)
    return arch, reader


@torch.no_grad()
def load_hf_weights(model, reader: HFCheckpointReader, progress: bool = False) -> None:
    """Copy this TP rank's shard of every parameter from the HF checkpoint into ``model``: at
    pipeline-parallel size > 1 the stage's own layers (at their global indices), the embedding on
    the first stage, and on the last the final norm and the output layer (with tied embeddings,
    from the embedding); with virtual pipeline stages, each model chunk's."""
    arch = model.hf_arch
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    params = []
    for chunk in model_chunks(model):
        try:
            table = model_param_mappings(chunk)
        except ValueError as error:
            raise CheckpointError(f"{reader.dir}: {error}") from None
        params += [(name, table[name], param) for name, param in chunk.named_parameters()]
    for name, mapping, param in tqdm(params, desc="loading HF weights", unit="tensor", disable=not progress):
        shard = hf_to_local(mapping, reader, arch, tp_rank, tp_size, model.padded_vocab_size)
        if shard.shape != param.shape:
            raise CheckpointError(
                f"{reader.dir}: {mapping.hf} give a shard of shape {list(shard.shape)} for "
                f"'{name}', whose TP-{tp_size} shard has shape {list(param.shape)}"
            )
        param.copy_(shard)


def build_model_from_hf(
    hf_dir: str | Path,
    *,
    params_dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    **build_kwargs,
):
    """A GPTModel at the current parallel sizes with the weights of a HF checkpoint (at
    pipeline-parallel size > 1, this rank's stage: only its layers are built and read)."""
    arch, reader = open_hf_checkpoint(hf_dir)
    model = build_gpt_model(
        arch, params_dtype=params_dtype or reader.main_dtype(), perform_initialization=False, **build_kwargs
    )
    mark_tensor_parallel_params(model)  # what the skipped initialisation would have set
    load_hf_weights(model, reader, progress=progress)
    return model


def build_model_from_mcore(
    ckpt_dir: str | Path,
    *,
    params_dtype: Optional[torch.dtype] = None,
    **build_kwargs,
):
    """A GPTModel at the current parallel sizes loaded from an sdzero-mcore checkpoint (any TP)."""
    meta = mcore_io.read_checkpoint_meta(ckpt_dir)
    arch = mcore_io.checkpoint_arch(ckpt_dir)
    dtype = params_dtype or getattr(torch, meta["params_dtype"])
    model = build_gpt_model(arch, params_dtype=dtype, perform_initialization=False, **build_kwargs)
    mark_tensor_parallel_params(model)  # what the skipped initialisation would have set
    mcore_io.load_model(model, ckpt_dir)
    return model
