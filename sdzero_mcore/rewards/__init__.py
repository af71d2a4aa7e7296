"""Binary rewards r(y, a) in {0, 1}: math (math-verify), code (sandboxed tests), synthetic tasks.

    from sdzero_mcore.rewards import get_reward_fn
    with get_reward_fn("math", timeout_s=10.0, num_workers=4) as reward:
        results = reward.score_batch(responses, answers)   # list[RewardResult]

Scripts that use the math reward start "spawn" worker processes, so their entry point must sit
under `if __name__ == "__main__":`.
"""

from sdzero_mcore.rewards.base import RewardFn, RewardResult
from sdzero_mcore.rewards.code import CodeReward
from sdzero_mcore.rewards.math import MathReward
from sdzero_mcore.rewards.synthetic import SYNTHETIC_TASKS, SyntheticReward, generate_rows
from sdzero_mcore.rewards.synthetic import verify as verify_synthetic

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


__all__ = [
    "REWARD_NAMES",
    "SYNTHETIC_TASKS",
    "CodeReward",
    "MathReward",
    "RewardFn",
    "RewardResult",
    "SyntheticReward",
    "generate_rows",
    "get_reward_fn",
    "verify_synthetic",
]
