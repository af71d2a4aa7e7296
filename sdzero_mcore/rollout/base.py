"""The rollout-engine contract: token ids in, sampled completions (token ids, text, finish reason) out.

Every backend (``hf`` in-process transformers, ``sglang`` colocated or remote) implements
:class:`RolloutEngine`. Completions carry their token ids, which the trainer uses as they are:
a response is never re-tokenised, so the student is trained on exactly the tokens it sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

import torch

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy; ``top_k=-1`` and ``top_p=1`` switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1  # samples per prompt
    seed: Optional[int] = None
    return_logprobs: bool = False

    def __post_init__(self):
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            problems.append(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids}")
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sampled continuation of one prompt."""

    prompt_index: int  # which prompt of the generate() call
    sample_index: int  # 0..n-1
    token_ids: list[int]  # the completion only; ends with the stop token when finish_reason == "stop"
    text: str
    finish_reason: str  # "stop" (a stop token was sampled) or "length" (max_new_tokens reached)
    logprobs: Optional[list[float]] = None  # per completion token, under the sampling distribution
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        if self.logprobs is not None and len(self.logprobs) != len(self.token_ids):
            raise ValueError(f"{len(self.logprobs)} logprobs for {len(self.token_ids)} completion tokens")


NamedTensors = Iterable[tuple[str, torch.Tensor]]


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """One seed per request: reproducible for a (seed, prompt, sample), different across samples."""
    return (seed * 1_000_003 + prompt_index * 10_007 + sample_index) % 2**31


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        """n completions per prompt, ordered by (prompt, sample)."""

    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Load full HF-named tensors, bucket by bucket (``parallel.resharding.iter_hf_buckets``)."""

    def sleep(self) -> None:
        """Free accelerator memory (weights, KV cache) for training; weights are kept to be resumed."""

    def wake(self) -> None:
        """Take the memory back before generating."""

    def shutdown(self) -> None:
        """Release the engine for good (processes, memory); call when a phase ends."""


def check_prompts(prompt_ids: Sequence[Sequence[int]], vocab_size: Optional[int] = None) -> list[list[int]]:
    """Prompts as lists of ints; an empty prompt or an id outside the vocabulary names its index."""
    prompts = []
    for i, prompt in enumerate(prompt_ids):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if vocab_size is not None:
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")
        prompts.append(ids)
    return prompts
