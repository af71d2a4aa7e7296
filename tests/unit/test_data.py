"""Tests for sdzero_mcore.data: loading (jsonl/json/parquet/hub/synthetic), validation, presets, split."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from sdzero_mcore.config import ConfigError, DataConfig, load_config
from sdzero_mcore.data import (
    FIELD_PRESETS,
    DataError,
    Question,
    load_from_config,
    load_rows,
    normalise_tests,
    question_text_id,
    split_phases,
)
from sdzero_mcore.data.questions import SKIP_HINT


def write_jsonl(path: Path, rows: list) -> Path:
    """One JSON value per line; a str item is written verbatim (for malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def data_error(*args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_rows(*args, **kwargs)
    return str(info.value)


@pytest.fixture
def cache_dir(tmp_path):
    # datasets writes Arrow caches for local json/parquet files; keep them out of ~/.cache.
    return str(tmp_path / "hf_cache")


MATH_ROWS = [
    {"question": "What is 1+1?", "answer": "2", "solution": "1+1=2", "id": "m-1", "level": 1},
    {"question": "What is 2*3?", "answer": "6", "level": 2},
    {"question": "What is 10-4?", "answer": "6", "solution": None, "id": "m-3", "level": 3},
]


# --- loading: formats --------------------------------------------------------------------------


def test_jsonl_plain_rows(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH_ROWS)
    loaded = load_rows(str(path))
    assert loaded.fields.preset == "plain" and loaded.fields.kind == "math"
    assert loaded.skipped == {} and loaded.rows_read == 3 and len(loaded) == 3
    first, second, third = loaded.questions
    assert first == Question(
        id="m-1", question="What is 1+1?", answer="2", tests=None, solution="1+1=2",
        source=str(path), index=0, extra={"level": 1},
    )
    # no id field: a hash of the question text, the same in every process
    assert second.id == question_text_id("What is 2*3?") and second.id.startswith("q-")
    assert second.solution is None and second.index == 1
    assert third.id == "m-3" and third.solution is None


def test_json_array_file(tmp_path, cache_dir):
    path = write_json(tmp_path / "math.json", MATH_ROWS)
    loaded = load_rows(str(path), cache_dir=cache_dir)
    assert [q.question for q in loaded] == [r["question"] for r in MATH_ROWS]
    assert [q.id for q in loaded][0::2] == ["m-1", "m-3"]
    # datasets fills absent keys with None; extra keeps the rest of the row
    assert loaded[1].extra == {"level": 2}


def test_parquet_file(tmp_path, cache_dir):
    path = write_parquet(tmp_path / "math.parquet", MATH_ROWS)
    loaded = load_rows(str(path), cache_dir=cache_dir)
    assert [(q.question, q.answer, q.index) for q in loaded] == [
        ("What is 1+1?", "2", 0), ("What is 2*3?", "6", 1), ("What is 10-4?", "6", 2)
    ]
    assert loaded[0].solution == "1+1=2"


@pytest.mark.parametrize("extra_fields, expected", [(None, {"level": 1}), ([], {}), (["level"], {"level": 1})])
def test_extra_fields_parquet(tmp_path, cache_dir, extra_fields, expected):
    rows = [{**MATH_ROWS[0], "generations": ["long text"]}]
    if extra_fields is None:
        expected = {**expected, "generations": ["long text"]}
    path = write_parquet(tmp_path / "wide.parquet", rows)
    (q,) = load_rows(str(path), extra_fields=extra_fields, cache_dir=cache_dir).questions
    assert q.extra == expected and (q.question, q.answer, q.solution, q.id) == ("What is 1+1?", "2", "1+1=2", "m-1")


def test_openr1_math_preset_is_detected(tmp_path):
    rows = [{"problem": "Find x: x+1=3.", "answer": "2", "solution": "x=2", "uuid": "u-9", "generations": ["..."]}]
    loaded = load_rows(str(write_jsonl(tmp_path / "openr1.jsonl", rows)), extra_fields=[])
    assert loaded.fields.preset == "openr1_math"
    (q,) = loaded.questions
    assert (q.id, q.question, q.answer, q.solution, q.extra) == ("u-9", "Find x: x+1=3.", "2", "x=2", {})


def test_explicit_fields_override_preset(tmp_path):
    rows = [{"prompt_text": "What is 3+4?", "final": "7", "key": 17}]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    loaded = load_rows(str(path), preset="plain", question_field="prompt_text", answer_field="final", id_field="key")
    (q,) = loaded.questions
    assert (q.id, q.question, q.answer) == ("17", "What is 3+4?", "7")


def test_numeric_answer_becomes_text(tmp_path):
    loaded = load_rows(str(write_jsonl(tmp_path / "n.jsonl", [{"question": "6*7?", "answer": 42}])))
    assert loaded[0].answer == "42"


def test_limit_reads_first_rows_only(tmp_path):
    rows = MATH_ROWS + ["{not json"]  # beyond the limit: never read
    loaded = load_rows(str(write_jsonl(tmp_path / "m.jsonl", rows)), limit=2)
    assert [q.index for q in loaded] == [0, 1] and loaded.rows_read == 2


def test_data_format_overrides_extension(tmp_path):
    path = tmp_path / "rows.txt"
    write_jsonl(path, MATH_ROWS)
    assert len(load_rows(str(path), data_format="jsonl")) == 3
    message = data_error(str(path))
    assert message == (
        f"{path}: cannot tell the file format from the extension '.txt'; "
        "use .jsonl, .json or .parquet, or set data.data_format"
    )


def test_jsonl_blank_lines_and_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    first, second = (json.dumps(row).encode() for row in MATH_ROWS[:2])
    path.write_bytes(b"\xef\xbb\xbf" + first + b"\n\n  \n" + second)
    loaded = load_rows(str(path))
    assert [q.index for q in loaded] == [0, 1]


# --- loading: errors ---------------------------------------------------------------------------


def test_missing_field_names_file_row_line_field(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [MATH_ROWS[0], "", {"question": "no answer here", "id": 5}])
    message = data_error(str(path))
    assert message == (
        f"{path}: row 1 (line 3): field 'answer': missing (the row has: question, id) ({SKIP_HINT})"
    )


def test_empty_answer(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q?", "answer": " \n\t"}])
    message = data_error(str(path))
    assert message.startswith(f"{path}: row 0 (line 1): field 'answer': the answer is empty or whitespace only")


def test_bad_json_line_reports_line_number(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [MATH_ROWS[0], "", "", '{"question": "q", "answer": }'])
    message = data_error(str(path))
    assert message.startswith(f"{path}: row 1 (line 4): invalid JSON: Expecting value at column 29")


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(json.dumps(MATH_ROWS[0]).encode() + b'\n{"question": "\xff", "answer": "1"}\n')
    assert data_error(str(path)).startswith(f"{path}: row 1 (line 2): not valid UTF-8")


def test_non_string_question(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": 12345, "answer": "1"}])
    message = data_error(str(path))
    assert message.startswith(f"{path}: row 0 (line 1): field 'question': the question must be a string, got int 12345")


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [MATH_ROWS[0], [1, 2]])
    assert data_error(str(path)).startswith(f"{path}: row 1 (line 2): the row is a list, expected an object")


def test_parquet_errors_name_row_without_line(tmp_path, cache_dir):
    rows = [MATH_ROWS[0], {"question": "q2", "answer": "", "solution": None, "id": "x", "level": 0}]
    path = write_parquet(tmp_path / "m.parquet", rows)
    message = data_error(str(path), cache_dir=cache_dir)
    assert message.startswith(f"{path}: row 1: field 'answer': the answer is empty or whitespace only")


def test_unreadable_json_file(tmp_path, cache_dir):
    path = tmp_path / "broken.json"
    path.write_text('[{"question": "q", "answer": "1"},', encoding="utf-8")
    assert data_error(str(path), cache_dir=cache_dir).startswith(f"{path}: cannot be read as json: ")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "sub/dir/missing"])
def test_nonexistent_file(tmp_path, name):
    path = tmp_path / name
    assert data_error(str(path)) == f"{path}: file not found"


def test_directory_is_not_a_file(tmp_path):
    assert data_error(str(tmp_path)) == f"{tmp_path}: is a directory; give a .jsonl, .json or .parquet file"


def test_unknown_preset(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    assert data_error(str(path), preset="gsm8k") == (
        f"{path}: unknown field preset 'gsm8k'; choose from auto, openr1_math, codeforces, plain"
    )


def test_explicit_field_that_is_no_column(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    message = data_error(str(path), answer_field="final_answer")
    assert message == (
        f"{path}: field 'final_answer': the answer field 'final_answer' is not a column of this dataset; "
        "columns: question, answer, solution, id, level"
    )


def test_auto_preset_with_no_match(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"text": "hello", "label": 1}])
    message = data_error(str(path))
    assert message.startswith(f"{path}: no field preset matches its columns (text, label); tried openr1_math:")
    assert "set data.field_preset" in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    assert data_error(str(path)) == f"{path}: the file has no rows"


def test_hub_unreachable_is_reported(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/some-set' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = data_error("org/some-set")
    assert message.startswith(
        "org/some-set: cannot load the Hub dataset 'org/some-set': the Hugging Face Hub is unreachable"
    )
    assert "no local file of that name exists" in message and "OfflineModeIsEnabled" in message


def test_hub_unreachable_for_real():
    import datasets

    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("HF_HUB_OFFLINE is not set; without a network datasets retries for ~25 s")
    message = data_error("sdzero-test/not-a-real-dataset")
    assert "the Hugging Face Hub is unreachable" in message and "'sdzero-test/not-a-real-dataset'" in message


# --- skip_invalid --------------------------------------------------------------------------------


def test_skip_invalid_counts_each_reason(tmp_path, caplog):
    rows = [
        MATH_ROWS[0],
        {"question": "q1"},  # missing answer
        {"question": "q2", "answer": None},  # missing answer (null)
        {"question": "q3", "answer": "   "},  # empty answer
        "{oops",  # invalid JSON
        {"question": ["q4"], "answer": "1"},  # wrong type
        MATH_ROWS[1],
        {"question": "", "answer": "1"},  # empty question
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="sdzero_mcore.data"):
        loaded = load_rows(str(path), skip_invalid=True)
    assert [q.index for q in loaded] == [0, 6]
    assert loaded.skipped == {
        "missing field 'answer'": 2,
        "empty field 'answer'": 1,
        "invalid JSON": 1,
        "wrong type for field 'question'": 1,
        "empty field 'question'": 1,
    }
    assert loaded.rows_read == 8 and loaded.num_skipped == 6
    summaries = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert summaries == [
        f"data: {path}: 2 questions from 8 rows, skipped 6 invalid (empty field 'answer': 1, empty field "
        "'question': 1, invalid JSON: 1, missing field 'answer': 2, wrong type for field 'question': 1)"
    ]


def test_skip_invalid_with_nothing_left(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q"}, {"question": "r", "answer": ""}])
    message = data_error(str(path), skip_invalid=True)
    assert message == (
        f"{path}: no valid questions in 2 rows (skipped: empty field 'answer': 1, missing field 'answer': 1)"
    )


# --- code problems -------------------------------------------------------------------------------

TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]


@pytest.mark.parametrize(
    "raw",
    [
        TESTS,
        json.dumps(TESTS),
        {"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]},
        json.dumps({"inputs": ["1 2\n", "5 5\n"], "outputs": ["3\n", "10\n"]}),
        {"input": ["1 2\n", "5 5\n"], "output": ["3\n", "10\n"]},  # code_contests public_tests
    ],
    ids=["list", "json-list", "parallel", "json-parallel", "parallel-singular"],
)
def test_normalise_tests_variants(raw):
    assert normalise_tests(raw) == TESTS


@pytest.mark.parametrize(
    "raw, problem",
    [
        ("[{", "a string that is not valid JSON (Expecting property name enclosed in double quotes at char 2)"),
        ({"inputs": ["1"], "outputs": ["1", "2"]}, "1 inputs but 2 outputs"),
        ({"cases": []}, "an object without parallel input/output lists (keys: cases)"),
        ([{"input": "1"}], "test 0 has no 'output'"),
        ([{"input": "1", "output": 2}], "test 0 'output' must be a string, got int"),
        (["1 2"], "test 0 is a string, expected an object with input and output"),
        (7, "a int, expected a list of {input, output} objects"),
    ],
)
def test_normalise_tests_errors(raw, problem):
    with pytest.raises(ValueError) as info:
        normalise_tests(raw)
    assert str(info.value).startswith(problem)


def test_codeforces_rows_jsonl(tmp_path):
    rows = [
        {"id": "1A", "prompt": "Add two numbers.", "official_tests": TESTS, "title": "A"},
        {"id": "1B", "prompt": "Add again.", "official_tests": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})},
    ]
    loaded = load_rows(str(write_jsonl(tmp_path / "cf.jsonl", rows)))
    assert loaded.fields.preset == "codeforces" and loaded.fields.kind == "code"
    assert loaded[0].tests == TESTS and loaded[0].answer is None and loaded[0].extra == {"title": "A"}
    assert loaded[1].tests == [{"input": "1 2\n", "output": "3\n"}]


def test_codeforces_rows_parquet(tmp_path, cache_dir):
    rows = [
        {"id": "2A", "description": "Sum.", "tests": TESTS},
        {"id": "2B", "description": "Sum2.", "tests": TESTS[:1]},
    ]
    loaded = load_rows(str(write_parquet(tmp_path / "cf.parquet", rows)), preset="codeforces", cache_dir=cache_dir)
    assert loaded.fields.question == "description" and loaded.fields.tests == "tests"
    assert [q.tests for q in loaded] == [TESTS, TESTS[:1]]


def test_code_rows_errors(tmp_path):
    rows = [{"prompt": "p", "official_tests": []}]
    path = write_jsonl(tmp_path / "cf.jsonl", rows)
    assert data_error(str(path)).startswith(f"{path}: row 0 (line 1): field 'official_tests': no test cases")
    path = write_jsonl(tmp_path / "cf2.jsonl", [{"prompt": "p", "official_tests": TESTS}, {"prompt": "q"}])
    assert data_error(str(path), preset="codeforces").startswith(
        f"{path}: row 1 (line 2): field 'official_tests': missing (the row has: prompt)"
    )
    path = write_jsonl(tmp_path / "cf3.jsonl", [{"prompt": "p", "official_tests": {"inputs": ["1"], "outputs": []}}])
    assert data_error(str(path)).startswith(
        f"{path}: row 0 (line 1): field 'official_tests': malformed tests: 1 inputs but 0 outputs"
    )


def test_code_rows_skip_invalid_counts(tmp_path):
    rows = [
        {"prompt": "ok", "official_tests": TESTS},
        {"prompt": "none", "official_tests": []},
        {"prompt": "bad", "official_tests": "{"},
        {"prompt": "absent"},
    ]
    loaded = load_rows(str(write_jsonl(tmp_path / "cf.jsonl", rows)), skip_invalid=True)
    assert [q.question for q in loaded] == ["ok"]
    assert loaded.skipped == {
        "empty field 'official_tests'": 1,
        "malformed tests in field 'official_tests'": 1,
        "missing field 'official_tests'": 1,
    }


def test_presets_table():
    assert set(FIELD_PRESETS) == {"openr1_math", "codeforces", "plain"}
    assert FIELD_PRESETS["openr1_math"].question == ("problem",)
    assert FIELD_PRESETS["codeforces"].tests and not FIELD_PRESETS["plain"].tests


# --- synthetic -----------------------------------------------------------------------------------


def test_synthetic_source_uses_generate_rows(monkeypatch):
    """The wiring, with a stand-in generate_rows (the real module is tested below once it exists)."""
    calls = []

    def generate_rows(task, n, seed):
        calls.append((task, n, seed))
        if task != "arith":
            raise ValueError(f"unknown synthetic task {task!r}")
        return [
            {"question": f"{i}+{seed}=?", "answer": str(i + seed), "solution": "add", "task": task} for i in range(n)
        ]

    fake = types.ModuleType("sdzero_mcore.rewards.synthetic")
    fake.generate_rows = generate_rows
    if importlib.util.find_spec("sdzero_mcore.rewards") is None:
        monkeypatch.setitem(sys.modules, "sdzero_mcore.rewards", types.ModuleType("sdzero_mcore.rewards"))
    monkeypatch.setitem(sys.modules, "sdzero_mcore.rewards.synthetic", fake)

    loaded = load_rows("synthetic:arith", synthetic_size=5, synthetic_seed=3)
    assert calls == [("arith", 5, 3)]
    assert [q.answer for q in loaded] == ["3", "4", "5", "6", "7"]
    assert loaded[0].extra == {"task": "arith"} and loaded[0].solution == "add"
    assert loaded[0].source == "synthetic:arith"
    assert data_error("synthetic:nope", synthetic_size=2) == (
        "synthetic:nope: cannot generate the synthetic task 'nope': unknown synthetic task 'nope'"
    )
    assert data_error("synthetic:arith").startswith("synthetic:arith: a synthetic dataset needs a size >= 1")
    assert data_error("synthetic:").startswith("synthetic:: no task named")
    # the config default: both phases' worth of questions
    cfg = DataConfig(dataset="synthetic:arith", phase1_questions=3, phase2_questions=4, synthetic_seed=1)
    assert len(load_from_config(cfg)) == 7 and calls[-1] == ("arith", 7, 1)


def test_synthetic_config_size_grows_past_repeats(monkeypatch):
    """Generators repeat questions; the config default generates until both phases can be filled."""
    calls = []

    def generate_rows(task, n, seed):
        calls.append(n)
        # rows 0..5 are three questions twice each; later rows are distinct
        return [{"question": f"q{i // 2 if i < 6 else i}", "answer": "1"} for i in range(n)]

    fake = types.ModuleType("sdzero_mcore.rewards.synthetic")
    fake.generate_rows = generate_rows
    if importlib.util.find_spec("sdzero_mcore.rewards") is None:
        monkeypatch.setitem(sys.modules, "sdzero_mcore.rewards", types.ModuleType("sdzero_mcore.rewards"))
    monkeypatch.setitem(sys.modules, "sdzero_mcore.rewards.synthetic", fake)
    cfg = DataConfig(dataset="synthetic:dup", phase1_questions=3, phase2_questions=4)
    loaded = load_from_config(cfg)
    assert calls == [7, 7 + 2 * (7 - 4) + 16]  # 7 rows held 4 distinct questions
    phase1, phase2 = split_phases(loaded.questions, 3, 4, 0)
    assert len({q.question for q in phase1 + phase2}) == 7


@pytest.mark.skipif(
    importlib.util.find_spec("sdzero_mcore.rewards") is None
    or importlib.util.find_spec("sdzero_mcore.rewards.synthetic") is None,
    reason="sdzero_mcore.rewards.synthetic is not written yet",
)
def test_synthetic_arith_real():
    first = load_rows("synthetic:arith", synthetic_size=20, synthetic_seed=0)
    again = load_rows("synthetic:arith", synthetic_size=20, synthetic_seed=0)
    assert len(first) == 20 and first.skipped == {}
    assert [q.question for q in first] == [q.question for q in again]
    assert all(q.answer and q.answer.strip() for q in first)
    # the default config: 6000 + 9000 questions from synthetic:arith, whose generator repeats some
    cfg = load_config().data
    assert cfg.dataset == "synthetic:arith"
    phase1, phase2 = split_phases(load_from_config(cfg).questions, cfg.phase1_questions, cfg.phase2_questions, 0)
    assert (len(phase1), len(phase2)) == (6000, 9000)


# --- config --------------------------------------------------------------------------------------


def test_load_from_config(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i), "uuid": f"u{i}"} for i in range(5)] + [{"problem": "bad"}]
    path = write_jsonl(tmp_path / "openr1.jsonl", rows)
    cfg = load_config(overrides=[f"data.dataset={path}", "data.skip_invalid=true", "data.field_preset=openr1_math"])
    loaded = load_from_config(cfg.data)
    assert [q.id for q in loaded] == [f"u{i}" for i in range(5)]
    assert loaded.skipped == {"missing field 'answer'": 1}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.p_r_preset=custom"], "data.p_r_preset=custom needs a non-empty data.p_r_correct, got None"),
        (["data.p_r_correct=Fine."], "data.p_r_correct is set but data.p_r_preset is 'paper'"),
        (["data.synthetic_size=10"], "data.synthetic_size (10) is less than data.phase1_questions (6000)"),
        (["data.dataset=a.jsonl", "data.synthetic_size=20000"], "data.synthetic_size is set but data.dataset"),
        (["data.field_preset=gsm8k"], "data.field_preset: 'gsm8k' is not one of: auto, openr1_math, codeforces, plain"),
        (["data.data_format=csv"], "data.data_format: 'csv' is not one of: auto, jsonl, json, parquet"),
        (["data.limit=0"], "data.limit: 0 is out of range; allowed: null or >= 1"),
    ],
)
def test_data_config_validation(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert message in str(info.value)


def test_data_config_custom_phrases():
    cfg = load_config(overrides=["data.p_r_preset=custom", "data.p_r_correct=Right.", "data.p_r_incorrect=Wrong."])
    assert (cfg.data.p_r_correct, cfg.data.p_r_incorrect) == ("Right.", "Wrong.")


# --- phase split ---------------------------------------------------------------------------------


def make_questions(n: int, source: str = "mem") -> list[Question]:
    return [
        Question(id=f"id-{i:04d}", question=f"question {i}", answer=str(i), tests=None, solution=None,
                 source=source, index=i, extra={})
        for i in range(n)
    ]


def ids(questions) -> list[str]:
    return [q.id for q in questions]


def test_split_sizes_disjoint_and_repeatable():
    questions = make_questions(100)
    phase1, phase2 = split_phases(questions, 30, 50, seed=7)
    assert (len(phase1), len(phase2)) == (30, 50)
    assert not set(ids(phase1)) & set(ids(phase2))
    assert split_phases(questions, 30, 50, seed=7) == (phase1, phase2)
    # the seed matters, and the split is shuffled rather than the first rows
    other = split_phases(questions, 30, 50, seed=8)
    assert ids(other[0]) != ids(phase1)
    assert ids(phase1) != ids(questions[:30])


def test_split_independent_of_input_order():
    questions = make_questions(60)
    shuffled = questions[:]
    random.Random(1).shuffle(shuffled)
    assert split_phases(questions, 20, 25, 3) == split_phases(shuffled, 20, 25, 3)
    assert split_phases(questions, 20, 25, 3) == split_phases(questions[::-1], 20, 25, 3)


def test_split_grows_by_appending():
    questions = make_questions(50)
    small1, small2 = split_phases(questions, 10, 10, 0)
    big1, _ = split_phases(questions, 20, 10, 0)
    assert ids(big1)[:10] == ids(small1) and ids(big1)[10:] == ids(small2)


def test_split_same_in_fresh_process(tmp_path):
    rows = [{"question": f"What is {i} squared?", "answer": str(i * i)} for i in range(40)]  # ids from sha256
    path = write_jsonl(tmp_path / "q.jsonl", rows)
    here = split_phases(load_rows(str(path)).questions, 10, 15, 42)
    code = (
        "import json, sys; from sdzero_mcore.data import load_rows, split_phases; "
        f"p1, p2 = split_phases(load_rows({str(path)!r}).questions, 10, 15, 42); "
        "print(json.dumps([[q.id for q in p1], [q.id for q in p2]]))"
    )
    # a different hash seed: a split that leaned on hash() would change
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True
    )
    assert json.loads(result.stdout) == [ids(here[0]), ids(here[1])]


