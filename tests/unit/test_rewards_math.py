"""Math reward: boxed-answer extraction, math-verify equivalence table, and the worker pool's
timeouts, crash recovery and clean shutdown."""

from __future__ import annotations

import os
import pickle
import signal
import time

import psutil
import pytest

from sdzero_mcore.config import load_config
from sdzero_mcore.rewards import MathReward, RewardResult, get_reward_fn, reward_fn_for
from sdzero_mcore.rewards.extraction import fallback_answer, last_boxed
from sdzero_mcore.rewards.math import gold_for_parsing, normalise_answer


def scripted_verify(gold: str, predicted: str) -> bool:
    """verify_fn for the pool tests; runs inside a worker process. Special answers misbehave."""
    if predicted == "hang":
        time.sleep(3600)
    if predicted == "exit":
        os._exit(3)
    if predicted == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if predicted == "raise":
        raise RuntimeError("verification blew up")
    return gold == predicted


# ---- extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{42}.", "42"),
        (r"first \boxed{1}, then corrected: \boxed{2}", "2"),  # the last box is the final answer
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\boxed {7}", "7"),  # a space before the brace
        (r"\fbox{x+1}", "x+1"),
        (r"\boxed 5 is it", "5"),  # brace-less form takes one token
        (r"$\boxed{ 3 }$", "3"),
        (r"\boxed{}", ""),
        (r"no box here, 42", None),
        (r"\boxed{1} then \boxed{2", None),  # truncated last box: no answer, not the earlier one
        (r"\boxedfoo{3}", None),  # another command, not a box
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_gold_for_parsing_wraps_plain_answers_only():
    assert gold_for_parsing("3/4") == r"\boxed{3/4}"
    assert gold_for_parsing(r"\frac{3}{4}") == r"\boxed{\frac{3}{4}}"
    assert gold_for_parsing(r"\$12") == r"\boxed{\$12}"  # an escaped dollar is not a delimiter
    assert gold_for_parsing(r"$\frac{1}{2}$") == r"$\frac{1}{2}$"
    assert gold_for_parsing(r"\boxed{5}") == r"\boxed{5}"


# ---- equivalence table --------------------------------------------------------------------------
# (gold, response, expected reward, expected reason). Expectations are what math-verify 0.9.0
# does, checked to be mathematically defensible; a few lenient choices are marked.

