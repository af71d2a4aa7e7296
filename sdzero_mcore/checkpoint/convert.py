"""HF <-> megatron-core checkpoint conversion (``sdzero convert``, ``tools/convert_checkpoint.py``).

hf-to-mcore runs one process per TP x PP rank (spawned here, gloo on CPU); each builds only its
pipeline stage's layers, reads only its slices of the HF shards and writes its part of a
megatron-core distributed checkpoint, so the model is held once across the processes. mcore-to-hf reads the checkpoint one tensor key at a time and
writes HF shards as they fill, so at most one stacked key and one output shard are in memory.
Both write into a staging directory that is renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from sdzero_mcore.checkpoint import mcore_io
from sdzero_mcore.checkpoint.atomic import OutputExistsError, staged_output_dir
from sdzero_mcore.checkpoint.hf_io import CheckpointError, copy_non_weight_files, write_safetensors
from sdzero_mcore.checkpoint.loading import build_model_from_hf, open_hf_checkpoint
from sdzero_mcore.checkpoint.mapping import concrete_mappings, expected_hf_shapes, global_to_hf, weight_mappings
from sdzero_mcore.convert_args import DTYPE_NAMES, add_convert_arguments
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.models.hf_config import UnsupportedModelError
from sdzero_mcore.parallel.launch import run_local_workers
from sdzero_mcore.parallel.state import destroy_distributed, init_distributed, initialize_model_parallel
from sdzero_mcore.warnings_filter import quiet_dependency_warnings

DTYPE_CHOICES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(DTYPE_CHOICES) == DTYPE_NAMES


def holds_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() or any(path.glob("*.safetensors"))


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


# ------------------------------------------------------------------------------------------
# HF -> megatron-core


@dataclass(frozen=True)
class _ImportJob:
    hf_dir: str
    staging: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    params_dtype: torch.dtype
    make_vocab_size_divisible_by: int
    progress: bool


def _import_worker(job: _ImportJob) -> None:
    """One TP x PP rank: build its shard of its stage from the HF files and write it."""

    init_distributed(backend="gloo")
    try:
        initialize_model_parallel(tensor_model_parallel_size=job.tensor_parallel_size,
                                  pipeline_model_parallel_size=job.pipeline_parallel_size)
        model = build_model_from_hf(
            job.hf_dir,
            params_dtype=job.params_dtype,
            transformer_impl="local",
            make_vocab_size_divisible_by=job.make_vocab_size_divisible_by,
            on_cpu=True,
            progress=job.progress and dist.get_rank() == 0,
        )
        mcore_io.save_model(model, Path(job.staging))
    finally:
        destroy_distributed()


def hf_to_mcore(
    hf_dir: str | Path,
    out_dir: str | Path,
    tensor_parallel_size: int = 1,
    *,
    params_dtype: Optional[torch.dtype] = None,
    make_vocab_size_divisible_by: int = 128,
    overwrite: bool = False,
    progress: bool = True,
    pipeline_parallel_size: int = 1,
) -> dict:
    """Convert a HF checkpoint into an sdzero-mcore (megatron-core dist) checkpoint. Returns its metadata.

    Everything that can be checked without loading weights (config, shards, shapes, TP and PP
    sizes, output directory) is checked before any process starts. The checkpoint stores global
    tensors: it loads at any TP x PP, whichever it was written at.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    arch, reader = open_hf_checkpoint(hf_dir)
    arch.check_tensor_parallel(tensor_parallel_size)
    arch.check_pipeline_parallel(pipeline_parallel_size)
    dtype = params_dtype or reader.main_dtype()
    with staged_output_dir(out_dir, overwrite, mcore_io.holds_mcore_checkpoint) as staging:
        job = _ImportJob(str(hf_dir), str(staging), tensor_parallel_size, pipeline_parallel_size, dtype,
                         make_vocab_size_divisible_by, progress)
        run_local_workers(_import_worker, tensor_parallel_size * pipeline_parallel_size, job)
        copy_non_weight_files(hf_dir, staging / mcore_io.HF_FILES_DIR)
        mcore_io.fsync_tree(staging)
        meta = mcore_io.write_checkpoint_meta(
            staging,
            arch,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            padded_vocab_size=arch.padded_vocab_size(tensor_parallel_size, make_vocab_size_divisible_by),
            params_dtype=dtype,
            source=str(hf_dir.absolute()),
        )
    return meta


