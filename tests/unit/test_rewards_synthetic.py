"""Synthetic tasks: deterministic generation, self-consistency of rows, and the verifiers'
handling of wrong, invalid and hostile answers."""

from __future__ import annotations

import re
from collections import Counter
from fractions import Fraction

import pytest

from sdzero_mcore.rewards import (
    SYNTHETIC_TASKS,
    RewardResult,
    SyntheticReward,
    generate_rows,
    get_reward_fn,
    verify_synthetic,
)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_generation_is_deterministic_by_seed(task):
    assert generate_rows(task, 50, seed=3) == generate_rows(task, 50, seed=3)
    assert generate_rows(task, 50, seed=3) != generate_rows(task, 50, seed=4)
    assert generate_rows(task, 10, seed=3) == generate_rows(task, 50, seed=3)[:10]  # a prefix, whatever n


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_every_row_verifies_with_its_own_answer_and_solution(task):
    rows = generate_rows(task, 400, seed=0)
    assert len(rows) == 400
    for row in rows:
        assert {"question", "answer", "solution"} <= row.keys()
        assert isinstance(row["question"], str) and isinstance(row["answer"], str)
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        assert verify_synthetic(task, row["solution"], row) == RewardResult(1, row["answer"], "correct")
        assert verify_synthetic(task, f"\\boxed{{{row['answer']}}}", row).reward == 1


def test_countdown_rows_are_well_formed():
    rows = generate_rows("countdown", 400, seed=1)
    sizes = Counter(len(row["numbers"]) for row in rows)
    assert set(sizes) == {3, 4}
    for row in rows:
        numbers, target = row["numbers"], row["target"]
        assert all(1 <= n <= 20 for n in numbers)
        assert target not in numbers and 1 <= target <= 1000
        assert row["question"] == (
            f"Using the numbers {numbers}, make {target}. Use each number at most once with + - * /. "
            "Put the expression in \\boxed{}."
        )
        used = [int(n) for n in re.findall(r"\d+", row["answer"])]
        assert not Counter(used) - Counter(numbers)
        # Independent of the verifier: Python's own evaluation, in exact arithmetic.
        exact = eval(re.sub(r"(\d+)", r"Fraction(\1)", row["answer"]), {"Fraction": Fraction})
        assert exact == target
    assert any("/" in row["answer"] for row in rows) and any("(" in row["answer"] for row in rows)


def test_arith_rows_are_well_formed():
    for row in generate_rows("arith", 400, seed=2):
        match = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Put the answer in \\boxed\{\}\.", row["question"])
        assert match, row["question"]
        a, op, b = int(match[1]), match[2], int(match[3])
        assert 10 <= a <= 999 and 10 <= b <= 999
        assert row["answer"] == str(a + b if op == "+" else a - b)
        assert int(row["answer"]) >= 0
        assert f"{a}{op}{b}={row['answer']}" in row["solution"]


COUNTDOWN_ROW = {"numbers": [3, 5, 7, 7], "target": 22}

COUNTDOWN_CASES = [
    (r"\boxed{3*5+7}", 1, "correct"),
    (r"\boxed{(7+7)+3+5-7+0*0}", 0, "number_not_allowed"),  # 0 is not given, and 7 a third time
    (r"\boxed{7+7+5+3}", 1, "correct"),  # 7 may be used twice: it is given twice
    (r"\boxed{7*3+7/7}", 0, "number_not_allowed"),  # but not three times
    (r"\boxed{3 \times 5 + 7}", 1, "correct"),  # LaTeX operators
    (r"\boxed{7 \div 7 + 3 \cdot 5}", 0, "wrong"),  # read as 7/7+3*5 = 16
    (r"\boxed{\left(3 + 5\right) \times 7 - 7 \times 5}", 0, "number_not_allowed"),
    (r"\boxed{5*5-3}", 0, "number_not_allowed"),  # 5 reused
    (r"\boxed{3*5+8-1}", 0, "number_not_allowed"),  # numbers not given
    (r"\boxed{3*5+7+7}", 0, "wrong"),  # valid, but 29
    (r"\boxed{3+5+7}", 0, "wrong"),
    (r"\boxed{7/(5-5)}", 0, "number_not_allowed"),
    (r"\boxed{3/(7-7)+5}", 0, "invalid_expression"),  # division by zero
    (r"\boxed{__import__('os').system('true')}", 0, "invalid_expression"),
    (r"\boxed{(lambda: 22)()}", 0, "invalid_expression"),
    (r"\boxed{3**5}", 0, "invalid_expression"),  # power is not allowed
    (r"\boxed{3^5}", 0, "invalid_expression"),
    (r"\boxed{7//3}", 0, "invalid_expression"),  # floor division is not /
    (r"\boxed{-3+25}", 0, "invalid_expression"),  # unary minus is not an allowed operation
    (r"\boxed{3_0-8}", 0, "invalid_expression"),  # digit separators would smuggle in new numbers
    (r"\boxed{0x16}", 0, "invalid_expression"),
    (r"\boxed{22.0}", 0, "invalid_expression"),
    (r"\boxed{" + "(" * 200 + "3" + ")" * 200 + "}", 0, "invalid_expression"),  # too long to parse
    (r"\boxed{" + "*".join(["7"] * 60) + "}", 0, "invalid_expression"),  # huge: refused before parsing
    (r"\boxed{3*5+}", 0, "invalid_expression"),
    (r"\boxed{}", 0, "no_answer"),
    ("3*5+7 = 22", 0, "no_answer"),
    (r"\boxed{3*5+7} wait, no: \boxed{3+5+7}", 0, "wrong"),  # the last box counts
]


