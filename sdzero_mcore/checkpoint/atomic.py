"""Crash-safe output: a checkpoint directory appears complete or not at all.

Writers fill a hidden sibling staging directory (``.NAME.tmp-XXXX``) and rename it into place at the
end. A killed or failed write leaves at most that staging directory, which nothing mistakes for a
checkpoint; an existing checkpoint is replaced only with ``overwrite`` and only after the new one is
complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator


class OutputExistsError(FileExistsError):
    """The output directory already holds something we must not silently replace."""


def check_output_dir(out_dir: Path, overwrite: bool, holds_checkpoint: Callable[[Path], bool]) -> None:
    """Refuse an output path that is a file, a non-empty non-checkpoint directory, or (without
    ``overwrite``) an existing checkpoint."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not holds_checkpoint(out_dir):
        raise OutputExistsError(
            f"{out_dir}: exists, is not empty and holds no checkpoint; refusing to write into it "
            "(choose a new directory)"
        )
    if not overwrite:
        raise OutputExistsError(f"{out_dir}: already holds a checkpoint; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path, overwrite: bool, holds_checkpoint: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty staging directory; on success move it to ``out_dir``, on failure delete it."""
    out_dir = Path(out_dir).absolute()
    check_output_dir(out_dir, overwrite, holds_checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Re-check: another writer may have produced out_dir while this one was working.
    check_output_dir(out_dir, overwrite, holds_checkpoint)
    publish(staging, out_dir)


def publish(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``, moving an existing ``out_dir`` aside first."""
    previous = None
    if out_dir.exists():
        previous = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, previous)
    os.replace(staging, out_dir)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