# ------------------------------------------------------------------------------------------
# megatron-core -> HF


def _hf_tensor_plan(arch, dtype: torch.dtype) -> list[tuple[str, int]]:
    shapes = expected_hf_shapes(arch)
    itemsize = torch.empty((), dtype=dtype).element_size()
    order = [name for mapping in concrete_mappings(arch) for name in mapping.hf]
    return [(name, int(torch.Size(shapes[name]).numel()) * itemsize) for name in order]


def _iter_hf_tensors(ckpt_dir: Path, arch, dtype: torch.dtype, metadata: dict):
    shapes = expected_hf_shapes(arch)
    for mapping in weight_mappings(arch):
        stacked = mcore_io.load_global_tensor(ckpt_dir, mapping.checkpoint_key, metadata, dtype=dtype)
        layers = [(mapping.for_layer(i), stacked[i]) for i in range(arch.num_layers)] if mapping.per_layer else [(mapping, stacked)]
        if mapping.per_layer and stacked.shape[0] != arch.num_layers:
            raise CheckpointError(
                f"{ckpt_dir}: '{mapping.checkpoint_key}' stacks {stacked.shape[0]} layers, config has {arch.num_layers}"
            )
        for concrete, tensor in layers:
            for name, hf_tensor in global_to_hf(concrete, tensor, arch).items():
                if tuple(hf_tensor.shape) != shapes[name]:
                    raise CheckpointError(
                        f"{ckpt_dir}: '{mapping.checkpoint_key}' gives '{name}' of shape "
                        f"{list(hf_tensor.shape)}, config implies {list(shapes[name])}"
                    )
                yield name, hf_tensor
        del stacked, layers


def _write_hf_config(src_dir: Path, out_dir: Path, dtype: torch.dtype) -> None:
    config = json.loads((src_dir / "config.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    for key in keys:
        config[key] = dtype_name
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Convert an sdzero-mcore checkpoint (any TP) into a HF checkpoint directory.

    Returns the weight files written. The result loads with
    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``.
    """
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    arch = mcore_io.checkpoint_arch(mcore_dir)
    with staged_output_dir(out_dir, overwrite, holds_hf_checkpoint) as staging:
        with mcore_io.single_process_group():
            metadata = mcore_io.checkpoint_tensor_metadata(mcore_dir)
            out_dtype = dtype or metadata["embedding.word_embeddings.weight"].dtype
            plan = _hf_tensor_plan(arch, out_dtype)
            tensors = tqdm(
                _iter_hf_tensors(mcore_dir, arch, out_dtype, metadata),
                total=len(plan),
                desc="writing HF weights",
                unit="tensor",
                disable=not progress,
            )
            written = write_safetensors(staging, plan, tensors, max_shard_bytes)
        hf_files = mcore_dir / mcore_io.HF_FILES_DIR
        copy_non_weight_files(hf_files, staging)
        _write_hf_config(hf_files, staging, out_dtype)
        mcore_io.fsync_tree(staging)
    return [out_dir / path.name for path in written]


# ------------------------------------------------------------------------------------------
# Command line


def run_convert(args: argparse.Namespace) -> int:
    """Run a parsed convert command; user errors print one line and return 2."""
    try:
        if args.direction == "hf-to-mcore":
            meta = hf_to_mcore(
                args.hf_dir,
                args.out_dir,
                args.tp,
                params_dtype=DTYPE_CHOICES[args.dtype],
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                pipeline_parallel_size=args.pp,
            )
            print(
                f"wrote {meta['architecture']} megatron-core checkpoint to {args.out_dir} "
                f"(TP={meta['tensor_parallel_size']}, PP={meta['pipeline_parallel_size']}, vocab {meta['vocab_size']} padded to "
                f"{meta['padded_vocab_size']}, {meta['params_dtype']})"
            )
        else:
            written = mcore_to_hf(
                args.mcore_dir,
                args.out_dir,
                dtype=DTYPE_CHOICES[args.dtype],
                max_shard_bytes=parse_size(args.max_shard_size),
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
            print(f"wrote HF checkpoint to {args.out_dir} ({len(written)} files)")
    except (CheckpointError, UnsupportedModelError, OutputExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_dependency_warnings()
    parser = argparse.ArgumentParser(prog="convert_checkpoint", description=__doc__.split("\n")[0])
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))