def test_split_dedupes_ids(caplog):
    questions = make_questions(20)
    # the same ids again from another source, one with different content
    dupes = [q for q in make_questions(6, source="copy")]
    dupes[0] = Question(id=dupes[0].id, question="something else", answer="x", tests=None, solution=None,
                        source="copy", index=0, extra={})
    with caplog.at_level(logging.WARNING, logger="sdzero_mcore.data"):
        phase1, phase2 = split_phases(questions + dupes, 10, 10, 0)
    assert len(set(ids(phase1 + phase2))) == 20
    # the conflicting id is named with the rows that carry it (issue 17: the line named neither)
    assert (
        "removed 6 rows whose question id repeats another row's (1 ids with differing content: "
        "id 'id-0000': mem row 0, copy row 0)"
    ) in caplog.text
    # which copy is kept does not depend on order either
    assert split_phases(dupes + questions, 10, 10, 0) == (phase1, phase2)
    with pytest.raises(DataError) as info:
        split_phases(questions + dupes, 10, 11, 0)
    assert str(info.value) == (
        "phase split: phase 1 (10) + phase 2 (11) = 21 questions requested, but only 20 unique questions are "
        "available (26 given, 6 duplicate ids removed); lower data.phase1_questions / data.phase2_questions or "
        "add questions"
    )


