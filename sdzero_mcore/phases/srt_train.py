"""Phase 1 training (``sdzero srt-train``) on D_revision, in one of two modes.

For each kept record (x, y_init, P_r, y_rev), through the run's prompt layouts
(``data.prompts.RunPrompts``):

* ``mode=joint`` (the paper, Eq. 3): L_SRT = L_revision + L_generation on one sequence
  x + y_init + sep(P_r) + y_rev: the NLL of y_rev given x + y_init + P_r, plus the NLL of
  [y_init, P_r, y_rev] given x; each a completion-only token mean over the global batch, summed,
  one forward pass scoring both. Both prompts must then be the same assistant-turn layout.
* ``mode=sequential`` (the release): two SFT runs one after the other. Stage 1 (generation):
  ``prompts.srt_generation`` x -> y_init + sep(P_r) + y_rev; stage 2 (revision):
  ``prompts.srt_revision`` (the release: x + y_init + P_r in the user turn) -> y_rev. Stage 2
  trains on ``stage2_size`` tuples and stage 1 on the rest (null: every tuple in both).

Every completion ends with one end token. Records longer than ``max_seq_length`` are dropped and
counted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple, Optional

from sdzero_mcore.checkpoint.source import ModelSource, start_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import CompletionExample, RunPrompts
from sdzero_mcore.phases.completion import train_completion_stage
from sdzero_mcore.phases.srt_collect import REVISION_FILE, collect_dir
from sdzero_mcore.run_setup import check_layout, free_finished_models, load_tokenizer, pad_id, run_prompts, setup_parallel

PHASE = "srt"


class SRTRecord(NamedTuple):
    """The two terms of one kept tuple; under ``joint`` both hold the same ids."""

    revision: CompletionExample  # L_revision: y_rev given (x, y_init, P_r)
    generation: CompletionExample  # L_generation: [y_init, P_r, y_rev] given x
    r_init: int


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"srt-train: D_revision file {path} does not exist (run srt-collect first)")
    records = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            records.append({key: record[key] for key in ("x", "y_init_ids", "r_init", "y_rev_ids")})
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(f"{path}:{line_no}: not a D_revision record (missing or bad {error})") from None
    return records


def load_examples(path: Path, prompts: RunPrompts, max_len: int) -> list[SRTRecord]:
    """The SRT examples of a D_revision file; tuples longer than ``max_len`` tokens are dropped (counted)."""
    examples, too_long = [], 0
    for line_no, record in enumerate(read_records(path), 1):
        try:
            args = (record["x"], record["y_init_ids"], record["r_init"], record["y_rev_ids"])
            pair = SRTRecord(prompts.srt_revision(*args), prompts.srt_generation(*args), int(record["r_init"]))
        except ValueError as error:
            raise ConfigError(f"{path}:{line_no}: not a D_revision record ({error})") from None
        if max(len(pair.revision.ids), len(pair.generation.ids)) > max_len:
            too_long += 1
            continue
        examples.append(pair)
    if not examples:
        raise ConfigError(f"{path}: no SRT examples ({too_long} longer than srt_train.max_seq_length={max_len})")
    return examples


def final_stage(mode: str) -> str:
    """The stage whose final checkpoint is the SRT model."""
    return "srt" if mode == "joint" else "srt_revision"


def srt_stages(cfg: SDZeroConfig, examples: list[SRTRecord]) -> list[tuple[str, tuple[str, ...], list]]:
    """(stage name, loss terms, examples) in training order."""
    tcfg = cfg.srt_train
    if tcfg.mode == "joint":
        if any(e.revision.ids != e.generation.ids for e in examples):
            raise ConfigError(
                "srt_train.mode=joint scores both terms on one sequence: prompts.srt_revision must equal "
                "prompts.srt_generation, with attempt: assistant (or use srt_train.mode=sequential)"
            )
        return [("srt", ("revision", "generation"), examples)]
    if tcfg.stage2_size is None:
        return [("srt_generation", ("generation",), examples), ("srt_revision", ("revision",), examples)]
    if tcfg.stage2_size >= len(examples):
        raise ConfigError(
            f"srt_train.stage2_size ({tcfg.stage2_size}) leaves no tuple for the generation stage: D_revision has "
            f"{len(examples)} usable tuples"
        )
    # stage 2 draws corrections of wrong attempts first (with revise_correct off every tuple is one)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    order.sort(key=lambda i: examples[i].r_init)
    revision_set = set(order[: tcfg.stage2_size])
    stage1 = [e for i, e in enumerate(examples) if i not in revision_set]
    stage2 = [e for i, e in enumerate(examples) if i in revision_set]
    return [("srt_generation", ("generation",), stage1), ("srt_revision", ("revision",), stage2)]


def run_srt_train(cfg: SDZeroConfig, init_from: Optional[str] = None, d_revision: Optional[str] = None,
                  *, max_steps: Optional[int] = None) -> Path:
    """Train on D_revision; returns the final checkpoint of the last stage."""
    tcfg = cfg.srt_train
    source = start_source(cfg, init_from)
    check_layout(cfg, source)
    tokenizer = load_tokenizer(source)
    examples = load_examples(Path(d_revision or collect_dir(cfg) / REVISION_FILE), run_prompts(cfg, source, tokenizer),
                             tcfg.max_seq_length)
    stages = srt_stages(cfg, examples)
    setup_parallel(cfg)
    final = None
    for stage, terms, stage_examples in stages:
        final = train_completion_stage(cfg, source, stage_examples, terms, stage, tcfg, pad_id(tokenizer),
                                       max_steps=max_steps)
        source = ModelSource(final, "mcore")
        free_finished_models()  # the stage's model and optimizer, before the next stage builds its own
    return final
