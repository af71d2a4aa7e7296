"""Load questions from a local file, a Hugging Face Hub dataset or a synthetic task.

``load_rows`` resolves the field mapping once per dataset (see ``questions.FIELD_PRESETS``),
validates every row and returns :class:`LoadedData`. Errors name the source, the row (0-based
index; for JSONL also the 1-based line) and the field. With ``skip_invalid=True`` invalid rows are
skipped, counted per reason in ``LoadedData.skipped`` and summarised in one log line; nothing is
dropped without being counted.

Beyond each row's fields: a row larger than ``max_row_bytes`` is invalid (a JSONL line is never
read whole past the cap); two rows of a source with the same id and different content are an
error naming both rows (with ``skip_invalid``, the later row is skipped and both are named in the
log); with ``max_prompt_tokens`` and a token counter, a row whose prompt is longer is an error or,
with ``long_prompts="skip"``, skipped and counted. ``load_from_config`` counts tokens with the
run's tokenizer, which the caller passes (the phases and the CLI's checks before work).

Sources, in the order they are recognised:

- ``synthetic:<task>``: rows from ``sdzero_mcore.rewards.synthetic.generate_rows(task, n, seed)``.
- an existing file: ``.jsonl``/``.ndjson`` is parsed here line by line (so a malformed line is
  reported with its line number); ``.json`` and ``.parquet`` go through
  ``datasets.load_dataset("json"/"parquet")``. ``data_format`` overrides the extension.
- anything else that does not look like a file path: a Hub dataset name, loaded with
  ``datasets.load_dataset(name, subset, split=split)``.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from sdzero_mcore.data.prompts import prompt_ids
from sdzero_mcore.data.questions import (
    FIELD_PRESETS,
    SKIP_HINT,
    DataError,
    FieldMapping,
    Question,
    RowProblem,
    build_question,
    question_content,
    resolve_fields,
)

if TYPE_CHECKING:
    from sdzero_mcore.config import DataConfig

__all__ = ["DATA_FORMATS", "DEFAULT_MAX_ROW_BYTES", "LONG_PROMPT_ACTIONS", "LoadedData", "load_from_config", "load_rows"]

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
DATA_FORMATS = ("auto", "jsonl", "json", "parquet")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
# Far above any real question with its tests, far below what hurts: a 50 MB one-line question once
# grew a run to 4 GB.
DEFAULT_MAX_ROW_BYTES = 16 << 20
LONG_PROMPT_ACTIONS = ("error", "skip")
LONG_PROMPT_REASON = "prompt over data.max_prompt_tokens"
DUPLICATE_ID_REASON = "duplicate id with different content"
_NAMED_DUPLICATES_LOGGED = 20  # skipped duplicate ids named one per log line; the rest are counted

# The tokenizer load_from_config counts prompt tokens with. The phases call load_from_config with
# the data section only, so the CLI registers the run's tokenizer here before dispatching a phase.
@dataclass
class LoadedData:
    """The valid questions of one source, and what was skipped (reason -> count)."""

    questions: list[Question]
    skipped: dict[str, int]
    source: str
    fields: FieldMapping
    rows_read: int  # rows looked at (valid + skipped); with `limit`, at most that many

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    def __getitem__(self, i: int) -> Question:
        return self.questions[i]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source}: {len(self.questions)} questions from {self.rows_read} rows"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            text += f", skipped {self.num_skipped} invalid ({reasons})"
        return text


@dataclass
class _RawRow:
    index: int  # 0-based row index in the source
    line: Optional[int]  # 1-based line number, JSONL only
    row: Any  # the parsed row (normally a dict)
    problem: Optional[RowProblem] = None  # set when the row could not even be parsed


@dataclass
class _RawRows:
    rows: list[_RawRow]
    columns: list[str] = field(default_factory=list)
    # A `datasets.Dataset` whose rows are read only after the field mapping is known, so that
    # with `extra_fields` set the unused (possibly huge) columns are never turned into Python.
    dataset: Any = None


def load_rows(
    source: str,
    *,
    split: str = "train",
    subset: Optional[str] = None,
    preset: str = "auto",
    question_field: Optional[str] = None,
    answer_field: Optional[str] = None,
    tests_field: Optional[str] = None,
    solution_field: Optional[str] = None,
    id_field: Optional[str] = None,
    skip_invalid: bool = False,
    limit: Optional[int] = None,
    data_format: str = "auto",
    extra_fields: Optional[Sequence[str]] = None,
    synthetic_size: Optional[int] = None,
    synthetic_seed: int = 0,
    cache_dir: Optional[str] = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    max_prompt_tokens: Optional[int] = None,
    count_prompt_tokens: Optional[Callable[[str], int]] = None,
    long_prompts: str = "error",
) -> LoadedData:
    """Load, map and validate the questions of ``source``.

    ``preset``: a key of ``FIELD_PRESETS`` or ``auto`` (chosen from the dataset's columns); the
    explicit ``*_field`` names override the preset's. ``limit``: read at most this many rows of the
    source (the first ones), counting invalid rows too. ``split``/``subset`` select a Hub dataset's
    split and configuration; a local file is a single split. ``extra_fields``: which other fields
    to keep in ``Question.extra`` (None keeps all; ``[]`` saves memory on wide datasets such as
    OpenR1-Math, whose `generations` and `messages` columns are large). ``synthetic_size`` is the
    number of rows to generate for ``synthetic:<task>`` (default: ``limit``), ``synthetic_seed``
    their seed. ``cache_dir`` is passed to ``datasets.load_dataset``. ``max_row_bytes``: the
    largest row accepted (a JSONL line, or the used fields of another source's row).
    ``max_prompt_tokens`` with ``count_prompt_tokens`` (question text -> prompt tokens): longer
    prompts are an error, or with ``long_prompts="skip"`` skipped and counted.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(repr(source), "the dataset source must be a non-empty string")
    if limit is not None and limit < 1:
        raise DataError(source, f"limit must be >= 1 or None, got {limit}")
    if data_format not in DATA_FORMATS:
        raise DataError(source, f"unknown data format {data_format!r}; choose from {', '.join(DATA_FORMATS)}")
    if long_prompts not in LONG_PROMPT_ACTIONS:
        raise DataError(source, f"long_prompts must be one of {', '.join(LONG_PROMPT_ACTIONS)}, got {long_prompts!r}")
    if max_row_bytes < 1:
        raise DataError(source, f"max_row_bytes must be >= 1, got {max_row_bytes}")

    if preset != "auto" and preset not in FIELD_PRESETS:  # before a possibly long download
        raise DataError(source, f"unknown field preset {preset!r}; choose from auto, {', '.join(FIELD_PRESETS)}")

    kind = _source_kind(source, data_format)
    if kind == "synthetic":
        raw = _read_synthetic(source, synthetic_size if synthetic_size is not None else limit, synthetic_seed)
    elif kind == "jsonl":
        raw = _read_jsonl(Path(source).expanduser(), source, limit, max_row_bytes)
    elif kind in ("json", "parquet"):
        raw = _read_with_datasets(kind, source, split, limit, cache_dir)
    else:
        raw = _read_hub(source, subset, split, limit, cache_dir)
    mapping = resolve_fields(
        preset, raw.columns, source, question_field=question_field, answer_field=answer_field,
        tests_field=tests_field, solution_field=solution_field, id_field=id_field,
    )
    logger.info("data: %s read with %s", source, mapping.describe())
    if raw.dataset is not None:
        raw.rows = _rows_from_dataset(raw.dataset, mapping, extra_fields)
    if limit is not None:
        raw.rows = raw.rows[:limit]

    questions: list[Question] = []
    skipped: Counter[str] = Counter()
    first_of_id: dict[str, tuple[_RawRow, Question]] = {}
    for raw_row in raw.rows:
        try:
            if raw_row.problem is not None:
                raise raw_row.problem
            question = build_question(raw_row.row, mapping, source=source, index=raw_row.index, extra_fields=extra_fields)
            if raw_row.line is None:  # a JSONL line was capped as it was read
                _check_row_bytes(question, max_row_bytes)
            _check_duplicate(question, raw_row, first_of_id, mapping)
            if max_prompt_tokens is not None and count_prompt_tokens is not None:
                tokens = count_prompt_tokens(question.question)
                if tokens > max_prompt_tokens:
                    raise RowProblem(
                        mapping.question, f"the prompt is {tokens} tokens, over data.max_prompt_tokens ({max_prompt_tokens})",
                        LONG_PROMPT_REASON,
                    )
        except RowProblem as problem:
            # Long prompts follow long_prompts (an expected, routine filter); every other problem
            # follows skip_invalid (a broken row).
            skip = long_prompts == "skip" if problem.reason == LONG_PROMPT_REASON else skip_invalid
            if not skip:
                hint = "set data.long_prompts=skip to skip and count such rows" if problem.reason == LONG_PROMPT_REASON else SKIP_HINT
                raise DataError(
                    source, problem.problem, row=raw_row.index, line=raw_row.line, field_name=problem.field,
                    reason=problem.reason, hint=hint,
                ) from None
            if problem.reason == DUPLICATE_ID_REASON and skipped[problem.reason] < _NAMED_DUPLICATES_LOGGED:
                logger.warning("data: %s: skipped %s: %s", source, _where(raw_row), problem.problem)
            skipped[problem.reason] += 1
            continue
        first_of_id.setdefault(question.id, (raw_row, question))
        questions.append(question)

    loaded = LoadedData(questions, dict(skipped), source, mapping, rows_read=len(raw.rows))
    if skipped:
        logger.warning("data: %s", loaded.summary())
    if not questions:
        raise DataError(
            source,
            f"no valid questions in {len(raw.rows)} rows"
            + (f" (skipped: {', '.join(f'{r}: {c}' for r, c in sorted(skipped.items()))})" if skipped else ""),
        )
    return loaded


def load_from_config(data: "DataConfig", *, cache_dir: Optional[str] = None, prompt_tokenizer: Any = None) -> LoadedData:
    """``load_rows`` with the settings of a ``DataConfig`` (the ``data`` section of the run config).
    Prompt tokens are counted with ``prompt_tokenizer`` (the run's; None: not counted), on the
    prompt as ``data.prompt_template`` renders it.

    A synthetic task generates ``synthetic_size`` rows. By default it generates as many as both
    phases need (``phase1_questions + phase2_questions``) *unique* questions: random generators
    repeat questions (about 90 repeats in 15000 arith rows), and repeats are one question to
    ``split_phases``, so the size grows until there are enough distinct ones.
    """
    if data.synthetic_size is None and data.dataset.startswith(SYNTHETIC_PREFIX):
        needed = data.phase1_questions + data.phase2_questions
        size = needed
        for _ in range(_SYNTHETIC_GROW_ATTEMPTS):
            loaded = _load_configured(data, cache_dir, prompt_tokenizer, synthetic_size=size)
            unique = len({q.id for q in loaded})
            if unique >= needed:
                break
            size += 2 * (needed - unique) + 16
        # Still short (a task with too few distinct questions): split_phases names the shortfall.
        return loaded
    return _load_configured(data, cache_dir, prompt_tokenizer, synthetic_size=data.synthetic_size)


_SYNTHETIC_GROW_ATTEMPTS = 8


def _load_configured(data: "DataConfig", cache_dir: Optional[str], prompt_tokenizer: Any, *,
                     synthetic_size: Optional[int]) -> LoadedData:
    return load_rows(
        data.dataset,
        split=data.split,
        subset=data.subset,
        preset=data.field_preset,
        question_field=data.question_field,
        answer_field=data.answer_field,
        tests_field=data.tests_field,
        solution_field=data.solution_field,
        id_field=data.id_field,
        skip_invalid=data.skip_invalid,
        limit=data.limit,
        data_format=data.data_format,
        extra_fields=data.extra_fields,
        synthetic_size=synthetic_size,
        synthetic_seed=data.synthetic_seed,
        cache_dir=cache_dir,
        max_row_bytes=data.max_row_bytes,
        max_prompt_tokens=data.max_prompt_tokens,
        count_prompt_tokens=_prompt_token_counter(prompt_tokenizer, data.prompt_template),
        long_prompts=data.long_prompts,
    )


def _prompt_token_counter(tokenizer: Any, template: str) -> Optional[Callable[[str], int]]:
    if tokenizer is None:
        return None
    return lambda question: len(prompt_ids(tokenizer, question, template=template))


# ---------------------------------------------------------------------------------------------
# Row checks beyond the fields


def _where(raw_row: _RawRow) -> str:
    return f"row {raw_row.index}" + (f" (line {raw_row.line})" if raw_row.line is not None else "")


def _check_row_bytes(question: Question, max_row_bytes: int) -> None:
    """A row from `datasets` is already in memory; this keeps an oversized one out of the run."""
    size = sum(len(part.encode("utf-8")) for part in question_content(question))
    if size > max_row_bytes:
        raise RowProblem(None, f"the row's text is {size} bytes, over data.max_row_bytes ({max_row_bytes})",
                         "row over data.max_row_bytes")


def _check_duplicate(question: Question, raw_row: _RawRow, first_of_id: dict, mapping: FieldMapping) -> None:
    first = first_of_id.get(question.id)
    if first is None:
        return
    first_row, first_question = first
    if question_content(first_question) == question_content(question):
        return  # an exact repeat is one question (split_phases keeps one)
    fields = ("question", "answer", "solution", "tests")
    differing = [name for name, a, b in zip(fields, question_content(first_question), question_content(question)) if a != b]
    raise RowProblem(
        mapping.id or mapping.question,
        f"id {question.id!r} repeats {_where(first_row)} with a different {', '.join(differing)}",
        DUPLICATE_ID_REASON,
    )


# ---------------------------------------------------------------------------------------------
# Sources


def _looks_like_path(source: str) -> bool:
    """Whether a string that names no existing file was meant as one (so: 'file not found')."""
    lowered = source.lower()
    if any(lowered.endswith(suffix) for suffix in (*_SUFFIX_FORMATS, ".csv", ".txt", ".arrow", ".gz")):
        return True
    # Hub names are 'name' or 'org/name'; a path has a root, a dot-prefix or more components.
    return source.startswith(("/", "./", "../", "~", "\\")) or source.count("/") > 1


def _source_kind(source: str, data_format: str) -> str:
    if source.startswith(SYNTHETIC_PREFIX):
        return "synthetic"
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise DataError(source, "is a directory; give a .jsonl, .json or .parquet file")
        if data_format != "auto":
            return data_format
        fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                source,
                f"cannot tell the file format from the extension {path.suffix or '(none)'!r}; "
                f"use .jsonl, .json or .parquet, or set data.data_format",
            )
        return fmt
    if data_format != "auto" or _looks_like_path(source):
        raise DataError(source, "file not found")
    return "hub"


def _read_jsonl(path: Path, source: str, limit: Optional[int], max_row_bytes: int) -> _RawRows:
    """Parse JSON Lines here rather than with `datasets`, to report a bad line by its number.

    Blank lines are allowed (and not rows); the row index counts the non-blank lines from 0. A
    line longer than ``max_row_bytes`` is read in bounded pieces and dropped, never held whole.
    """
    rows: list[_RawRow] = []
    columns: dict[str, None] = {}
    try:
        handle = path.open("rb")
    except OSError as err:
        raise DataError(source, f"cannot be opened: {err.strerror or err}") from None
    with handle:
        line_number = 0
        while limit is None or len(rows) < limit:
            raw_line = handle.readline(max_row_bytes + 1)
            if not raw_line:
                break
            line_number += 1
            index = len(rows)
            if len(raw_line.rstrip(b"\r\n")) > max_row_bytes:
                size = len(raw_line)
                while not raw_line.endswith(b"\n"):  # skip the rest of the line
                    raw_line = handle.readline(1 << 20)
                    if not raw_line:
                        break
                    size += len(raw_line)
                problem = RowProblem(
                    None, f"the line is over data.max_row_bytes ({max_row_bytes} bytes; it has {size})",
                    "row over data.max_row_bytes",
                )
                rows.append(_RawRow(index, line_number, None, problem))
                continue
            try:
                # utf-8-sig: a byte-order mark on the first line is not part of the JSON.
                text = raw_line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problem = RowProblem(None, f"not valid UTF-8 (byte {err.start})", "invalid UTF-8")
                rows.append(_RawRow(index, line_number, None, problem))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                problem = RowProblem(None, f"invalid JSON: {err.msg} at column {err.colno}", "invalid JSON")
                rows.append(_RawRow(index, line_number, None, problem))
                continue
            if isinstance(row, dict):
                columns.update(dict.fromkeys(row))
            rows.append(_RawRow(index, line_number, row))
    if not rows:
        raise DataError(source, "the file has no rows")
    return _RawRows(rows, list(columns))


def _root_cause(err: BaseException) -> str:
    """The innermost error's text: `datasets` wraps the useful message (bad JSON, bad cast) in chains."""
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or err.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        err = nxt
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _import_datasets():
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise DataError(
            "datasets", "the `datasets` package is needed for .json, .parquet and Hub sources: pip install datasets"
        ) from None


def _pending_dataset(ds: Any, limit: Optional[int]) -> _RawRows:
    if limit is not None and len(ds) > limit:
        ds = ds.select(range(limit))
    return _RawRows([], list(ds.column_names), dataset=ds)


def _rows_from_dataset(ds: Any, mapping: FieldMapping, extra_fields: Optional[Sequence[str]]) -> list[_RawRow]:
    if extra_fields is not None:
        keep = mapping.used_fields() | set(extra_fields)
        ds = ds.select_columns([c for c in ds.column_names if c in keep])
    return [_RawRow(i, None, row) for i, row in enumerate(ds)]


def _read_with_datasets(fmt: str, source: str, split: str, limit: Optional[int], cache_dir: Optional[str]) -> _RawRows:
    datasets = _import_datasets()
    path = str(Path(source).expanduser())
    try:
        ds = datasets.load_dataset(fmt, data_files={split: path}, split=split, cache_dir=cache_dir)
    except Exception as err:  # datasets raises many types (build, cast, arrow); all mean unreadable
        raise DataError(source, f"cannot be read as {fmt}: {_root_cause(err)}") from err
    if len(ds) == 0:
        raise DataError(source, "the file has no rows")
    return _pending_dataset(ds, limit)


def _read_hub(name: str, subset: Optional[str], split: str, limit: Optional[int], cache_dir: Optional[str]) -> _RawRows:
    datasets = _import_datasets()
    not_local = "no local file of that name exists, so it was taken as a Hugging Face Hub dataset"
    try:
        ds = datasets.load_dataset(name, subset, split=split, cache_dir=cache_dir)
    except ConnectionError as err:
        # Offline mode and network failures both arrive here (after datasets' own retries).
        raise DataError(
            name,
            f"cannot load the Hub dataset {name!r}: the Hugging Face Hub is unreachable (offline mode or no "
            f"network) and the dataset is not in the local cache ({not_local}; {type(err).__name__}: {err})",
        ) from err
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(name, f"not found on the Hugging Face Hub ({not_local}): {_root_cause(err)}") from err
    except Exception as err:  # a bad split or subset name, a gated dataset, an unreadable shard
        raise DataError(name, f"cannot load the Hub dataset {name!r} (subset {subset}, split {split!r}): "
                        f"{_root_cause(err)}") from err
    return _pending_dataset(ds, limit)


def _read_synthetic(source: str, size: Optional[int], seed: int) -> _RawRows:
    task = source[len(SYNTHETIC_PREFIX):].strip()
    if not task:
        raise DataError(source, "no task named; write synthetic:<task>, e.g. synthetic:arith")
    if size is None or size < 1:
        raise DataError(source, f"a synthetic dataset needs a size >= 1 (synthetic_size or limit), got {size}")
    try:
        synthetic = importlib.import_module("sdzero_mcore.rewards.synthetic")
    except ImportError as err:
        raise DataError(source, f"synthetic tasks are unavailable: {err}") from err
    try:
        rows = synthetic.generate_rows(task, size, seed)
    except (ValueError, KeyError) as err:  # an unknown task or bad arguments
        raise DataError(source, f"cannot generate the synthetic task {task!r}: {err}") from err
    rows = list(rows)
    if len(rows) != size:
        raise DataError(source, f"generate_rows({task!r}, {size}, {seed}) returned {len(rows)} rows, not {size}")
    columns: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            columns.update(dict.fromkeys(row))
    return _RawRows([_RawRow(i, None, row) for i, row in enumerate(rows)], list(columns))
