"""Where a phase's weights come from: an sdzero-mcore checkpoint, a phase's checkpoint directory, or a HF model.

A phase writes ``<run>/checkpoints/<phase>/step_NNNNNNN`` directories (staged, then renamed, so a
``step_*`` directory is always complete) and a ``latest`` pointer; the one a finished run wrote
last is marked ``final`` in its metadata. These functions find them and check a path before any
work starts, naming the config key or flag it came from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdzero_mcore.checkpoint.mcore_io import HF_FILES_DIR, META_FILE, read_checkpoint_meta
from sdzero_mcore.config import ConfigError, SDZeroConfig

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"


@dataclass
class ModelSource:
    """Where a phase's starting weights are: an sdzero-mcore checkpoint or a HF directory."""

    path: Path
    kind: str  # "mcore" | "hf"

    @property
    def hf_files_dir(self) -> Path:
        """The directory with config.json and the tokenizer files."""
        return self.path / HF_FILES_DIR if self.kind == "mcore" else self.path


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete step checkpoint under ``root`` (incomplete ones are never named ``step_*``)."""
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / META_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / META_FILE).is_file())
    return complete[-1] if complete else None


def final_checkpoint(root: Path) -> Optional[Path]:
    """The newest checkpoint under ``root`` if it is the one a finished run wrote last."""
    latest = latest_checkpoint(root)
    return latest if latest is not None and read_checkpoint_meta(latest).get("final") else None


def resolve_model_source(path: str | Path, what: str) -> ModelSource:
    """Check a checkpoint path before any work starts; the error names ``what`` (a config key)."""
    path = Path(path)
    latest = latest_checkpoint(path) if (path / LATEST_FILE).is_file() else None
    if latest is not None:
        # a phase's checkpoint directory: its final checkpoint, else (a run still going or stopped) its newest
        final = final_checkpoint(path)
        if final is None:
            logger.warning("%s: %s has no final checkpoint; using its newest, %s", what, path, latest.name)
        path = final or latest
    if (path / META_FILE).is_file():
        return ModelSource(path, "mcore")
    if (path / "config.json").is_file():
        return ModelSource(path, "hf")
    if not path.exists():
        raise ConfigError(f"{what}: checkpoint {path} does not exist")
    raise ConfigError(
        f"{what}: {path} is neither an sdzero-mcore checkpoint (no {META_FILE}) nor a HF model directory "
        "(no config.json)"
    )


def start_source(cfg: SDZeroConfig, init_from: Optional[str], *, prefer_mcore: bool = False) -> ModelSource:
    """The checkpoint a phase starts from: ``init_from``, else model.hf_dir / model.mcore_dir
    (model.mcore_dir first with ``prefer_mcore``: Phase 2 starts from the SRT checkpoint)."""
    keys = ("mcore_dir", "hf_dir") if prefer_mcore else ("hf_dir", "mcore_dir")
    if init_from is not None:
        return resolve_model_source(init_from, "--init-from")
    for key in keys:
        if getattr(cfg.model, key):
            return resolve_model_source(getattr(cfg.model, key), f"model.{key}")
    raise ConfigError(f"set model.{keys[0]} or model.{keys[1]} (or --init-from): the checkpoint this phase starts from")