def test_split_argument_errors():
    with pytest.raises(ValueError, match="phase sizes must be >= 0"):
        split_phases(make_questions(3), -1, 1, 0)
    with pytest.raises(TypeError, match="n_phase1 must be an int"):
        split_phases(make_questions(3), 1.0, 1, 0)


# --- issue 17: values, sizes and ids that used to get through -------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["NaN", "Infinity", "-Infinity"])
def test_non_finite_answer_is_rejected(tmp_path, bad):
    path = write_jsonl(tmp_path / "m.jsonl", [MATH_ROWS[0], {"question": "q?", "answer": bad}])  # json writes NaN
    message = data_error(str(path))
    assert message.startswith(f"{path}: row 1 (line 2): field 'answer': the answer is {bad!r}, not a finite number")
    loaded = load_rows(str(path), skip_invalid=True)
    assert len(loaded) == 1 and loaded.skipped == {"non-finite number in field 'answer'": 1}


def test_oversized_jsonl_line_is_rejected_without_reading_it_whole(tmp_path):
    huge = {"question": "x" * (3 << 20), "answer": "1"}
    path = write_jsonl(tmp_path / "big.jsonl", [MATH_ROWS[0], huge, MATH_ROWS[1]])
    message = data_error(str(path), max_row_bytes=1 << 20)
    assert message.startswith(f"{path}: row 1 (line 2): the line is over data.max_row_bytes ({1 << 20} bytes; it has ")
    loaded = load_rows(str(path), max_row_bytes=1 << 20, skip_invalid=True)
    # the rest of the long line was skipped, so the next row is read from its own line
    assert [q.question for q in loaded] == [MATH_ROWS[0]["question"], MATH_ROWS[1]["question"]]
    assert loaded.skipped == {"row over data.max_row_bytes": 1}
    assert len(load_rows(str(path))) == 3  # the default cap (16 MiB) takes it


