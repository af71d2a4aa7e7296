"""Math reward: a response's final answer, checked for symbolic equivalence with math-verify.

What is compared (``MathReward(extraction=...)``, chosen by ``rewards.reward_fn_for`` from the
config's ``math.extraction`` and the phase):
- "boxed" (the default): the last \\boxed{} of the response against the reference answer.
- "fallback_chain": the authors' release in Phase-1 collection: the last \\boxed{}, else the text
  after "the answer is" / "final answer is", else the last number (extraction.fallback_answer),
  normalised (normalise_answer); equal normalised text is correct, otherwise math-verify decides.
- "whole_response": the authors' release in Phase 2 and evaluation: math-verify reads the whole
  response itself (LaTeX and plain expressions) against "\\boxed{gold}".

Equivalence policy (``MathReward(policy=...)``, config ``math.policy``):
- "math_verify" (the default): math-verify's own verdict. This is what the SD-Zero authors'
  release uses in Phase 2, so the default reproduces their rewards, including math-verify's
  looseness: a decimal that agrees with the exact value to its rounding precision (1/3 vs
  0.333333, pi vs 3.14159265) scores 1, and letters are compared without case (x vs X).
- "strict": math-verify's verdict, and then a decimal in either answer must be exactly the other
  value (0.5 = 1/2, but 0.333333 != 1/3: a rounded decimal is not the exact value) and a letter
  must not appear in another case than in the reference (x != X).
Both accept thousands separators: commas (math-verify's own) and thin spaces (U+2009, U+202F,
LaTeX \\, and \\thinspace), which are removed between digit groups before parsing.

Verification runs in worker processes (sdzero_mcore.rewards._pool.DeadlinePool) because sympy can
hang or blow up on adversarial answers: each sample gets a hard timeout, a hung or crashed worker
is killed and replaced, and the batch always returns.

Reasons: "correct", "wrong", "no_answer" (no box or an empty one; with fallback_chain nothing
the chain could read; with whole_response nothing math-verify could read), "timeout", "error" (the
verification raised or its worker died), "invalid_gold" (math-verify cannot parse the reference
answer: a data problem, reported rather than silently scored as a wrong response).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import os
import pickle
import re
from typing import Any, Callable, Optional, Sequence

from sdzero_mcore.rewards._pool import DeadlinePool
from sdzero_mcore.rewards.base import RewardFn, RewardResult, check_batch
from sdzero_mcore.rewards.extraction import fallback_answer, last_boxed

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# LaTeX spellings math-verify does not unify on its own (measured with math-verify 0.9.0:
# \varnothing parses as a free symbol, so it never matched \emptyset).
_SPELLINGS = ((r"\varnothing", r"\emptyset"),)

# A thin space between digit groups is a thousands separator (SI style: 1 000 000). math-verify
# 0.9.0 reads "1\,000" as 1*0 and U+2009 as a break in the number, so they are removed first.
_THIN_SPACE_SEPARATOR = re.compile(r"(?<=\d)(?:\\,|\\thinspace\s*|\u2009|\u202f)(?=\d{3}(?!\d))")

POLICIES = ("math_verify", "strict")
DEFAULT_POLICY = "math_verify"  # the authors' release (see the module docstring); math.policy sets it per run
EXTRACTIONS = ("boxed", "fallback_chain", "whole_response")


def _normalise(latex: str) -> str:
    for variant, canonical in _SPELLINGS:
        latex = latex.replace(variant, canonical)
    return _THIN_SPACE_SEPARATOR.sub("", latex)


# Spelling that says nothing about the value, dropped before the fallback chain's answers are
# compared: the release normalised its Phase-1 answers in this spirit (its own, longer list also
# removes unit words and reads number words; those are left to math-verify here).
_DROPPED_SPELLINGS = (r"\!", r"\(", r"\)", r"\$", "$", r"^{\circ}", r"^\circ", r"\%", "%")
_SIZED_DELIMITER = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_FRACTION_VARIANT = re.compile(r"\\[dt]frac(?![A-Za-z])")
_TRAILING_TEXT = re.compile(r"\\text\{[^{}]*\}$")
_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def normalise_answer(answer: str) -> str:
    """An extracted answer reduced to the form the fallback chain compares.

    Lines are joined; dollar delimiters, degree marks, percent signs, \\left / \\right and \\!
    dropped; \\dfrac and \\tfrac read as \\frac; a leading ":" and trailing "." / "/" dropped
    (an answer phrase ends a sentence: "The answer is: $5$."); a trailing \\text{...} (a unit)
    dropped when something is left, other \\text{...} unwrapped; "x = 5" read as "5" (one "=",
    a left side of at most two characters); spaces removed.
    """
    text = re.sub(r"\n\s*", "", answer)
    for spelling in _DROPPED_SPELLINGS:
        text = text.replace(spelling, "")
    text = _SIZED_DELIMITER.sub("", text)
    text = _FRACTION_VARIANT.sub(r"\\frac", text)
    text = text.strip().removeprefix(":").strip().rstrip("./").strip()
    without_unit = _TRAILING_TEXT.sub("", text).strip()
    if without_unit:
        text = without_unit
    text = _TEXT.sub(r"\1", text)
    left, equals, right = text.partition("=")
    if equals and "=" not in right and 0 < len(left.strip()) <= 2 and right.strip():
        text = right
    return text.replace(" ", "")


def _same_text(gold: str, predicted: str, policy: str) -> bool:
    """Equal normalised answers are equal without asking math-verify (the release's first test);
    letter case counts only under the strict policy."""
    gold, predicted = normalise_answer(gold), normalise_answer(predicted)
    return gold == predicted if policy == "strict" else gold.lower() == predicted.lower()


_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")


def _letters(latex: str) -> set[str]:
    """The letters an answer writes, outside LaTeX command names (\\frac, \\pi, \\text)."""
    return set(re.findall(r"[A-Za-z]", _LATEX_COMMAND.sub(" ", latex)))


def _case_differs(gold: str, predicted: str) -> bool:
    """Whether the prediction writes a letter in another case than the reference does (X for x);
    letters the reference lacks in either case (units such as cm) do not count."""
    gold_letters = _letters(gold)
    return any(c not in gold_letters and c.swapcase() in gold_letters for c in _letters(predicted))


def _exactly_equal(gold_value: Any, predicted_value: Any) -> bool:
    """Whether two parsed answers are equal with every decimal read as the exact rational it
    writes (0.333333 = 333333/1000000, which is not 1/3)."""
    import sympy  # here, like math_verify: only the worker processes need it, and it is slow to import

    def exact(value):
        if not isinstance(value, sympy.Basic):
            return value
        return value.xreplace({f: sympy.Rational(str(f)) for f in value.atoms(sympy.Float)})

    gold_exact, predicted_exact = exact(gold_value), exact(predicted_value)
    if isinstance(gold_exact, sympy.Expr) and isinstance(predicted_exact, sympy.Expr):
        return sympy.simplify(gold_exact - predicted_exact) == 0
    return gold_exact == predicted_exact


def _has_decimal(value: Any) -> bool:
    import sympy

    return isinstance(value, sympy.Basic) and bool(value.atoms(sympy.Float))


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


def _verify_in_worker(
    gold: str, predicted: str, verify_fn: Optional[Callable[[str, str], bool]], policy: str = DEFAULT_POLICY
) -> str:
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
    if not verify(gold_parsed, predicted_parsed, timeout_seconds=None):
        return "wrong"
    if policy == "strict":
        if _case_differs(gold, predicted):
            return "wrong"
        gold_value, predicted_value = gold_parsed[0], predicted_parsed[0]
        if (_has_decimal(gold_value) or _has_decimal(predicted_value)) and not _exactly_equal(gold_value, predicted_value):
            return "wrong"
    return "correct"


def _verify_response_in_worker(
    gold: str, response: str, verify_fn: Optional[Callable[[str, str], bool]], policy: str = DEFAULT_POLICY
) -> tuple[str, Optional[str]]:
    """Runs in a worker: (reason, the answer math-verify read) for one whole response, read the
    way the authors' release reads it in Phase 2 (math-verify finds the answer itself)."""
    if verify_fn is not None:
        return ("correct" if verify_fn(gold, response) else "wrong"), None
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse(gold_for_parsing(gold), [LatexExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:
        return "invalid_gold", None
    predicted_parsed = parse(
        _normalise(response), [ExprExtractionConfig(), LatexExtractionConfig()], parsing_timeout=None
    )
    if not predicted_parsed:
        return "no_answer", None
    # parse gives [value, the text it was read from]; the text is what a reader of the logs needs.
    predicted = str(predicted_parsed[-1])
    if not verify(gold_parsed, predicted_parsed, timeout_seconds=None):
        return "wrong", predicted
    if policy == "strict":
        if _case_differs(gold, predicted):
            return "wrong", predicted
        gold_value, predicted_value = gold_parsed[0], predicted_parsed[0]
        if (_has_decimal(gold_value) or _has_decimal(predicted_value)) and not _exactly_equal(gold_value, predicted_value):
            return "wrong", predicted
    return "correct", predicted


class MathReward(RewardFn):
    """r(y, a) = 1 iff the final answer of y is equivalent to a under math-verify.

    extraction: "boxed", "fallback_chain" or "whole_response" (see the module docstring).
    policy: "math_verify" or "strict" (see the module docstring). Ignored with verify_fn.
    timeout_s: hard limit per sample (verification only; extraction is linear-time in the parent).
    num_workers: verification processes, started on first use.
    verify_fn: optional replacement for math-verify, called in the worker as
        verify_fn(gold: str, predicted: str) -> bool with the extracted answer (with
        whole_response: the whole response; with fallback_chain: the normalised answer). It must be a
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
        policy: str = DEFAULT_POLICY,
        extraction: str = "boxed",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if extraction not in EXTRACTIONS:
            raise ValueError(f"extraction must be one of {', '.join(EXTRACTIONS)}, got {extraction!r}")
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
        self.policy = policy
        self.extraction = extraction
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

    def _answer_of(self, response: str) -> Optional[str]:
        """What goes to verification: the answer extracted in the parent (linear time), or with
        whole_response the response itself, which math-verify reads in the worker."""
        if self.extraction == "whole_response":
            return response if response.strip() else None
        if self.extraction == "fallback_chain":
            raw = fallback_answer(response)
            return None if raw is None else normalise_answer(raw)
        return last_boxed(response)

    def score_batch(self, responses: Sequence[str], answers: Sequence[Any]) -> list[RewardResult]:
        check_batch(responses, answers)
        results: list[Optional[RewardResult]] = [None] * len(responses)
        task_indices: list[int] = []
        task_args: list[tuple] = []
        whole = self.extraction == "whole_response"
        for index, (response, answer) in enumerate(zip(responses, answers)):
            gold = _gold_text(answer, index)
            predicted = self._answer_of(response)
            if not predicted:  # None: nothing to read; "": an empty box or answer
                results[index] = RewardResult(0, None if whole else predicted, "no_answer")
                continue
            if self.extraction == "fallback_chain" and self.verify_fn is None and _same_text(gold, predicted, self.policy):
                results[index] = RewardResult(1, predicted, "correct")
                continue
            task_indices.append(index)
            task_args.append((gold, predicted, self.verify_fn, self.policy))

        worker = _verify_response_in_worker if whole else _verify_in_worker
        outcomes = self.pool.map(worker, task_args, self.timeout_s)
        for index, (gold, predicted, *_), outcome in zip(task_indices, task_args, outcomes):
            if whole:
                predicted = None  # the response itself is not an extracted answer
            if outcome.status == "ok":
                reason = outcome.value
                if whole:
                    reason, predicted = reason
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
    if isinstance(answer, float) and not math.isfinite(answer):
        # str(nan) would become the reference answer "nan"; NaN usually marks a missing value.
        raise ValueError(f"answers[{index}] is {answer!r}: a reference answer must be a finite number or text")
    text = str(answer).strip()
    if not text:
        raise ValueError(f"answers[{index}] is empty: a math problem needs a reference answer")
    return text
