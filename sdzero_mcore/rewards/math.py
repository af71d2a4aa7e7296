"""Math reward: the last \\boxed{} answer, checked for symbolic equivalence with math-verify.

Verification runs in worker processes (sdzero_mcore.rewards._pool.DeadlinePool) because sympy can
hang or blow up on adversarial answers: each sample gets a hard timeout, a hung or crashed worker
is killed and replaced, and the batch always returns.

Reasons: "correct", "wrong", "no_answer" (no box, or an empty one), "timeout", "error" (the
verification raised or its worker died), "invalid_gold" (math-verify cannot parse the reference
answer: a data problem, reported rather than silently scored as a wrong response).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import pickle
import re
from typing import Any, Callable, Optional, Sequence

from sdzero_mcore.rewards._pool import DeadlinePool
from sdzero_mcore.rewards.base import RewardFn, RewardResult, check_batch
from sdzero_mcore.rewards.extraction import last_boxed

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# LaTeX spellings math-verify does not unify on its own (measured with math-verify 0.9.0:
# \varnothing parses as a free symbol, so it never matched \emptyset).
_SPELLINGS = ((r"\varnothing", r"\emptyset"),)


def _normalise(latex: str) -> str:
    for variant, canonical in _SPELLINGS:
        latex = latex.replace(variant, canonical)
    return latex


def gold_for_parsing(gold: str) -> str:
    """The reference answer as math-verify should read it.

    Datasets store answers plain ("3/4", "\\frac{3}{4}", "(1, 2]"); math-verify's LaTeX extractor
    looks for boxed or $-delimited math, so a plain answer is wrapped in \\boxed{}. An answer that
    already has a box or unescaped $ delimiters is used as written (\\$ is a dollar sign, not a
    delimiter: "\\$12" is wrapped).
    """
    gold = _normalise(gold.strip())
    if "\\boxed" in gold or "\\fbox" in gold or _UNESCAPED_DOLLAR.search(gold):
        return gold
    return "\\boxed{" + gold + "}"


def _init_math_worker(verify_fn: Optional[Callable[[str, str], bool]]) -> None:
    # verify_fn is unused here on purpose: receiving it as an initializer argument makes the worker
    # import its module during start-up, before it reports ready, so a task's deadline never pays
    # for that import.
    del verify_fn
    import math_verify  # noqa: F401  (fail at start-up, with a clear error, if it is missing)

    # The worker disables math-verify's own signal.alarm timeouts (the pool enforces a hard
    # deadline and reports "timeout" instead of a silent False), which makes math-verify log a
    # warning about exactly that; it is expected here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _verify_in_worker(gold: str, predicted: str, verify_fn: Optional[Callable[[str, str], bool]]) -> str:
    """Runs in a worker: the reason string for one (gold, extracted prediction) pair."""
    if verify_fn is not None:
        return "correct" if verify_fn(gold, predicted) else "wrong"
    from math_verify import parse, verify

    # Timeouts are the pool's job (see _init_math_worker); raise_on_error=False keeps math-verify's
    # own behaviour of treating unparseable input as "no match".
    gold_parsed = parse(gold_for_parsing(gold), parsing_timeout=None)
    if not gold_parsed:
        return "invalid_gold"
    predicted_parsed = parse("\\boxed{" + _normalise(predicted) + "}", parsing_timeout=None)
    if not predicted_parsed:
        return "wrong"
    return "correct" if verify(gold_parsed, predicted_parsed, timeout_seconds=None) else "wrong"


class MathReward(RewardFn):
    """r(y, a) = 1 iff the last \\boxed{} answer of y is equivalent to a under math-verify.

    timeout_s: hard limit per sample (verification only; extraction is linear-time in the parent).
    num_workers: verification processes, started on first use.
    verify_fn: optional replacement for math-verify, called in the worker as
        verify_fn(gold: str, predicted: str) -> bool with the extracted box content. It must be a
        module-level function (it is pickled into "spawn" workers). Use it for a custom equivalence
        check; the tests use it to inject verifications that hang or kill their worker.
    mp_context: "spawn" (default) or "forkserver"; never "fork", since the trainer holds threads.
    startup_timeout_s: how long a new worker may take to import math-verify and report ready.
    """

    name = "math"

    def __init__(
        self,
        timeout_s: float = 10.0,
        num_workers: Optional[int] = None,
        verify_fn: Optional[Callable[[str, str], bool]] = None,
        mp_context: str = "spawn",
        startup_timeout_s: float = 120.0,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if num_workers is None:
            num_workers = min(4, os.cpu_count() or 1)
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if verify_fn is None and importlib.util.find_spec("math_verify") is None:
            raise ImportError("the math reward needs math-verify: pip install 'math-verify>=0.9'")
        if verify_fn is not None:
            try:
                pickle.dumps(verify_fn)
            except Exception as exc:
                raise TypeError(
                    f"verify_fn must be picklable (a module-level function) to reach the worker processes; "
                    f"{verify_fn!r} is not: {exc}"
                ) from exc
        self.timeout_s = float(timeout_s)
        self.verify_fn = verify_fn
        self.pool = DeadlinePool(
            num_workers,
            context=mp_context,
            initializer=functools.partial(_init_math_worker, verify_fn),
            startup_timeout_s=startup_timeout_s,
        )

    def start(self) -> None:
        """Start the workers now and wait until they are ready (otherwise the first batch does)."""
        self.pool.start()

    def score(self, response: str, answer: Any) -> RewardResult:
        return self.score_batch([response], [answer])[0]

    def score_batch(self, responses: Sequence[str], answers: Sequence[Any]) -> list[RewardResult]:
        check_batch(responses, answers)
        results: list[Optional[RewardResult]] = [None] * len(responses)
        task_indices: list[int] = []
        task_args: list[tuple] = []
        for index, (response, answer) in enumerate(zip(responses, answers)):
            gold = _gold_text(answer, index)
            predicted = last_boxed(response)
            if not predicted:  # None: no box; "": an empty one
                results[index] = RewardResult(0, predicted, "no_answer")
                continue
            task_indices.append(index)
            task_args.append((gold, predicted, self.verify_fn))

        outcomes = self.pool.map(_verify_in_worker, task_args, self.timeout_s)
        for index, (gold, predicted, _), outcome in zip(task_indices, task_args, outcomes):
            if outcome.status == "ok":
                reason = outcome.value
                results[index] = RewardResult(1 if reason == "correct" else 0, predicted, reason)
            elif outcome.status == "timeout":
                results[index] = RewardResult(0, predicted, "timeout")
            else:  # "error" (the verification raised) or "crashed" (the worker died)
                logging.getLogger(__name__).warning(
                    "math verification failed for sample %d (%s): %s", index, outcome.status, outcome.message
                )
                results[index] = RewardResult(0, predicted, "error")
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.pool.close()


def _gold_text(answer: Any, index: int) -> str:
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise TypeError(f"answers[{index}] must be a str (or int/float) reference answer, got {type(answer).__name__}")
    text = str(answer).strip()
    if not text:
        raise ValueError(f"answers[{index}] is empty: a math problem needs a reference answer")
    return text