EQUIVALENCE_TABLE = [
    # fractions and decimals
    ("1/2", r"\boxed{\frac{1}{2}}", 1, "correct"),
    ("1/2", r"\boxed{0.5}", 1, "correct"),
    (r"\frac{1}{2}", r"\boxed{0.5}", 1, "correct"),
    ("3/4", r"\boxed{\dfrac{3}{4}}", 1, "correct"),
    (r"\frac{3}{4}", r"\boxed{\tfrac34}", 1, "correct"),
    (r"\frac{1}{2}", r"\boxed{\frac{2}{4}}", 1, "correct"),
    (r"\frac{3}{4}", r"\boxed{\frac{4}{3}}", 0, "wrong"),
    ("1/3", r"\boxed{0.33}", 0, "wrong"),  # too coarse for math-verify too; 0.333333 passes it (POLICY_TABLE)
    # intervals and sets
    ("[1,2)", r"\boxed{\left[1, 2\right)}", 1, "correct"),
    ("[1,2)", r"\boxed{[1,2]}", 0, "wrong"),
    ("[1,2)", r"\boxed{(1,2]}", 0, "wrong"),
    (r"(-\infty, 3]", r"\boxed{(-\infty,3]}", 1, "correct"),
    (r"\{1,2,3\}", r"\boxed{\{3,2,1\}}", 1, "correct"),  # sets are unordered
    (r"\{1,2,3\}", r"\boxed{\{1,2\}}", 0, "wrong"),
    (r"\emptyset", r"\boxed{\varnothing}", 1, "correct"),  # needs our \varnothing normalisation
    ("(3,4)", r"\boxed{(4,3)}", 0, "wrong"),  # ordered pair / interval, not a set
    # LaTeX variants
    (r"\frac{1}{2}", r"\boxed{\left(\frac{1}{2}\right)}", 1, "correct"),
    ("12", r"\boxed{\text{12}}", 1, "correct"),
    ("1000", r"\boxed{1{,}000}", 1, "correct"),
    # degrees, units, percentages
    (r"90^\circ", r"\boxed{90}", 1, "correct"),
    ("90", r"\boxed{90^{\circ}}", 1, "correct"),
    ("5", r"\boxed{5 \text{ cm}}", 1, "correct"),
    (r"5 \text{ cm}", r"\boxed{5}", 1, "correct"),
    ("5", r"\boxed{6 \text{ cm}}", 0, "wrong"),
    (r"50\%", r"\boxed{0.5}", 1, "correct"),
    (r"10\%", r"\boxed{10}", 1, "correct"),  # lenient: math-verify accepts the bare number too
    (r"10\%", r"\boxed{1}", 0, "wrong"),
    # signs
    ("-3", r"\boxed{-3}", 1, "correct"),
    ("-3", r"\boxed{3}", 0, "wrong"),
    (r"-\frac{1}{2}", r"\boxed{\frac{-1}{2}}", 1, "correct"),
    (r"-\frac{1}{2}", r"\boxed{-0.5}", 1, "correct"),
    # roots and pi
    (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", 1, "correct"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{1}{\sqrt{2}}}", 1, "correct"),
    (r"2\sqrt{3}", r"\boxed{3\sqrt{2}}", 0, "wrong"),
    (r"\sqrt{3}", r"\boxed{1.732}", 0, "wrong"),  # a 4-digit approximation is not exact
    (r"2\pi", r"\boxed{2 \pi}", 1, "correct"),
    (r"\pi", r"\boxed{3.14}", 0, "wrong"),
    (r"\pi r^2", r"\boxed{r^2\pi}", 1, "correct"),
    # algebra
    ("x^2+2x+1", r"\boxed{(x+1)^2}", 1, "correct"),
    ("x^2", r"\boxed{x^3}", 0, "wrong"),
    # multiple choice
    ("B", r"\boxed{\text{(B)}}", 1, "correct"),
    ("B", r"\boxed{(B)}", 1, "correct"),
    ("B", r"\boxed{C}", 0, "wrong"),
    # extraction outcomes
    ("42", "I think it is 42.", 0, "no_answer"),
    ("42", r"\boxed{}", 0, "no_answer"),
    (r"\frac{1}{2}", r"nested: \boxed{\frac{\frac{1}{1}}{2}}", 1, "correct"),
    ("7", r"first \boxed{3}, on second thought \boxed{7}", 1, "correct"),
    ("3", r"first \boxed{3}, on second thought \boxed{7}", 0, "wrong"),
    (r"\text{}", r"\boxed{5}", 0, "invalid_gold"),  # a reference math-verify cannot read
]


@pytest.fixture(scope="module")
def math_reward():
    with MathReward(num_workers=2, timeout_s=20.0) as reward:
        yield reward


@pytest.fixture(scope="module")
def table_results(math_reward):
    golds = [row[0] for row in EQUIVALENCE_TABLE]
    responses = [row[1] for row in EQUIVALENCE_TABLE]
    return math_reward.score_batch(responses, golds)


def test_table_has_enough_cases():
    assert len(EQUIVALENCE_TABLE) >= 30
    assert sum(1 for row in EQUIVALENCE_TABLE if row[3] == "wrong") >= 10


@pytest.mark.parametrize("index", range(len(EQUIVALENCE_TABLE)), ids=[f"{r[0]}|{r[1]}" for r in EQUIVALENCE_TABLE])
def test_equivalence_table(table_results, index):
    gold, response, reward, reason = EQUIVALENCE_TABLE[index]
    result = table_results[index]
    assert isinstance(result, RewardResult)
    assert (result.reward, result.reason) == (reward, reason), f"gold={gold!r} response={response!r} -> {result}"
    assert result.extracted == last_boxed(response)


