"""Checks a command's inputs before it does any work: the CLI calls ``check_before_work`` after
loading the config and before dispatching a phase, so a bad key, path or data row stops the run
with one line (exit 2) before any model loads and before anything is written.

What is checked:
- ``output_dir`` (or ``sdzero eval --out``): not a file, and creatable and writable where it would
  be created (the nearest existing ancestor is a writable directory). The config already refuses
  an empty one.
- ``distill.top_k`` against the vocabulary in the starting checkpoint's config.json (for
  ``distill`` and ``run``, so ``run`` cannot finish Phase 1 first).
- The data: the rows are loaded and validated (NaN answers, oversized rows, duplicate ids with
  different content, prompts over ``data.max_prompt_tokens`` counted with the run's tokenizer)
  and split, for the commands that read them. The phases load them again with their tokenizer
  (``data.question_sets.phase_questions``), so the same limit holds there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from sdzero_mcore.checkpoint.source import LATEST_FILE
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import prompt_ids
from sdzero_mcore.data.question_sets import phase_questions

__all__ = ["DATA_COMMANDS", "check_before_work", "check_output_dir", "find_hf_files_dir", "vocab_size"]

# Commands whose phases load and split the training questions.
DATA_COMMANDS = ("sft", "srt-collect", "distill", "run", "rft", "grpo")
# Commands that use distill.top_k.
TOP_K_COMMANDS = ("distill", "run")


def check_before_work(cfg: SDZeroConfig, command: str, *, init_from: Optional[str] = None, out: Optional[str] = None) -> None:
    """Raise ConfigError or DataError (naming the key, file, row or field) if ``command`` cannot
    run with ``cfg``."""
    if command == "eval":
        if out is not None:
            check_output_dir(out, "--out")
    else:
        check_output_dir(cfg.output_dir, "output_dir")
    hf_dir = find_hf_files_dir(cfg, init_from)
    if command in TOP_K_COMMANDS and hf_dir is not None:
        vocab = vocab_size(hf_dir)
        if vocab is not None and cfg.distill.top_k > vocab:
            raise ConfigError(
                f"distill.top_k ({cfg.distill.top_k}) is larger than the vocabulary ({vocab} tokens in "
                f"{hf_dir / 'config.json'}); set distill.top_k <= {vocab}"
            )
    if command in DATA_COMMANDS:
        tokenizer = _load_tokenizer(hf_dir, cfg.data.prompt_template) if hf_dir is not None else None
        phase_questions(cfg, tokenizer)  # the phases' own loading and split, with the same tokenizer


def check_output_dir(path_text: str, key: str) -> None:
    """``path_text`` can be used as an output directory: ConfigError naming ``key`` otherwise.
    Nothing is created: the nearest existing ancestor must be a directory this process may write."""
    if not path_text.strip():
        raise ConfigError(f"{key} is empty; give the directory to write to")
    path = Path(path_text).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file, not a directory")
    # os.access also reports a read-only filesystem, which permission bits (and root) do not.
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"{key}: {path} {what} (uid {os.geteuid()})")


def find_hf_files_dir(cfg: SDZeroConfig, init_from: Optional[str]) -> Optional[Path]:
    """The directory with config.json and the tokenizer of the checkpoint the command starts from:
    --init-from, else model.mcore_dir, else model.hf_dir (an sdzero-mcore checkpoint keeps them in
    hf/, a phase's checkpoint directory in its newest step's hf/). None when none is found: the
    phase then reports the missing checkpoint itself."""
    for candidate in (init_from, cfg.model.mcore_dir, cfg.model.hf_dir):
        if not candidate:
            continue
        root = Path(candidate).expanduser()
        steps = []
        pointer = root / LATEST_FILE
        if pointer.is_file():
            steps.append(root / pointer.read_text().strip())
        steps += sorted(root.glob("step_*"), reverse=True)
        for directory in (root, root / "hf", *(step / "hf" for step in steps)):
            if (directory / "config.json").is_file():
                return directory
    return None


def vocab_size(hf_dir: Path) -> Optional[int]:
    """The vocabulary size config.json declares (a multimodal config's text_config too), or None."""
    path = hf_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    for section in (config, config.get("text_config") or {}):
        value = section.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _load_tokenizer(hf_dir: Path, template: str) -> Any:
    from transformers import AutoTokenizer  # here: importing transformers takes seconds

    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load the tokenizer from {hf_dir} (to count data.max_prompt_tokens): {err}") from None
    try:
        prompt_ids(tokenizer, "1 + 1 = ?", template=template)
    except ValueError as err:
        raise ConfigError(f"data.prompt_template: {err}") from None
    return tokenizer
