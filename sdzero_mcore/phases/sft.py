"""``sdzero sft``: supervised fine-tuning on worked solutions (prompt x -> solution + EOS).

The embedded demo's step 0: a tiny model trained from scratch on a synthetic task's generated
solutions becomes a base model that partly solves the task, so that Phase 1 finds correct
revisions to learn from. It works on any data with a solution field (``data.solution_field``).
The questions are the Phase 1 and Phase 2 questions' complement: those generated past
``phase1_questions + phase2_questions`` (synthetic tasks), so the base never sees them solved.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.phases import common

PHASE = "sft"


class SFTExample(NamedTuple):
    completion: "object"  # data.prompts.CompletionExample: loss on the solution and its EOS


def sft_examples(questions, tokenizer, template: str, max_len: int) -> list[SFTExample]:
    from sdzero_mcore.data.prompts import CompletionExample, prompt_ids

    examples = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for q in questions:
        if not q.solution:
            continue
        x = prompt_ids(tokenizer, q.question, template=template)
        y = tokenizer.encode(" " + q.solution, add_special_tokens=False) + eos
        if len(x) + len(y) <= max_len:
            examples.append(SFTExample(CompletionExample(x + y, loss_start=len(x), loss_end=len(x) + len(y))))
    return examples


def sft_questions(cfg: SDZeroConfig, count: int) -> list:
    """``count`` synthetic questions disjoint from both phases (same generator, later rows)."""
    from dataclasses import replace

    from sdzero_mcore.data import load_from_config

    if not cfg.data.dataset.startswith("synthetic:"):
        raise ConfigError("sdzero sft generates its data from a synthetic task: set data.dataset=synthetic:<task>")
    phase1, phase2 = common.phase_questions(cfg)
    used = {q.id for q in phase1} | {q.id for q in phase2}
    needed = cfg.data.phase1_questions + cfg.data.phase2_questions + count
    loaded = load_from_config(replace(cfg.data, synthetic_size=needed * 2))
    fresh = [q for q in loaded.questions if q.id not in used]
    return fresh[:count]


def run_sft(cfg: SDZeroConfig, init_from: Optional[str] = None, *, examples: int = 2000,
            max_steps: Optional[int] = None) -> Path:
    from sdzero_mcore.phases.srt_train import train_completion_stage

    source = common.start_source(cfg, init_from)
    common.check_layout(cfg, source)
    tokenizer = common.load_tokenizer(source)
    data = sft_examples(sft_questions(cfg, examples), tokenizer, cfg.data.prompt_template, cfg.srt_train.max_seq_length)
    if not data:
        raise ConfigError("sdzero sft: no question with a solution fits srt_train.max_seq_length")
    common.setup_parallel(cfg)
    return train_completion_stage(cfg, source, data, ("completion",), PHASE, cfg.srt_train, common.pad_id(tokenizer),
                                  max_steps=max_steps)
