"""The generation budget of each phase (the paper's Appendix C.2: generations and generated tokens).

Every phase that samples writes ``<run>/budget/<phase>.json`` before its completion marker, so a
comparison at matched budget reads what each method actually generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sdzero_mcore.config import ConfigError
from sdzero_mcore.fileio import atomic_write_text

BUDGET_DIR = "budget"


def record_budget(run_dir: str | Path, phase: str, generations: int, generated_tokens: int) -> None:
    """Write what ``phase`` generated to ``run_dir/budget/<phase>.json`` (atomically, replacing)."""
    path = Path(run_dir) / BUDGET_DIR / f"{phase}.json"
    atomic_write_text(path, json.dumps({"generations": int(generations), "generated_tokens": int(generated_tokens)}) + "\n")


def read_budget(run_dir: str | Path, phases: Sequence[str]) -> dict:
    """The summed budget of ``phases`` in ``run_dir``; a phase without a record is an error."""
    total = {"generations": 0, "generated_tokens": 0}
    for phase in phases:
        path = Path(run_dir) / BUDGET_DIR / f"{phase}.json"
        if not path.is_file():
            raise ConfigError(f"no generation budget recorded for phase {phase!r}: {path} does not exist")
        record = json.loads(path.read_text())
        for key in total:
            total[key] += int(record[key])
    return total