@pytest.mark.parametrize("response, reward, reason", COUNTDOWN_CASES)
def test_countdown_verifier(response, reward, reason):
    result = verify_synthetic("countdown", response, COUNTDOWN_ROW)
    assert (result.reward, result.reason) == (reward, reason), result


def test_countdown_magnitude_guard_on_given_numbers():
    # With large given numbers the magnitude guard, not the number check, must stop the blow-up.
    row = {"numbers": [10**7] * 4, "target": 1}
    result = verify_synthetic("countdown", r"\boxed{10000000*10000000*10000000*10000000}", row)
    assert (result.reward, result.reason) == (0, "invalid_expression")


ARITH_CASES = [
    (r"so \boxed{132}", 1, "correct"),
    (r"\boxed{ 132 }", 1, "correct"),
    (r"\boxed{+132}", 1, "correct"),
    (r"\boxed{131}", 0, "wrong"),
    (r"\boxed{132.0}", 0, "wrong"),  # integer task: an exact integer is expected
    (r"\boxed{47+85}", 0, "wrong"),
    (r"\boxed{}", 0, "no_answer"),
    ("132", 0, "no_answer"),
]


@pytest.mark.parametrize("response, reward, reason", ARITH_CASES)
def test_arith_verifier(response, reward, reason):
    result = verify_synthetic("arith", response, {"answer": "132"})
    assert (result.reward, result.reason) == (reward, reason)
    assert verify_synthetic("arith", response, 132) == result  # the answer alone works too


def test_reward_fn_and_errors():
    reward = get_reward_fn("synthetic:countdown")
    assert isinstance(reward, SyntheticReward)
    results = reward.score_batch([r"\boxed{3*5+7}", r"\boxed{3+5}"], [COUNTDOWN_ROW, COUNTDOWN_ROW])
    assert [r.reason for r in results] == ["correct", "wrong"]
    assert get_reward_fn("synthetic:arith").score(r"\boxed{5}", "5").reward == 1
    with pytest.raises(ValueError, match="countdown, arith"):
        generate_rows("sudoku", 3, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        generate_rows("arith", -1, seed=0)
    with pytest.raises(TypeError, match="needs the row"):
        verify_synthetic("countdown", r"\boxed{1+2}", "3")
    with pytest.raises(ValueError, match="integer"):
        verify_synthetic("arith", r"\boxed{1}", "one")
    with pytest.raises(TypeError, match="takes no options"):
        get_reward_fn("synthetic:arith", timeout_s=3)
    with pytest.raises(ValueError, match="allowed: math, code, synthetic:countdown, synthetic:arith"):
        get_reward_fn("synthetic:sudoku")


@pytest.mark.parametrize("bad", [True, 1.0, 2, -1, "1"])
def test_reward_result_accepts_only_the_int_bits(bad):
    with pytest.raises(ValueError, match="int 0 or 1"):
        RewardResult(bad, None, "correct")
    with pytest.raises(ValueError, match="reason"):
        RewardResult(1, None, "")
