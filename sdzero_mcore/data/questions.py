"""The normalised question record, the field-mapping presets and per-row validation.

Every source (JSONL/JSON/Parquet file, Hub dataset, synthetic task) ends up as a list of
:class:`Question`. Rows are checked one by one when they are loaded; a bad row raises
:class:`DataError` naming the source, the row (0-based index, and the 1-based line for JSONL) and
the field, or, with ``skip_invalid``, is skipped and counted under :meth:`DataError.reason`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "DataError",
    "FIELD_PRESETS",
    "FieldMapping",
    "FieldPreset",
    "Question",
    "build_question",
    "normalise_tests",
    "question_content",
    "question_text_id",
    "resolve_fields",
]

SKIP_HINT = "set data.skip_invalid=true to skip and count invalid rows instead"


class DataError(ValueError):
    """A dataset that cannot be used as given; the message names source, row, line and field.

    ``reason`` is a short category without row details (e.g. ``missing field 'answer'``): the key
    under which a skipped row is counted in ``LoadedData.skipped``.
    """

    def __init__(
        self,
        source: str,
        problem: str,
        *,
        row: Optional[int] = None,
        line: Optional[int] = None,
        field_name: Optional[str] = None,
        reason: Optional[str] = None,
        hint: Optional[str] = None,
    ):
        self.source, self.problem, self.row, self.line, self.field = source, problem, row, line, field_name
        self.reason = reason or problem
        where = [source]
        if row is not None:
            where.append(f"row {row}" + (f" (line {line})" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if field_name is not None:
            where.append(f"field '{field_name}'")
        message = ": ".join(where) + ": " + problem
        if hint:
            message += f" ({hint})"
        super().__init__(message)


@dataclass(frozen=True)
class Question:
    """One training/eval question after field mapping and validation.

    ``answer`` is the ground truth for math-style rows (None for code rows that have none);
    ``tests`` is a list of ``{"input": str, "output": str}`` for code rows (None for math rows).
    ``source`` and ``index`` say where the row came from (index: 0-based row in that source).
    ``extra`` keeps the row's other fields, so nothing in the source is lost.
    """

    id: str
    question: str
    answer: Optional[str]
    tests: Optional[list[dict]]
    solution: Optional[str]
    source: str
    index: int
    extra: dict = field(default_factory=dict)


def question_content(q: "Question") -> tuple:
    """What makes two questions the same problem (everything but id and origin)."""
    return (q.question, q.answer or "", q.solution or "", json.dumps(q.tests, sort_keys=True, default=str))


def question_text_id(question: str) -> str:
    """A stable id from the question text: sha256, not ``hash()``, which is salted per process."""
    return "q-" + hashlib.sha256(question.encode("utf-8")).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Field presets


@dataclass(frozen=True)
class FieldPreset:
    """Where a dataset style keeps each part of a question.

    Each entry is a tuple of candidate column names; the first one the dataset has is used (the
    choice is made once per dataset from its columns, never per row, so all rows map alike).
    A preset with ``tests`` candidates describes code problems: tests are required and the
    answer optional. Otherwise it describes math problems: the answer is required.
    """

    name: str
    question: tuple[str, ...]
    answer: tuple[str, ...] = ()
    tests: tuple[str, ...] = ()
    solution: tuple[str, ...] = ()
    id: tuple[str, ...] = ("id", "uid", "uuid")

    def __post_init__(self) -> None:
        if not self.question:
            raise ValueError(f"field preset {self.name!r} names no question field")
        if not self.answer and not self.tests:
            raise ValueError(f"field preset {self.name!r} names neither answer nor tests fields")


FIELD_PRESETS: dict[str, FieldPreset] = {
    # open-r1/OpenR1-Math-220k: problem / solution / answer, ids in `uuid`.
    "openr1_math": FieldPreset(
        "openr1_math", question=("problem",), answer=("answer",), solution=("solution",),
        id=("uuid", "id", "uid"),
    ),
    # open-r1/codeforces style: the full statement in `prompt` (verifiable-prompts) or the bare
    # `description`; tests as {input, output} lists (`official_tests`), APPS-style JSON strings
    # (`input_output`) or parallel lists (code_contests `public_tests`). `examples` last: it holds
    # only the statement's sample tests, so a dataset with official tests uses those, while
    # open-r1/codeforces-cots, which has no others, is judged on them, as the authors' release did.
    "codeforces": FieldPreset(
        "codeforces", question=("prompt", "description", "question"),
        tests=("official_tests", "tests", "input_output", "public_tests", "examples"), solution=("solution",),
    ),
    # question / answer / solution, as the synthetic tasks write them.
    "plain": FieldPreset("plain", question=("question",), answer=("answer",), solution=("solution",)),
}

# The order in which `auto` tries the presets: the most specific column names first, so a
# dataset with a `problem` column is not mistaken for a plain one that happens to have `answer`.
AUTO_ORDER = ("openr1_math", "codeforces", "plain")


@dataclass(frozen=True)
class FieldMapping:
    """The concrete column names one dataset is read with (None: the dataset has no such part)."""

    preset: str
    question: str
    answer: Optional[str]
    tests: Optional[str]
    solution: Optional[str]
    id: Optional[str]

    @property
    def kind(self) -> str:
        """``code`` when rows carry tests (then tests are required), else ``math`` (answer required)."""
        return "code" if self.tests is not None else "math"

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)!r}" for name in ("question", "answer", "tests", "solution", "id")]
        return f"preset {self.preset} ({self.kind}): " + ", ".join(p for p in parts if not p.endswith("=None"))

    def used_fields(self) -> set[str]:
        return {f for f in (self.question, self.answer, self.tests, self.solution, self.id) if f is not None}


def resolve_fields(
    preset: str,
    columns: Iterable[str],
    source: str,
    *,
    question_field: Optional[str] = None,
    answer_field: Optional[str] = None,
    tests_field: Optional[str] = None,
    solution_field: Optional[str] = None,
    id_field: Optional[str] = None,
) -> FieldMapping:
    """The column names to read ``source`` with: the preset's, with explicit field names winning.

    ``preset="auto"`` takes the first preset (in ``AUTO_ORDER``) whose question column and answer
    or tests column the dataset has. Explicitly named fields must be columns of the dataset: a
    typo is an error here rather than every row failing later with 'missing field'.
    """
    columns = list(dict.fromkeys(columns))
    available = set(columns)
    explicit = {
        "question": question_field, "answer": answer_field, "tests": tests_field,
        "solution": solution_field, "id": id_field,
    }
    # Checked before any preset is chosen, so a typo is reported as such and not as 'no preset fits'.
    for role, name in explicit.items():
        if name is not None and name not in available:
            raise DataError(
                source,
                f"the {role} field {name!r} is not a column of this dataset; columns: {', '.join(columns) or 'none'}",
                field_name=name,
            )
    if preset == "auto":
        chosen = _detect_preset(available, question_field, answer_field, tests_field)
        if chosen is None:
            tried = "; ".join(
                f"{name}: question in {FIELD_PRESETS[name].question} and "
                + (f"tests in {FIELD_PRESETS[name].tests}" if FIELD_PRESETS[name].tests
                   else f"answer in {FIELD_PRESETS[name].answer}")
                for name in AUTO_ORDER
            )
            raise DataError(
                source,
                f"no field preset matches its columns ({', '.join(columns) or 'none'}); tried {tried}; "
                "set data.field_preset or data.question_field / data.answer_field / data.tests_field",
            )
        preset_obj = FIELD_PRESETS[chosen]
    elif preset in FIELD_PRESETS:
        preset_obj = FIELD_PRESETS[preset]
    else:
        raise DataError(
            source, f"unknown field preset {preset!r}; choose from auto, {', '.join(FIELD_PRESETS)}"
        )

    def pick(role: str, candidates: tuple[str, ...]) -> Optional[str]:
        if explicit[role] is not None:
            return explicit[role]
        return next((c for c in candidates if c in available), None)

    question = pick("question", preset_obj.question)
    answer = pick("answer", preset_obj.answer)
    tests = pick("tests", preset_obj.tests)
    solution = pick("solution", preset_obj.solution)
    id_ = pick("id", preset_obj.id)
    # Name the column the preset expected, so every row reports it as missing rather than the
    # load failing with a vague 'nothing found'; a code preset without a tests column likewise.
    if question is None:
        question = preset_obj.question[0]
    if tests is None and preset_obj.tests:
        tests = preset_obj.tests[0]
    if answer is None and tests is None:
        answer = preset_obj.answer[0]
    return FieldMapping(preset_obj.name, question, answer, tests, solution, id_)


def _detect_preset(
    available: set[str], question_field: Optional[str], answer_field: Optional[str], tests_field: Optional[str]
) -> Optional[str]:
    for name in AUTO_ORDER:
        preset = FIELD_PRESETS[name]
        has_question = question_field in available if question_field else any(c in available for c in preset.question)
        if preset.tests or tests_field:
            candidates = (tests_field,) if tests_field else preset.tests
        else:
            candidates = (answer_field,) if answer_field else preset.answer
        if has_question and any(c in available for c in candidates):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Per-row validation


class RowProblem(Exception):
    """A problem with one field of one row; the loader adds source, row and line to it."""

    def __init__(self, field_name: Optional[str], problem: str, reason: str):
        super().__init__(problem)
        self.field, self.problem, self.reason = field_name, problem, reason


def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "bool", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _require_text(row: Mapping[str, Any], name: str, role: str) -> str:
    value = row.get(name)
    if value is None:
        present = ", ".join(k for k, v in row.items() if v is not None) or "none"
        raise RowProblem(name, f"missing (the row has: {present})", f"missing field '{name}'")
    # A numeric answer (e.g. 42 in JSON) is converted to its text; booleans are not numbers here.
    if role == "answer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            # JSON NaN, Infinity or a Parquet null float: str() would make it the answer "nan".
            raise RowProblem(
                name, f"the answer is {value!r}, not a finite number (NaN usually marks a missing value)",
                f"non-finite number in field '{name}'",
            )
        value = str(value)
    if not isinstance(value, str):
        raise RowProblem(
            name,
            f"the {role} must be a string, got {_type_name(value)} {_short(value)}",
            f"wrong type for field '{name}'",
        )
    if not value.strip():
        raise RowProblem(name, f"the {role} is empty or whitespace only", f"empty field '{name}'")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalise_tests(value: Any) -> list[dict]:
    """Test cases as a list of ``{"input": str, "output": str}``.

    Accepted shapes: a list of ``{input, output}`` dicts (extra keys are kept); parallel lists
    ``{"inputs": [...], "outputs": [...]}`` (or ``input``/``output``); either of those as a JSON
    string. Raises ValueError describing what is wrong; an empty list is returned as is (the
    caller decides whether no tests is an error).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"a string that is not valid JSON ({err.msg} at char {err.pos})") from None
    if isinstance(value, Mapping):
        inputs_key = next((k for k in ("inputs", "input") if k in value), None)
        outputs_key = next((k for k in ("outputs", "output") if k in value), None)
        if inputs_key is None or outputs_key is None:
            raise ValueError(
                f"an object without parallel input/output lists (keys: {', '.join(map(str, value)) or 'none'}); "
                "expected {'inputs': [...], 'outputs': [...]}"
            )
        inputs, outputs = value[inputs_key], value[outputs_key]
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ValueError(
                f"'{inputs_key}' and '{outputs_key}' must be lists, got {_type_name(inputs)} and {_type_name(outputs)}"
            )
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} {inputs_key} but {len(outputs)} {outputs_key}")
        value = [{"input": i, "output": o} for i, o in zip(inputs, outputs, strict=True)]
    if not isinstance(value, list):
        raise ValueError(f"a {_type_name(value)}, expected a list of {{input, output}} objects")
    tests = []
    for k, case in enumerate(value):
        if not isinstance(case, Mapping):
            raise ValueError(f"test {k} is a {_type_name(case)}, expected an object with input and output")
        for key in ("input", "output"):
            if key not in case or case[key] is None:
                raise ValueError(f"test {k} has no '{key}'")
            if not isinstance(case[key], str):
                raise ValueError(f"test {k} '{key}' must be a string, got {_type_name(case[key])}")
        tests.append(dict(case))
    return tests


