"""The disjoint Phase 1 (SRT) / Phase 2 (self-distillation) split of the training questions.

The paper (docs/method.md): the training questions are split into N1 for Phase 1 and N2 for Phase 2, disjoint.
The split here depends only on the set of question ids and the seed:

- each question is ranked by ``sha256(f"{seed}:{id}")`` (not Python's ``hash()``, which is salted
  per process, and not ``random``, whose algorithms may change between Python versions);
- Phase 1 takes the first N1 of that ranking, Phase 2 the next N2.

So the split is the same in every process and for every input order, and growing N1 or N2 only
appends questions (a larger Phase 1 contains the smaller one). Questions that share an id are
one question: they are deduplicated before ranking, so an id can never be in both phases.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Sequence

from sdzero_mcore.data.questions import DataError, Question, question_content

__all__ = ["dedupe_by_id", "split_phases"]

logger = logging.getLogger(__name__)


def _content_key(q: Question) -> tuple:
    # Which of several same-id rows is kept must not depend on their order in the input, so the
    # choice is by content (then by origin), never by position in the list.
    return (*question_content(q), q.source, q.index)


def _id_groups(questions: Sequence[Question]) -> dict[str, list[Question]]:
    groups: dict[str, list[Question]] = {}
    for q in questions:
        groups.setdefault(q.id, []).append(q)
    return groups


def _differs(group: Sequence[Question]) -> bool:
    return len({question_content(q) for q in group}) > 1


def dedupe_by_id(questions: Sequence[Question]) -> tuple[list[Question], int, int]:
    """One question per id: ``(unique, removed, conflicting)``.

    ``removed`` counts the dropped rows; ``conflicting`` the ids whose rows differ in question,
    answer, tests or solution (worth a look: the same id naming different problems). Of a group
    the row with the smallest content key is kept, so the result does not depend on input order.
    """
    unique, removed, conflicting = [], 0, 0
    for group in _id_groups(questions).values():
        unique.append(min(group, key=_content_key))
        removed += len(group) - 1
        conflicting += _differs(group)
    return unique, removed, conflicting


def _describe_conflicts(questions: Sequence[Question], shown: int = 5) -> str:
    """The first ``shown`` ids whose rows differ, each with the rows (source and index) that carry it."""
    conflicts = [group for group in _id_groups(questions).values() if _differs(group)]
    text = "; ".join(
        f"id {group[0].id!r}: " + ", ".join(f"{q.source} row {q.index}" for q in group) for group in conflicts[:shown]
    )
    return text + (f"; and {len(conflicts) - shown} more" if len(conflicts) > shown else "")


def _rank(seed: int, question_id: str) -> bytes:
    return hashlib.sha256(f"{seed}:{question_id}".encode("utf-8")).digest()


def split_phases(
    questions: Sequence[Question], n_phase1: int, n_phase2: int, seed: int
) -> tuple[list[Question], list[Question]]:
    """Disjoint ``(phase1, phase2)`` of exactly ``n_phase1`` and ``n_phase2`` questions.

    Raises DataError when more questions are requested than there are unique ids.
    """
    for name, value in (("n_phase1", n_phase1), ("n_phase2", n_phase2), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if n_phase1 < 0 or n_phase2 < 0:
        raise ValueError(f"phase sizes must be >= 0, got n_phase1={n_phase1}, n_phase2={n_phase2}")

    unique, removed, conflicting = dedupe_by_id(questions)
    if removed:
        # Rows of one source with the same id and different content never get here (load_rows
        # stops or skips them); these repeat an id across sources, or repeat a row exactly.
        logger.warning(
            "data split: removed %d rows whose question id repeats another row's (%d ids with differing content%s); "
            "%d unique questions remain",
            removed, conflicting, f": {_describe_conflicts(questions)}" if conflicting else "", len(unique),
        )
    requested = n_phase1 + n_phase2
    if requested > len(unique):
        raise DataError(
            "phase split",
            f"phase 1 ({n_phase1}) + phase 2 ({n_phase2}) = {requested} questions requested, but only "
            f"{len(unique)} unique questions are available ({len(questions)} given, {removed} duplicate ids "
            "removed); lower data.phase1_questions / data.phase2_questions or add questions",
        )
    ranked = sorted(unique, key=lambda q: (_rank(seed, q.id), q.id))
    return ranked[:n_phase1], ranked[n_phase1:requested]
