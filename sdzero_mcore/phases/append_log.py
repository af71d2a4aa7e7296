"""Append-only sample logs (Phase 1 collection, RFT sampling) are tied to the config that wrote them."""

from __future__ import annotations

import json
from pathlib import Path

from sdzero_mcore.config import ConfigError


def check_log_hash(log: Path, chash: str, problem: str) -> None:
    """Refuse an append-only log whose first record carries another ``config_hash`` (before any work)."""
    if not log.is_file():
        return
    with log.open() as handle:
        first = handle.readline()
    try:
        found = json.loads(first).get("config_hash") if first.strip() else None
    except json.JSONDecodeError:
        return  # a cut first line: the log's reader drops it
    if found is not None and found != chash:
        raise ConfigError(f"{log} {problem} (hash {found}, this one {chash}); "
                          "use another output_dir or delete the log to start over")