def build_question(
    row: Mapping[str, Any],
    mapping: FieldMapping,
    *,
    source: str,
    index: int,
    extra_fields: Optional[Sequence[str]] = None,
) -> Question:
    """Validate one raw row and turn it into a :class:`Question`; RowProblem if it is invalid.

    ``extra_fields``: which other fields to keep in ``Question.extra`` (None: all of them).
    """
    if not isinstance(row, Mapping):
        raise RowProblem(None, f"the row is a {_type_name(row)}, expected an object", "row is not an object")
    question = _require_text(row, mapping.question, "question")

    answer = None
    if mapping.kind == "math":
        answer = _require_text(row, mapping.answer, "answer")  # type: ignore[arg-type]
    elif mapping.answer is not None and row.get(mapping.answer) is not None:
        answer = _require_text(row, mapping.answer, "answer")

    tests = None
    if mapping.tests is not None:
        raw = row.get(mapping.tests)
        if raw is None:
            present = ", ".join(k for k, v in row.items() if v is not None) or "none"
            raise RowProblem(mapping.tests, f"missing (the row has: {present})", f"missing field '{mapping.tests}'")
        try:
            tests = normalise_tests(raw)
        except ValueError as err:
            raise RowProblem(
                mapping.tests, f"malformed tests: {err}", f"malformed tests in field '{mapping.tests}'"
            ) from None
        if not tests:
            raise RowProblem(mapping.tests, "no test cases", f"empty field '{mapping.tests}'")

    solution = None
    if mapping.solution is not None and row.get(mapping.solution) is not None:
        solution = row[mapping.solution]
        if not isinstance(solution, str):
            raise RowProblem(
                mapping.solution,
                f"the solution must be a string, got {_type_name(solution)}",
                f"wrong type for field '{mapping.solution}'",
            )

    qid = None
    if mapping.id is not None and row.get(mapping.id) is not None:
        raw_id = row[mapping.id]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise RowProblem(
                mapping.id, f"the id must be a string or an integer, got {_type_name(raw_id)}",
                f"wrong type for field '{mapping.id}'",
            )
        qid = str(raw_id)
        if not qid.strip():
            raise RowProblem(mapping.id, "the id is empty", f"empty field '{mapping.id}'")
    if qid is None:
        qid = question_text_id(question)

    used = mapping.used_fields()
    if extra_fields is None:
        extra = {k: v for k, v in row.items() if k not in used}
    else:
        extra = {k: row[k] for k in extra_fields if k in row and k not in used}
    return Question(
        id=qid, question=question, answer=answer, tests=tests, solution=solution,
        source=source, index=index, extra=extra,
    )