def test_score_single_and_plain_number_answers(math_reward):
    assert math_reward.score(r"\boxed{0.75}", "3/4") == RewardResult(1, "0.75", "correct")
    assert math_reward.score(r"\boxed{12}", 12).reward == 1  # int gold answers are accepted


def test_bad_inputs_raise_clear_errors(math_reward):
    with pytest.raises(ValueError, match="differ in length"):
        math_reward.score_batch([r"\boxed{1}"], ["1", "2"])
    with pytest.raises(ValueError, match="empty"):
        math_reward.score(r"\boxed{1}", "  ")
    with pytest.raises(TypeError, match="answers\\[0\\]"):
        math_reward.score(r"\boxed{1}", None)
    with pytest.raises(TypeError, match="picklable"):
        MathReward(verify_fn=lambda gold, predicted: True)
    with pytest.raises(ValueError, match="timeout_s"):
        MathReward(timeout_s=0)


def test_get_reward_fn_names():
    reward = get_reward_fn("math", timeout_s=3.0, num_workers=1)
    try:
        assert isinstance(reward, MathReward) and reward.timeout_s == 3.0
    finally:
        reward.close()
    with pytest.raises(ValueError, match="math, code, synthetic:countdown, synthetic:arith"):
        get_reward_fn("maths")


# ---- pool behaviour -----------------------------------------------------------------------------


def _alive_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


def _zombie_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() == psutil.STATUS_ZOMBIE]


def test_hung_verification_times_out_and_the_rest_of_the_batch_scores():
    timeout_s = 1.5
    assert pickle.loads(pickle.dumps(scripted_verify)) is scripted_verify
    with MathReward(num_workers=2, timeout_s=timeout_s, verify_fn=scripted_verify) as reward:
        reward.start()  # start-up is not the point here
        assert len(reward.pool.worker_pids()) == 2
        old_pids = set(reward.pool.worker_pids())
        responses = [r"\boxed{hang}", r"\boxed{7}", r"\boxed{8}", r"\boxed{7}", "no box"]
        start = time.monotonic()
        results = reward.score_batch(responses, ["7"] * len(responses))
        elapsed = time.monotonic() - start
        assert [(r.reward, r.reason) for r in results] == [
            (0, "timeout"), (1, "correct"), (0, "wrong"), (1, "correct"), (0, "no_answer"),
        ]
        assert results[0].extracted == "hang"
        assert timeout_s <= elapsed < timeout_s + 1.0, elapsed
        # The hung worker was killed, reaped and replaced; the pool still works.
        assert reward.pool.replacements == 1
        killed = old_pids - set(reward.pool.worker_pids())
        assert len(killed) == 1 and not psutil.pid_exists(killed.pop())
        assert [r.reason for r in reward.score_batch([r"\boxed{5}", r"\boxed{6}"], ["5", "5"])] == ["correct", "wrong"]
        assert not _zombie_children()


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_crashing_worker_scores_error_and_the_pool_recovers(how):
    timeout_s = 30.0
    with MathReward(num_workers=2, timeout_s=timeout_s, verify_fn=scripted_verify) as reward:
        reward.start()
        responses = [rf"\boxed{{{how}}}", r"\boxed{4}", r"\boxed{raise}", r"\boxed{5}"]
        start = time.monotonic()
        results = reward.score_batch(responses, ["4"] * len(responses))
        assert time.monotonic() - start < timeout_s / 2  # a crash is noticed at once, not at the deadline
        assert [(r.reward, r.reason) for r in results] == [(0, "error"), (1, "correct"), (0, "error"), (0, "wrong")]
        assert reward.pool.replacements == 1  # the raising task did not cost a worker
        # The pool keeps working, also across a second crash.
        again = reward.score_batch([r"\boxed{4}", rf"\boxed{{{how}}}", r"\boxed{4}"], ["4"] * 3)
        assert [r.reason for r in again] == ["correct", "error", "correct"]
        assert len(reward.pool.worker_pids()) == 2
        assert not _zombie_children()


