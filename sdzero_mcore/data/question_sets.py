"""Which questions each stage uses: Phase 1 and Phase 2 (from the data section), and, for a
synthetic task, step 0's fresh questions and the held-out evaluation questions (disjoint from both)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.loading import load_from_config
from sdzero_mcore.data.split import split_phases

SYNTHETIC_HELDOUT_RESERVED = 500  # reserved for evaluation; step 0 (sft) never trains on them


def phase_questions(cfg: SDZeroConfig, tokenizer=None) -> tuple[list, list]:
    """(phase 1, phase 2) questions: loaded, validated and split as the data section says; with the
    run's ``tokenizer``, prompts over ``data.max_prompt_tokens`` are an error or skipped (``data.long_prompts``)."""
    data = cfg.data
    loaded = load_from_config(data, prompt_tokenizer=tokenizer)
    if data.phase2_dataset is None:
        return split_phases(loaded.questions, data.phase1_questions, data.phase2_questions, data.split_seed)
    phase1, _ = split_phases(loaded.questions, data.phase1_questions, 0, data.split_seed)
    other = load_from_config(replace(data, dataset=data.phase2_dataset, split=data.phase2_split, synthetic_size=None),
                             prompt_tokenizer=tokenizer)
    used = {q.id for q in phase1}
    _, phase2 = split_phases([q for q in other.questions if q.id not in used], 0, data.phase2_questions, data.split_seed)
    return phase1, phase2


def phase_question_ids(cfg: SDZeroConfig) -> set[str]:
    phase1, phase2 = phase_questions(cfg)
    return {q.id for q in phase1 + phase2}


def fresh_synthetic_questions(cfg: SDZeroConfig, size: int, exclude: set[str], *, seed_offset: int = 0) -> list:
    """The distinct questions among ``size`` rows of the synthetic task (generator seed
    ``data.synthetic_seed + seed_offset``) whose ids are not in ``exclude``, in generation order."""
    data = replace(cfg.data, synthetic_size=size, synthetic_seed=cfg.data.synthetic_seed + seed_offset)
    return list({q.id: q for q in load_from_config(data).questions if q.id not in exclude}.values())


def heldout_questions(cfg: SDZeroConfig, count: int, *, phase_ids: Optional[set[str]] = None) -> list:
    """``count`` questions of the synthetic task that neither phase uses (another generator seed).
    ``phase_ids``: both phases' question ids when the caller has them already."""
    if not cfg.data.dataset.startswith("synthetic:"):
        raise ConfigError("held-out questions are generated for synthetic tasks only; pass an eval dataset instead")
    if count > SYNTHETIC_HELDOUT_RESERVED:
        raise ConfigError(f"eval.questions ({count}) is more than the {SYNTHETIC_HELDOUT_RESERVED} held-out questions a synthetic task reserves")
    used = phase_question_ids(cfg) if phase_ids is None else phase_ids
    fresh = fresh_synthetic_questions(cfg, 2 * SYNTHETIC_HELDOUT_RESERVED + len(used), used, seed_offset=1)
    return fresh[:SYNTHETIC_HELDOUT_RESERVED][:count]
