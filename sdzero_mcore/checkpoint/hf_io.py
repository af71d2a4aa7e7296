"""Reading and writing HF safetensors checkpoints (single file or sharded with an index).

The reader checks every shard's header against its file before anything is converted, so a
missing, corrupt or truncated shard is reported up front with its file name, and reads only the
slices a tensor-parallel rank needs (safetensors slices are memory-mapped reads).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# HF checkpoints of some vintages carry buffers that are derived, not learned.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete, corrupt or does not match its config."""


class _TensorInfo:
    __slots__ = ("file", "dtype", "shape")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...]):
        self.file, self.dtype, self.shape = file, dtype, shape


def _read_header(path: Path) -> dict[str, _TensorInfo]:
    """Parse and check a safetensors header: every tensor must lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: corrupt safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: corrupt safetensors file (header length {header_len} exceeds file size {size})"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: corrupt entry for tensor '{name}': {end - begin} bytes for shape {list(shape)}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated: tensor '{name}' needs {end} data bytes, the file holds {data_size}"
            )
        tensors[name] = _TensorInfo(path, dtype, shape)
    return tensors


class HFCheckpointReader:
    """The safetensors weights of a HF checkpoint directory (a :class:`TensorSource`)."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: HF checkpoint directory does not exist")
        self.tensors: dict[str, _TensorInfo] = {}
        for path, expected_names in self._shard_files():
            header = _read_header(path)
            for name in expected_names or ():
                if name not in header:
                    raise CheckpointError(
                        f"{self.dir / INDEX_FILE}: tensor '{name}' is mapped to {path.name}, which does not contain it"
                    )
            self.tensors.update(header)
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[tuple[Path, Optional[list[str]]]]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: corrupt index ({err!r})") from None
            by_file: dict[str, list[str]] = {}
            for name, file in weight_map.items():
                by_file.setdefault(file, []).append(name)
            for file, names in by_file.items():
                if not (self.dir / file).is_file():
                    raise CheckpointError(
                        f"{index}: shard {file} is missing from {self.dir} "
                        f"(it should hold {len(names)} tensors, e.g. '{names[0]}')"
                    )
            return [(self.dir / file, names) for file, names in sorted(by_file.items())]
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in self.dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
            hint = f" (found {', '.join(others)}; re-save it with safetensors)" if others else ""
            raise CheckpointError(f"{self.dir}: no safetensors weights{hint}")
        return [(path, None) for path in files]

    # TensorSource ------------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        info = self._info(name)
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), framework="pt")
        if dim is None:
            return handle.get_tensor(name)
        index = (slice(None),) * dim + (slice(start, stop),)
        return handle.get_slice(name)[index]

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: checkpoint has no tensor '{name}'") from None

    # Checks -------------------------------------------------------------------------------

    def check_against(self, expected: dict[str, tuple[int, ...]], config_source: str, optional: Sequence[str] = ()) -> None:
        """Every expected tensor present with the shape the config implies, and nothing unknown."""
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            shown = ", ".join(f"'{name}'" for name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.dir}: missing tensors {shown}{more} that {config_source} requires")
        for name, shape in expected.items():
            info = self.tensors[name]
            if info.shape != tuple(shape):
                raise CheckpointError(
                    f"{info.file}: tensor '{name}' has shape {list(info.shape)}, "
                    f"but {config_source} implies {list(shape)}"
                )
        unexpected = sorted(
            name
            for name in set(self.tensors) - set(expected) - set(optional)
            if not name.endswith(IGNORABLE_SUFFIXES)
        )
        if unexpected:
            shown = ", ".join(f"'{name}'" for name in unexpected[:5])
            raise CheckpointError(
                f"{self.dir}: tensors {shown} are not part of the architecture in {config_source}"
            )

    def main_dtype(self) -> torch.dtype:
        """The dtype holding most of the parameters (what the checkpoint was saved in)."""
        count: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            count[info.dtype] = count.get(info.dtype, 0) + math.prod(info.shape)
        return max(count, key=count.get)


def plan_shards(entries: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Group (name, nbytes) in order into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in entries:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors(
    out_dir: Path,
    planned: Sequence[tuple[str, int]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    max_shard_bytes: int,
) -> list[Path]:
    """Write ``tensors`` (arriving in the planned order) as HF shards plus an index if there are several.

    Only the current shard is held in memory. ``planned`` gives each name and its byte size so
    that shard file names (``-of-N``) are known before the first is written.
    """
    shards = plan_shards(planned, max_shard_bytes)
    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:
        file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    tensors = iter(tensors)
    written, weight_map, total = [], {}, 0
    for names, file_name in zip(shards, file_names):
        buffer = {}
        for expected_name in names:
            name, tensor = next(tensors)
            if name != expected_name:
                raise AssertionError(f"tensor {name!r} arrived where {expected_name!r} was planned")
            buffer[name] = tensor.contiguous()
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
        path = out_dir / file_name
        save_file(buffer, str(path), metadata={"format": "pt"})
        written.append(path)
    if next(tensors, None) is not None:
        raise AssertionError("more tensors arrived than were planned")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / INDEX_FILE)
    return written


def copy_non_weight_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy config, generation config, tokenizer and template files (everything but weights)."""
    copied = []
    dst_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.name != INDEX_FILE:
            shutil.copy2(path, dst_dir / path.name)
            copied.append(path.name)
    return copied