def test_close_leaves_no_processes():
    before = {p.pid for p in _alive_children()}
    reward = MathReward(num_workers=2, timeout_s=10.0)
    assert reward.score(r"\boxed{2}", "2").reward == 1
    worker_pids = set(reward.pool.worker_pids())
    assert worker_pids and worker_pids <= {p.pid for p in _alive_children()}
    reward.close()
    reward.close()  # idempotent
    assert not any(psutil.pid_exists(pid) for pid in worker_pids)
    assert {p.pid for p in _alive_children()} - before == set()
    assert not _zombie_children()
    with pytest.raises(RuntimeError, match="closed"):
        reward.score(r"\boxed{2}", "2")


def failing_initializer() -> None:
    raise RuntimeError("math backend missing")


def test_worker_start_up_failure_raises_a_clear_error_and_cleans_up():
    from sdzero_mcore.rewards._pool import DeadlinePool, PoolStartupError

    pool = DeadlinePool(1, initializer=failing_initializer)
    try:
        with pytest.raises(PoolStartupError, match="math backend missing"):
            pool.map(scripted_verify, [("1", "1")], timeout_s=5.0)
        assert pool.worker_pids() == []
    finally:
        pool.close()
    assert not _zombie_children()


# ---- equivalence policy (issue 17) ----------------------------------------------------------------
# (gold, response, reward under "math_verify", reward under "strict")

POLICY_TABLE = [
    ("1/3", r"\boxed{0.333333}", 1, 0),  # rounded to math-verify's precision: not the exact value
    (r"\pi", r"\boxed{3.14159265}", 1, 0),
    (r"[\frac{1}{3}, 1]", r"\boxed{[0.333333, 1]}", 1, 0),  # decimals inside structures too
    ("x", r"\boxed{X}", 1, 0),  # strict is case-sensitive
    ("x^2+2x+1", r"\boxed{(x+1)^2}", 1, 1),
    ("1/2", r"\boxed{0.5}", 1, 1),  # an exact decimal is the exact value
    ("0.25", r"\boxed{\frac{1}{4}}", 1, 1),
    (r"-\frac{1}{2}", r"\boxed{-0.5}", 1, 1),
    ("5", r"\boxed{5 \text{ cm}}", 1, 1),  # a unit is not a letter of the answer
    ("B", r"\boxed{\text{(B)}}", 1, 1),
    # thousands separators, in the response and in the reference, under both policies
    ("1000000", r"\boxed{1,000,000}", 1, 1),
    ("1000000", "\\boxed{1\u2009000\u2009000}", 1, 1),  # U+2009 thin space
    ("1000000", "\\boxed{1\u202f000\u202f000}", 1, 1),  # U+202F narrow no-break space
    ("1000000", r"\boxed{1\,000\,000}", 1, 1),  # LaTeX thin space
    ("1\u2009000", r"\boxed{1000}", 1, 1),
    (r"1\,000", r"\boxed{1000}", 1, 1),
    ("1000", r"\boxed{1\,001}", 0, 0),
    ("12", r"\boxed{1\,2}", 0, 0),  # not digit groups of three: not a separator
]


@pytest.mark.parametrize("policy", ["math_verify", "strict"])
def test_equivalence_policy(policy):
    column = 2 if policy == "math_verify" else 3
    with MathReward(num_workers=1, timeout_s=20.0, policy=policy) as reward:
        assert reward.policy == policy
        results = reward.score_batch([row[1] for row in POLICY_TABLE], [row[0] for row in POLICY_TABLE])
    got = [(row[0], row[1], result.reward) for row, result in zip(POLICY_TABLE, results)]
    assert got == [(row[0], row[1], row[column]) for row in POLICY_TABLE]


