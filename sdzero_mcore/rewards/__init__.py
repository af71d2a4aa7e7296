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
from sdzero_mcore.rewards.select import REWARD_NAMES, get_reward_fn, reward_fn_for, reward_name, reward_target
from sdzero_mcore.rewards.synthetic import SYNTHETIC_TASKS, SyntheticReward, generate_rows
from sdzero_mcore.rewards.synthetic import verify as verify_synthetic

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
    "reward_fn_for",
    "reward_name",
    "reward_target",
    "verify_synthetic",
]
