"""The result type and base class shared by every binary reward (math, code, synthetic tasks)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class RewardResult:
    """One scored response.

    reward: 1 when the response is judged correct, else 0 (SD-Zero only ever sees this bit).
    extracted: the final answer / program taken from the response; None when none was found.
    reason: short machine-readable cause, e.g. "correct", "wrong", "no_answer", "timeout", "error",
        "compile_error", "runtime_error" (each scorer documents the ones it uses).
    """

    reward: int
    extracted: Optional[str]
    reason: str

    def __post_init__(self) -> None:
        # Exactly int: a bool or float reward would flow through the trainer's arithmetic unnoticed,
        # but it means a scorer passed a comparison or a score where the bit was meant.
        if type(self.reward) is not int or self.reward not in (0, 1):
            raise ValueError(f"RewardResult.reward must be the int 0 or 1, got {self.reward!r}")
        if not isinstance(self.reason, str) or not self.reason:
            raise ValueError(f"RewardResult.reason must be a non-empty str, got {self.reason!r}")
        if self.extracted is not None and not isinstance(self.extracted, str):
            raise ValueError(f"RewardResult.extracted must be a str or None, got {type(self.extracted).__name__}")


def check_batch(responses: Sequence[str], answers: Sequence[Any]) -> None:
    """Raise a clear error for batches whose two lists cannot be zipped safely."""
    if isinstance(responses, str):
        raise TypeError("responses must be a list of str, got a single str (wrap it in a list)")
    if len(responses) != len(answers):
        raise ValueError(f"responses and answers differ in length: {len(responses)} != {len(answers)}")
    for index, response in enumerate(responses):
        if not isinstance(response, str):
            raise TypeError(f"responses[{index}] must be a str, got {type(response).__name__}")


class RewardFn(abc.ABC):
    """A binary verifier r(y, a).

    score_batch must return for every sample without stalling: scorers that run untrusted or
    potentially slow work (math verification, programs) give each sample its own timeout; the
    synthetic scorers are bounded by construction. Scorers holding worker processes release them in
    close(); every RewardFn is a context manager.
    """

    name: str = "reward"

    @abc.abstractmethod
    def score(self, response: str, answer: Any) -> RewardResult:
        """Score one response against its reference answer."""

    def score_batch(self, responses: Sequence[str], answers: Sequence[Any]) -> list[RewardResult]:
        """Score responses[i] against answers[i]; the default scores sequentially."""
        check_batch(responses, answers)
        return [self.score(response, answer) for response, answer in zip(responses, answers)]

    def close(self) -> None:
        """Release worker processes or other resources; idempotent. The base holds none."""

    def __enter__(self) -> "RewardFn":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