def test_default_policy_is_math_verify_and_the_run_config_sets_it():
    from sdzero_mcore.config import SDZeroConfig, load_config
    from sdzero_mcore.rewards import reward_fn_for

    # Workers start on first use, so these rewards start no process.
    assert MathReward(num_workers=1).policy == "math_verify"  # the authors' release
    assert SDZeroConfig().math.policy == "math_verify"
    # the phases build their reward from the run config: math.policy reaches it
    strict = reward_fn_for(load_config(overrides=["math.policy=strict", "data.dataset=gsm8k"]), [])
    assert isinstance(strict, MathReward) and strict.policy == "strict"
    with pytest.raises(ValueError, match="policy"):
        MathReward(policy="loose")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gold_is_rejected(bad):
    reward = MathReward(num_workers=1)
    with pytest.raises(ValueError, match=r"answers\[0\] is .*finite"):
        reward.score(r"\boxed{1}", bad)
    reward.close()



# ---- math.extraction: release (issue 12) ----------------------------------------------------------
# The authors' release reads answers one way in Phase-1 collection (a fallback chain) and another
# everywhere else (math-verify on the whole response). Rewards are built through reward_fn_for,
# as the phases build them, so the config-to-reward wiring is what is tested.

# (gold, response, reward, reason, extracted) for Phase-1 collection under math.extraction=release.
FALLBACK_TABLE = [
    # a box wins over everything after it, even when it is wrong or empty
    ("1/2", r"we find \boxed{\dfrac{1}{2}}, from 7 apples", 1, "correct", r"\frac{1}{2}"),
    ("13", r"first \boxed{12}, wait no, the answer is 13", 0, "wrong", "12"),
    ("7", r"\boxed{} so 7", 0, "no_answer", ""),
    # else the text after "the answer is" / "final answer is", in any case
    ("12", "Adding them, the answer is $12$.", 1, "correct", "12"),
    ("12", "THE ANSWER IS 12", 1, "correct", "12"),
    ("1/2", "My final answer is: 0.5.", 1, "correct", "0.5"),  # math-verify decides 0.5 = 1/2
    ("5", "so the answer is x = 5.", 1, "correct", "5"),
    ("90", r"The final answer is $90^\circ$", 1, "correct", "90"),
    ("12", "So the answer is 13.", 0, "wrong", "13"),
    # the rest of the response is the answer, as the release takes it: prose after it spoils it
    ("5", "the answer is 5, since 6 fails", 0, "wrong", "5,since6fails"),
    # else the last number (thousands commas removed)
    ("7", "There are 3 red and 4 blue, 7 in all", 1, "correct", "7"),
    ("1250", "a total of 1,250 coins", 1, "correct", "1250"),
    ("-5/2", "the slope comes out as -2.5", 1, "correct", "-2.5"),
    ("7", "I get 8", 0, "wrong", "8"),
    # else nothing
    ("7", "I cannot solve this.", 0, "no_answer", None),
]

# (gold, response, reward, extracted) in Phase 2 under math.extraction=release: math-verify reads
# the whole response. The first rows have no box (boxed mode scores them no_answer) and the
# fallback chain reads them wrongly; math-verify reads them right.
WHOLE_RESPONSE_TABLE = [
    ("5", "the answer is 5, since 6 fails", 1, "5"),
    ("1/2", r"So $x = \frac{1}{2}$ and we are done.", 1, r"x = \frac{1}{2}"),
    ("4", "We get x = 4.", 1, "4"),
    ("1/2", r"The final answer is $\frac{1}{2}$", 1, r"\frac{1}{2}"),
    ("13", r"first \boxed{12}, wait no, the answer is 13", 0, "12"),  # math-verify prefers the box
    ("7", "I cannot solve this.", 0, None),
]


def _release_config(*extra: str):
    return load_config(overrides=["math.extraction=release", "data.dataset=gsm8k", "rollout.reward_workers=1",
                                  "rollout.reward_timeout_s=20", *extra])


@pytest.fixture(scope="module")
def collection_reward():
    with reward_fn_for(_release_config(), [], collection=True) as reward:
        yield reward


@pytest.fixture(scope="module")
def phase2_reward():
    with reward_fn_for(_release_config(), []) as reward:
        yield reward


