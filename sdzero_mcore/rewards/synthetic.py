"""Synthetic tasks for the embedded CPU demo: generators with worked solutions, and their verifiers.

Both tasks are small enough for a tiny character-level model trained from scratch to partly learn:
- countdown: reach a target from 3-4 numbers in 1..20 with + - * / (each number at most once).
  The generated answer is a left-to-right chain such as (3+5)*7, and the solution shows one line
  per step, so the model can learn the format and simple cases before search.
- arith: two- and three-digit addition / subtraction with a column-by-column worked solution.
- add: the sum of two numbers below 100 in two column steps (ones, then tens with the carry),
  the embedded demo's task: small enough that a model trained from scratch for a few minutes on
  2 CPU cores learns it, and stepwise, so that an error sits in one step that re-reading finds
  (:func:`flawed_add_solution`: one step's sum is off and the rest follows from it consistently).

Every solution ends with \\boxed{<answer>}; the verifiers read the last \\boxed{}.
Reasons: "correct", "wrong", "no_answer", "invalid_expression" (countdown: not a plain arithmetic
expression, division by zero, or too long/large), "number_not_allowed" (countdown: a number not
given, or used more often than given).

Verification time is bounded by construction (a linear scan for the box, a length cap before
parsing, at most a handful of exact operations), so score_batch needs no per-sample timeout.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction
from typing import Any, Mapping, Optional, Union

from sdzero_mcore.rewards.base import RewardFn, RewardResult
from sdzero_mcore.rewards.extraction import last_boxed

SYNTHETIC_TASKS = ("countdown", "arith", "add")

MAX_EXPRESSION_CHARS = 100  # a countdown answer over 4 numbers needs ~20; longer is not an answer
MAX_MAGNITUDE = 10**12  # any intermediate numerator/denominator beyond this is rejected
COUNTDOWN_MAX_TARGET = 1000

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


def _check_task(task: str) -> None:
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of: {', '.join(SYNTHETIC_TASKS)}")


# ---- generation -------------------------------------------------------------------------------


def _countdown_row(rng: random.Random) -> dict:
    while True:
        numbers = [rng.randint(1, 20) for _ in range(rng.choice((3, 4)))]
        order = rng.sample(range(len(numbers)), rng.randint(2, len(numbers)))
        value = numbers[order[0]]
        expression, top_precedence = str(value), _ATOM
        steps = []
        for position in order[1:]:
            operand = numbers[position]
            # Only steps that keep every intermediate a positive integer of modest size: the chain
            # is then easy to show line by line, and division is always exact.
            choices = ["+"]
            if value * operand <= COUNTDOWN_MAX_TARGET:
                choices.append("*")
            if value > operand:
                choices.append("-")
            if operand > 1 and value % operand == 0:
                choices.append("/")
            op = rng.choice(choices)
            result = {"+": value + operand, "-": value - operand, "*": value * operand, "/": value // operand}[op]
            left = f"({expression})" if top_precedence < _PRECEDENCE[op] else expression
            expression, top_precedence = f"{left}{op}{operand}", _PRECEDENCE[op]
            steps.append(f"{value}{op}{operand}={result}")
            value = result
        # A target that is one of the given numbers needs no arithmetic at all.
        if value in numbers or not 1 <= value <= COUNTDOWN_MAX_TARGET:
            continue
        question = (
            f"Using the numbers {numbers}, make {value}. Use each number at most once with + - * /. "
            f"Put the expression in \\boxed{{}}."
        )
        solution = "\n".join(steps) + f"\n\\boxed{{{expression}}}"
        return {
            "task": "countdown", "question": question, "answer": expression, "solution": solution,
            "numbers": numbers, "target": value,
        }


_COLUMN_NAMES = ("ones", "tens", "hundreds", "thousands")


def _addition_steps(a: int, b: int) -> list[str]:
    steps, carry, column = [], 0, 0
    while a or b:
        da, db = a % 10, b % 10
        total = da + db + carry
        terms = f"{da}+{db}" + (f"+{carry}" if carry else "")
        carry_note = f", carry {total // 10}" if total >= 10 else ""
        steps.append(f"{_COLUMN_NAMES[column]}: {terms}={total}, write {total % 10}{carry_note}")
        carry, a, b, column = total // 10, a // 10, b // 10, column + 1
    if carry:
        steps.append(f"{_COLUMN_NAMES[column]}: carry {carry}, write {carry}")
    return steps


def _subtraction_steps(a: int, b: int) -> list[str]:
    steps, borrow, column = [], 0, 0
    while a:
        da, db = a % 10, b % 10
        top = da - borrow
        terms = f"{da}-{borrow}" if borrow else f"{da}"
        if top < db:
            steps.append(f"{_COLUMN_NAMES[column]}: {terms}<{db}, borrow: {top + 10}-{db}={top + 10 - db}, write {top + 10 - db}")
            borrow = 1
        else:
            steps.append(f"{_COLUMN_NAMES[column]}: {terms}-{db}={top - db}, write {top - db}")
            borrow = 0
        a, b, column = a // 10, b // 10, column + 1
    return steps


def _arith_row(rng: random.Random) -> dict:
    a = rng.randint(10, 999)
    b = rng.randint(10, 999)
    op = rng.choice("+-")
    if op == "-" and a < b:
        a, b = b, a  # non-negative results: one less thing for a tiny model to learn
    result = a + b if op == "+" else a - b
    steps = _addition_steps(a, b) if op == "+" else _subtraction_steps(a, b)
    question = f"What is {a} {op} {b}? Put the answer in \\boxed{{}}."
    solution = "\n".join(steps + [f"{a}{op}{b}={result}", f"\\boxed{{{result}}}"])
    return {"task": "arith", "question": question, "answer": str(result), "solution": solution}


def add_steps(a: int, b: int, flaw: Optional[tuple[int, int]] = None) -> str:
    """The worked column sum of a + b: the sum restated, ``ones`` then ``tens`` (with the carry), the box.

    ``flaw`` = (step, delta) writes step 0 (ones) or 1 (tens) with its sum off by ``delta``, and
    derives everything after it from the wrong sum, as a careless solver would: the one false
    equation is the error, the rest of the solution is consistent with it."""
    ones = a % 10 + b % 10 + (flaw[1] if flaw and flaw[0] == 0 else 0)
    carry = ones // 10
    tens_terms = f"{a // 10}+{b // 10}" + (f"+{carry}" if carry else "")
    tens = a // 10 + b // 10 + carry + (flaw[1] if flaw and flaw[0] == 1 else 0)
    answer = tens * 10 + ones % 10
    # the sum restated first: copying it keeps each step's digits close to where they are used
    return f"{a}+{b}:\n{a % 10}+{b % 10}={ones}\n{tens_terms}={tens}\n\\boxed{{{answer}}}"


_ADD_QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")


def flawed_add_solution(question: str, rng: random.Random) -> str:
    """A worked solution of an ``add`` question with one wrong step (sum off by 1 or 2) and a wrong answer."""
    match = _ADD_QUESTION.match(question)
    if match is None:
        raise ValueError(f"not an add question: {question!r}")
    a, b = int(match.group(1)), int(match.group(2))
    while True:
        step = rng.randrange(2)
        delta = rng.choice((-2, -1, 1, 2))
        column = (a % 10 + b % 10) if step == 0 else (a // 10 + b // 10)
        if column + delta >= 0:  # a negative column sum is not a slip anyone makes
            return add_steps(a, b, (step, delta))


def _add_row(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    # no instruction in the question: the run's prompts carry it (a character-level model pays per character)
    question = f"What is {a}+{b}?"
    return {"task": "add", "question": question, "answer": str(a + b), "solution": add_steps(a, b)}


_ROW_MAKERS = {"countdown": _countdown_row, "arith": _arith_row, "add": _add_row}


def generate_rows(task: str, n: int, seed: int) -> list[dict]:
    """n rows of `task`, the same for the same (task, n, seed) on every machine and run."""
    _check_task(task)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # A str seed is hashed with SHA-512 by random.seed, independent of PYTHONHASHSEED.
    rng = random.Random(f"sdzero-synthetic:{task}:{seed}")
    make = _ROW_MAKERS[task]
    return [make(rng) for _ in range(n)]


# ---- verification -----------------------------------------------------------------------------

# LaTeX / unicode spellings of the four operations, mapped to Python's.
_OPERATOR_SPELLINGS = (
    (r"\times", "*"), (r"\cdot", "*"), (r"\div", "/"), (r"\left", ""), (r"\right", ""),
    ("×", "*"), ("÷", "/"), ("−", "-"),
)
_EXPRESSION_CHARS = re.compile(r"[0-9+\-*/() ]+")


class _InvalidExpression(Exception):
    pass


def _literals(node: ast.AST) -> list[int]:
    """The integer literals of a + - * / expression tree; _InvalidExpression for anything else."""
    if isinstance(node, ast.Expression):
        return _literals(node.body)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        return _literals(node.left) + _literals(node.right)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return [node.value]
    raise _InvalidExpression(type(node).__name__)


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    left, right = _evaluate(node.left), _evaluate(node.right)
    if isinstance(node.op, ast.Add):
        value = left + right
    elif isinstance(node.op, ast.Sub):
        value = left - right
    elif isinstance(node.op, ast.Mult):
        value = left * right
    else:
        if right == 0:
            raise _InvalidExpression("division by zero")
        value = left / right
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _InvalidExpression("value too large")
    return value


def verify_countdown(response: str, numbers: list[int], target: int) -> RewardResult:
    expression = last_boxed(response)
    if not expression:
        return RewardResult(0, expression, "no_answer")
    text = expression
    for spelling, python in _OPERATOR_SPELLINGS:
        text = text.replace(spelling, python)
    # Characters first (no names, no attribute access, no calls, no strings can get through), then
    # the tree: only + - * / on int literals (rejects **, //, unary minus, ...).
    if len(text) > MAX_EXPRESSION_CHARS or not _EXPRESSION_CHARS.fullmatch(text):
        return RewardResult(0, expression, "invalid_expression")
    try:
        tree = ast.parse(text.strip(), mode="eval")
        used = _literals(tree)
    except (SyntaxError, ValueError, RecursionError, MemoryError, _InvalidExpression):
        return RewardResult(0, expression, "invalid_expression")
    if Counter(used) - Counter(numbers):  # some number not given, or used more often than given
        return RewardResult(0, expression, "number_not_allowed")
    try:
        value = _evaluate(tree)
    except _InvalidExpression:
        return RewardResult(0, expression, "invalid_expression")
    return RewardResult(1, expression, "correct") if value == target else RewardResult(0, expression, "wrong")


_INTEGER = re.compile(r"[+-]?\d+")


def verify_arith(response: str, answer: Union[str, int]) -> RewardResult:
    boxed = last_boxed(response)
    if not boxed:
        return RewardResult(0, boxed, "no_answer")
    candidate = boxed.strip()
    if not _INTEGER.fullmatch(candidate) or len(candidate) > 50:
        return RewardResult(0, boxed, "wrong")
    return RewardResult(1, boxed, "correct") if int(candidate) == int(answer) else RewardResult(0, boxed, "wrong")


def verify(task: str, response: str, row_or_answer: Any) -> RewardResult:
    """Score a response for `task`. countdown needs the row (a mapping with "numbers" and
    "target"); arith and add take the row or just its answer (str or int)."""
    _check_task(task)
    if task == "countdown":
        if not isinstance(row_or_answer, Mapping) or "numbers" not in row_or_answer or "target" not in row_or_answer:
            raise TypeError(
                "countdown verification needs the row (a mapping with 'numbers' and 'target'), "
                f"got {type(row_or_answer).__name__}"
            )
        return verify_countdown(response, list(row_or_answer["numbers"]), int(row_or_answer["target"]))
    answer = row_or_answer["answer"] if isinstance(row_or_answer, Mapping) else row_or_answer
    if isinstance(answer, bool) or not isinstance(answer, (str, int)) or not _INTEGER.fullmatch(str(answer).strip()):
        raise ValueError(f"{task} answer must be an integer (str or int), got {answer!r}")
    return verify_arith(response, int(str(answer).strip()))


class SyntheticReward(RewardFn):
    """RewardFn over verify() for one synthetic task."""

    def __init__(self, task: str) -> None:
        _check_task(task)
        self.task = task
        self.name = f"synthetic:{task}"

    def score(self, response: str, answer: Any) -> RewardResult:
        return verify(self.task, response, answer)
