"""The one sample type that flows from the rollout engine to a loss, as token ids.

A response is never re-tokenised: the ids the engine sampled are the ids the losses train on.
Phase 2 and SDFT fill in what the teacher reads before the response; GRPO fills in the advantage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


@dataclass(frozen=True)
class Sample:
    """One scored response to one prompt."""

    question_index: int  # into the phase's question list
    prompt_ids: list[int]  # x
    response_ids: list[int]  # y, as sampled
    reward: int = 0
    finish_reason: str = "stop"
    teacher_prefix_ids: Optional[list[int]] = None  # Phase 2: x + y + sep + P_r + sep (SDFT: x + gold + P_r)
    advantage: float = 0.0  # GRPO: the reward normalised within its group

    def with_teacher(self, prefix_ids: list[int], response_ids: list[int]) -> "Sample":
        """This sample as Phase 2 trains on it: the teacher's prefix and the (possibly cut) response."""
        return replace(self, teacher_prefix_ids=list(prefix_ids), response_ids=list(response_ids))
