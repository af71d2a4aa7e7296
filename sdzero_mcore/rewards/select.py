"""Which verifier a run's data gets, and what each question gives it to compare a response with."""

from __future__ import annotations

from typing import Sequence

from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.rewards.base import RewardFn
from sdzero_mcore.rewards.code import CodeReward
from sdzero_mcore.rewards.math import MathReward
from sdzero_mcore.rewards.synthetic import SYNTHETIC_TASKS, SyntheticReward

REWARD_NAMES = ("math", "code") + tuple(f"synthetic:{task}" for task in SYNTHETIC_TASKS)


def get_reward_fn(name: str, **kwargs) -> RewardFn:
    """The reward called `name` (one of REWARD_NAMES); kwargs go to its constructor
    (MathReward / CodeReward; the synthetic rewards take none)."""
    if name == "math":
        return MathReward(**kwargs)
    if name == "code":
        return CodeReward(**kwargs)
    if name.startswith("synthetic:") and name[len("synthetic:"):] in SYNTHETIC_TASKS:
        if kwargs:
            raise TypeError(f"reward {name!r} takes no options, got {sorted(kwargs)}")
        return SyntheticReward(name[len("synthetic:"):])
    raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(REWARD_NAMES)}")


def reward_name(cfg: SDZeroConfig, questions: Sequence) -> str:
    """The verifier for the data: the synthetic task's own, code when rows carry tests, else math."""
    if cfg.data.dataset.startswith("synthetic:"):
        return cfg.data.dataset
    return "code" if questions and questions[0].tests is not None else "math"


def reward_fn_for(cfg: SDZeroConfig, questions: Sequence, *, collection: bool = False) -> RewardFn:
    """The run's reward function for ``questions``, with the rollout section's workers and timeout
    and, for math, the run's ``math.policy`` and ``math.extraction``.

    collection: True when scoring Phase-1 (Self-Revision) data collection. With
    ``math.extraction: release`` the release read answers differently there (a fallback chain)
    than everywhere else (math-verify on the whole response); other rewards ignore it.
    """
    name = reward_name(cfg, questions)
    if name.startswith("synthetic:"):  # verified in-process: pure Python, bounded work
        return get_reward_fn(name)
    if name == "code":  # its timeout is a per-sample budget over all tests: keep the reward's default
        return get_reward_fn(name, num_workers=cfg.rollout.reward_workers)
    return get_reward_fn(name, timeout_s=cfg.rollout.reward_timeout_s, num_workers=cfg.rollout.reward_workers,
                         policy=cfg.math.policy, extraction=math_extraction(cfg.math.extraction, collection=collection))


def math_extraction(setting: str, *, collection: bool) -> str:
    """MathReward's extraction for the config's ``math.extraction`` in a phase: "release" means the
    fallback chain in Phase-1 collection and the whole response elsewhere."""
    if setting == "boxed":
        return "boxed"
    if setting == "release":
        return "fallback_chain" if collection else "whole_response"
    raise ValueError(f"math.extraction must be boxed or release, got {setting!r}")


def reward_target(question) -> object:
    """What the verifier compares a response with: a code question's tests, a synthetic row (countdown
    checks the numbers used and the target), else the answer."""
    if question.tests is not None:
        return question.tests
    if "task" in question.extra:
        return {**question.extra, "answer": question.answer}
    return question.answer