def test_reward_fn_for_picks_the_extraction_per_phase():
    # Workers start on first use, so these rewards start no process.
    assert load_config().math.extraction == "boxed"
    boxed = load_config(overrides=["data.dataset=gsm8k"])
    assert reward_fn_for(boxed, []).extraction == "boxed"
    assert reward_fn_for(boxed, [], collection=True).extraction == "boxed"
    assert reward_fn_for(_release_config(), [], collection=True).extraction == "fallback_chain"
    assert reward_fn_for(_release_config(), []).extraction == "whole_response"
    strict = reward_fn_for(_release_config("math.policy=strict"), [])
    assert (strict.extraction, strict.policy) == ("whole_response", "strict")
    with pytest.raises(ValueError, match="extraction"):
        MathReward(extraction="release")  # the config's word; the reward takes what it means per phase


@pytest.mark.parametrize("index", range(len(FALLBACK_TABLE)), ids=[r[1] for r in FALLBACK_TABLE])
def test_release_collection_fallback_table(collection_reward, index):
    gold, response, reward, reason, extracted = FALLBACK_TABLE[index]
    result = collection_reward.score(response, gold)
    assert result == RewardResult(reward, extracted, reason), f"gold={gold!r} response={response!r}"


def test_boxed_extraction_reads_no_answer_without_a_box():
    """The same responses under the default extraction: only the boxed rows have an answer."""
    unboxed = [row for row in FALLBACK_TABLE if "boxed" not in row[1]]
    with reward_fn_for(load_config(overrides=["data.dataset=gsm8k"]), [], collection=True) as reward:
        results = reward.score_batch([row[1] for row in unboxed], [row[0] for row in unboxed])
    assert {(r.reward, r.reason, r.extracted) for r in results} == {(0, "no_answer", None)}


def test_fallback_answer_and_normalise_answer():
    assert fallback_answer(r"\boxed{1} and \boxed{2") is None  # a box, malformed: no fallback
    assert fallback_answer("the answer is 4 and the final answer is 5") == " 5"  # the last phrase
    assert fallback_answer("numbers: -3, .5") == ".5"
    assert fallback_answer("no digits") is None
    assert normalise_answer(r": $\left( 1, 2 \right)$.") == "(1,2)"
    assert normalise_answer(r"5 \text{ cm}") == "5"
    assert normalise_answer(r"\text{(B)}") == "(B)"
    assert normalise_answer("50\\%") == "50"
    assert normalise_answer("x = y = 3") == "x=y=3"  # more than one "=": an equation, kept


@pytest.mark.parametrize("index", range(len(WHOLE_RESPONSE_TABLE)), ids=[r[1] for r in WHOLE_RESPONSE_TABLE])
def test_release_phase2_reads_the_whole_response(phase2_reward, collection_reward, index):
    gold, response, reward, extracted = WHOLE_RESPONSE_TABLE[index]
    result = phase2_reward.score(response, gold)
    assert (result.reward, result.extracted) == (reward, extracted), result
    assert result.reason == ("correct" if reward else ("no_answer" if extracted is None else "wrong"))
    if index < 2:  # the rows where the two phases' readings differ
        assert collection_reward.score(response, gold).reward == 0


WHOLE_RESPONSE = r"Work: 1 + 1 = 2, so \boxed{2}"


def is_the_whole_response(gold: str, predicted: str) -> bool:
    """verify_fn (runs in a worker): true only when it is handed the whole response."""
    return predicted == WHOLE_RESPONSE


def test_whole_response_reaches_math_verify_unextracted():
    with MathReward(num_workers=1, timeout_s=20.0, verify_fn=is_the_whole_response, extraction="whole_response") as whole:
        assert whole.score(WHOLE_RESPONSE, "2") == RewardResult(1, None, "correct")
    with MathReward(num_workers=1, timeout_s=20.0, verify_fn=is_the_whole_response) as boxed:
        assert boxed.score(WHOLE_RESPONSE, "2") == RewardResult(0, "2", "wrong")  # it got the box content
