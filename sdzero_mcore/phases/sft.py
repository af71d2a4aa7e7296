"""``sdzero sft``: supervised fine-tuning on worked solutions (prompt x -> solution + EOS).

The embedded demo's step 0: a tiny model trained from scratch on a synthetic task's generated
solutions becomes a base model that partly solves the task, so that Phase 1 finds correct
revisions to learn from. ``sft.noise`` makes that fraction of the solutions wrong, which keeps
the base's accuracy well below 100%: for ``add`` one step's sum is off and the rest follows
from it (an error a reviser can find by re-reading), for ``arith`` the final answer is replaced.
The base sees every prompt layout of the run's recipe that asks for an answer (collection,
student, eval, SRT generation), as an instruct model would have.
``sft.revision_fraction`` gives the base what an instruct model brings to the paper's setting:
after a P_r it answers again (and restates a right answer). It never learns to write a P_r
itself; that, and revising towards correct answers, is what SRT teaches. The questions are
disjoint from both phases and from the held-out evaluation questions.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from sdzero_mcore.checkpoint.source import start_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import CompletionExample, RunPrompts, solution_ids
from sdzero_mcore.data.question_sets import (
    SYNTHETIC_HELDOUT_RESERVED,
    fresh_synthetic_questions,
    heldout_questions,
    phase_question_ids,
)
from sdzero_mcore.phases.completion import train_completion_stage
from sdzero_mcore.rewards.synthetic import flawed_add_solution
from sdzero_mcore.run_setup import check_layout, load_tokenizer, pad_id, run_prompts, setup_parallel

PHASE = "sft"


class SFTExample(NamedTuple):
    completion: "object"  # data.prompts.CompletionExample: loss on the solution and its EOS


def noisy_solution(solution: str, answer: str, rng: random.Random) -> str:
    """``solution`` with its integer final answer replaced by a nearby wrong one, everywhere it is stated."""
    if not re.fullmatch(r"-?\d+", answer.strip()):
        raise ConfigError(f"sft.noise and sft.revision_fraction need integer answers (synthetic:arith or synthetic:add), got {answer!r}")
    value = int(answer)
    wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
    noisy, count = re.subn(rf"(?<![\d-]){re.escape(answer.strip())}(?!\d)(?=\s*(\}}|$))", str(wrong), solution, flags=re.M)
    if count == 0:  # a "wrong" solution that still states the right answer would be mislabelled
        raise ConfigError(f"cannot make a wrong version of a solution: its final answer {answer!r} is not stated in it")
    return noisy


def wrong_solution(question, rng: random.Random) -> str:
    """A wrong worked solution of ``question``: a flawed step for ``add``, a wrong final answer otherwise."""
    if question.extra.get("task") == "add":
        return flawed_add_solution(question.question, rng)
    return noisy_solution(question.solution, question.answer, rng)


# the phases whose prompt asks for a first answer, and those that revise in the assistant turn
ANSWER_PHASES = ("collection", "student", "eval", "srt_generation")
REVISION_PHASES = ("collection", "eval")


def distinct_phases(prompts: RunPrompts, phases: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for phase in phases:
        if prompts.layouts[phase] not in seen:
            seen.add(prompts.layouts[phase])
            out.append(phase)
    return out


def sft_examples(questions, prompts: RunPrompts, max_len: int, *, noise: float = 0.0,
                 revision_fraction: float = 0.0, seed: int = 0) -> list[SFTExample]:
    """x -> solution + EOS examples, x in one of the recipe's answer layouts; ``revision_fraction`` of
    them in the reviser's format instead: x + y_a + P_r(r_a) + y_b, loss on y_b + EOS, where y_a is
    right or wrong with equal odds, y_b restates y_a when it is right and is a fresh (possibly
    wrong) solution when it is wrong."""
    examples = []
    tokenizer = prompts.tokenizer
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answer_phases, revision_phases = distinct_phases(prompts, ANSWER_PHASES), distinct_phases(prompts, REVISION_PHASES)
    for q in questions:
        if not q.solution:
            continue
        rng = random.Random(f"{seed}:{q.id}")
        solution = wrong_solution(q, rng) if noise and rng.random() < noise else q.solution
        phase = answer_phases[rng.randrange(len(answer_phases))] if len(answer_phases) > 1 else answer_phases[0]
        context = prompts.prompt(phase, q.question)
        if revision_fraction and rng.random() < revision_fraction:
            r_a = int(rng.random() < 0.5)
            y_a = q.solution if r_a else wrong_solution(q, rng)
            phase = revision_phases[rng.randrange(len(revision_phases))] if len(revision_phases) > 1 else revision_phases[0]
            context = prompts.revision(phase, q.question, solution_ids(tokenizer, y_a), r_a)
            solution = y_a if r_a else solution
        y = solution_ids(tokenizer, solution) + eos
        if len(context) + len(y) <= max_len:
            examples.append(SFTExample(CompletionExample(context + y, loss_start=len(context), loss_end=len(context) + len(y))))
    return examples


def sft_questions(cfg: SDZeroConfig, count: int) -> list:
    """``count`` synthetic questions disjoint from both phases and the held-out evaluation set."""
    if not cfg.data.dataset.startswith("synthetic:"):
        raise ConfigError("sdzero sft generates its data from a synthetic task: set data.dataset=synthetic:<task>")
    phase_ids = phase_question_ids(cfg)
    heldout = heldout_questions(cfg, SYNTHETIC_HELDOUT_RESERVED, phase_ids=phase_ids)
    used = phase_ids | {q.id for q in heldout}
    fresh = fresh_synthetic_questions(cfg, 2 * (count + len(used)), used)
    if len(fresh) < count:
        raise ConfigError(f"sft.examples ({count}): the task {cfg.data.dataset} has only {len(fresh)} questions left "
                          "after the phases and the held-out set")
    return fresh[:count]


def run_sft(cfg: SDZeroConfig, init_from: Optional[str] = None, *, max_steps: Optional[int] = None) -> Path:
    scfg = cfg.sft
    source = start_source(cfg, init_from)
    check_layout(cfg, source)
    tokenizer = load_tokenizer(source)
    data = sft_examples(sft_questions(cfg, scfg.examples), run_prompts(cfg, source, tokenizer), scfg.max_seq_length,
                        noise=scfg.noise, revision_fraction=scfg.revision_fraction, seed=cfg.seed)
    if not data:
        raise ConfigError("sdzero sft: no question with a solution fits sft.max_seq_length")
    setup_parallel(cfg)
    return train_completion_stage(cfg, source, data, ("completion",), PHASE, scfg, pad_id(tokenizer),
                                  max_steps=max_steps)