def test_oversized_row_from_datasets_is_rejected(tmp_path, cache_dir):
    path = write_json(tmp_path / "big.json", [MATH_ROWS[0], {"question": "y" * 5000, "answer": "1"}])
    message = data_error(str(path), max_row_bytes=4096, cache_dir=cache_dir)
    assert message.startswith(f"{path}: row 1: the row's text is 5005 bytes, over data.max_row_bytes (4096)")


def test_data_config_caps_rows_by_default(tmp_path):
    assert DataConfig().max_row_bytes == 16 << 20
    path = write_jsonl(tmp_path / "big.jsonl", [MATH_ROWS[0], {"question": "z" * 300, "answer": "1"}])
    with pytest.raises(DataError, match="over data.max_row_bytes"):
        load_from_config(DataConfig(dataset=str(path), max_row_bytes=200))


def test_max_prompt_tokens_error_or_skip(tmp_path):
    rows = [MATH_ROWS[0], {"question": "a much longer question " * 4, "answer": "1"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    message = data_error(str(path), max_prompt_tokens=20, count_prompt_tokens=len)
    assert message == (
        f"{path}: row 1 (line 2): field 'question': the prompt is 92 tokens, over data.max_prompt_tokens (20) "
        "(set data.long_prompts=skip to skip and count such rows)"
    )
    loaded = load_rows(str(path), max_prompt_tokens=20, count_prompt_tokens=len, long_prompts="skip")
    assert len(loaded) == 1 and loaded.skipped == {"prompt over data.max_prompt_tokens": 1}
    assert "skipped 1 invalid (prompt over data.max_prompt_tokens: 1)" in loaded.summary()


def test_load_from_config_counts_prompt_tokens_with_the_run_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from sdzero_mcore.data.prompts import prompt_ids
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    tokenizer = AutoTokenizer.from_pretrained(save_tiny_hf_model(tmp_path / "hf", vocab_size=128))
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "9" * 200, "answer": "9"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    limit = len(prompt_ids(tokenizer, "1+1?", template="auto")) + 5
    data = DataConfig(dataset=str(path), max_prompt_tokens=limit, long_prompts="skip")
    assert len(load_from_config(data)) == 2  # no tokenizer: nothing to count with
    loaded = load_from_config(data, prompt_tokenizer=tokenizer)
    assert [q.index for q in loaded] == [0] and loaded.skipped == {"prompt over data.max_prompt_tokens": 1}
    with pytest.raises(DataError, match=r"row 1 \(line 2\): field 'question': the prompt is \d+ tokens"):
        load_from_config(DataConfig(dataset=str(path), max_prompt_tokens=limit), prompt_tokenizer=tokenizer)


def test_duplicate_id_with_different_content_names_both_rows(tmp_path, caplog):
    rows = [
        {"id": "p-1", "question": "What is 1+1?", "answer": "2"},
        {"id": "p-2", "question": "What is 2+2?", "answer": "4"},
        {"id": "p-1", "question": "What is 1+1?", "answer": "2"},  # an exact repeat: one question
        {"id": "p-1", "question": "What is 1+1?", "answer": "3"},
    ]
    path = write_jsonl(tmp_path / "dup.jsonl", rows)
    message = data_error(str(path))
    assert message == (
        f"{path}: row 3 (line 4): field 'id': id 'p-1' repeats row 0 (line 1) with a different answer ({SKIP_HINT})"
    )
    with caplog.at_level(logging.WARNING, logger="sdzero_mcore.data"):
        loaded = load_rows(str(path), skip_invalid=True)
    assert [q.index for q in loaded] == [0, 1, 2]
    assert loaded.skipped == {"duplicate id with different content": 1}
    assert f"{path}: skipped row 3 (line 4): id 'p-1' repeats row 0 (line 1) with a different answer" in caplog.text


def test_phase2_from_another_dataset_skips_questions_phase1_uses(tmp_path):
    from sdzero_mcore.data.question_sets import phase_questions

    first, second = tmp_path / "openr1.jsonl", tmp_path / "deepscaler.jsonl"
    first.write_text("".join(json.dumps({"id": f"a{i}", "question": f"q{i}?", "answer": str(i)}) + "\n" for i in range(6)))
    # two rows share an id with phase 1's source: they must not reach phase 2
    second.write_text("".join(json.dumps({"id": i, "question": f"r{i}?", "answer": "1"}) + "\n"
                              for i in ["a0", "a1", "b0", "b1", "b2", "b3"]))
    cfg = load_config(overrides=[f"data.dataset={first}", f"data.phase2_dataset={second}",
                                 "data.phase1_questions=6", "data.phase2_questions=4"])
    phase1, phase2 = phase_questions(cfg)
    assert sorted(q.id for q in phase1) == [f"a{i}" for i in range(6)]
    assert sorted(q.id for q in phase2) == ["b0", "b1", "b2", "b3"]
    assert all(q.source == str(second) for q in phase2)
    too_many = load_config(overrides=[f"data.dataset={first}", f"data.phase2_dataset={second}",
                                      "data.phase1_questions=6", "data.phase2_questions=5"])
    with pytest.raises(DataError, match="phase 2 \\(5\\) = 5 questions requested, but only 4 unique"):
        phase_questions(too_many)
