"""Tests for sdzero_mcore.data.trace_cleaning: the release's Phase 1 cleaning rules on records."""

from __future__ import annotations

import json
import random
import time

import pytest

from sdzero_mcore.data.trace_cleaning import (
    CleaningResult,
    clean_records,
    strip_flattering_opener,
    trim_repeated_tail,
)
from sdzero_mcore.models.tiny import build_char_tokenizer

# PREFIX ends in a character that no repeated block below ends in, so a periodic tail never
# reaches into it and the expected cuts are exact.
PREFIX = "Let x = 3. Then 2x + 1 = 7, so the answer is 7.\n\nCheck:"
BLOCK = " So we get x = 7 again.\n"  # 24 characters


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def eos(tok):
    return tok.convert_tokens_to_ids("<|im_end|>")


# ---------------------------------------------------------------- repeated tail


def _reference_trim(text, min_block, max_block, min_repeats, max_passes=5):
    """Straight from the definition, quadratic per period: the longest suffix with period L."""
    for _ in range(max_passes):
        n = len(text)
        cut = None
        for period in range(min_block, min(max_block, n // min_repeats) + 1):
            start = n - period
            while start > 0 and text[start - 1] == text[start - 1 + period]:
                start -= 1
            if n - start >= min_repeats * period:
                cut = text[: start + period]
                break
        if cut is None:
            break
        text = cut
    return text


def test_block_repeated_three_times_keeps_one_copy():
    assert trim_repeated_tail(PREFIX + BLOCK * 3) == PREFIX + BLOCK
    assert trim_repeated_tail(PREFIX + BLOCK * 40) == PREFIX + BLOCK


def test_trailing_partial_copy_goes_too():
    assert trim_repeated_tail(PREFIX + BLOCK * 5 + BLOCK[:7]) == PREFIX + BLOCK


def test_block_repeated_twice_is_left_alone():
    for text in (PREFIX + BLOCK * 2, PREFIX + BLOCK * 2 + BLOCK[:15]):
        assert trim_repeated_tail(text) == text


def test_block_of_nine_characters_is_below_min_block():
    nine = " x = 7 ok"
    assert len(nine) == 9
    text = PREFIX + nine * 5  # 45 characters: not 3 copies of any period >= 10
    assert trim_repeated_tail(text) == text
    # Repeated often enough, two copies (18 >= min_block) form the block: one of them is kept.
    assert trim_repeated_tail(PREFIX + nine * 12) == PREFIX + nine * 2


def test_block_size_bounds():
    ten = "0123456789"
    assert trim_repeated_tail(PREFIX + ten * 3) == PREFIX + ten
    rng = random.Random(1)
    big = "".join(rng.choice("abcdefgh ") for _ in range(1500))
    assert trim_repeated_tail(PREFIX + big * 3) == PREFIX + big
    bigger = big + "Z"  # 1501 characters: above max_block
    assert trim_repeated_tail(PREFIX + bigger * 3) == PREFIX + bigger * 3
    assert trim_repeated_tail(PREFIX + bigger * 3, max_block=1501) == PREFIX + bigger


def test_repeats_in_the_middle_are_left_alone():
    text = PREFIX + BLOCK * 6 + "Therefore the answer is \\boxed{7}."
    assert trim_repeated_tail(text) == text


def test_second_pass_trims_the_exposed_period():
    y = "abcdefghijklmnopqrstuvwxyz0123"  # 30 characters
    z = y[:10]  # a prefix of y: after the z's go, the y's repeat 3+ times
    text = PREFIX + y * 3 + z * 3
    assert trim_repeated_tail(text) == PREFIX + y
    assert trim_repeated_tail(text, max_passes=1) == PREFIX + y * 3 + z


def test_matches_the_definition_on_random_strings():
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 60)))
        kwargs = dict(min_block=rng.randint(1, 4), max_block=rng.randint(4, 12), min_repeats=rng.randint(2, 4))
        assert trim_repeated_tail(text, **kwargs) == _reference_trim(text, **kwargs), (text, kwargs)


def test_long_traces_are_fast():
    rng = random.Random(2)
    words = ["the", "sum", "of", "x", "and", "y", "is", "=", "so", "we", "have", "2", "3", "\n"]
    prose = " ".join(rng.choice(words) for _ in range(16000)) + " Hence x = 7."  # ~16K tokens
    block = " " + " ".join(rng.choice(words) for _ in range(470)) + "!"  # ~1.4K characters
    assert len(block) <= 1500
    cases = [
        (prose, prose),
        (prose + block * 30, prose + block),
        ("a" * 64000, "a" * 10),
        ("ab" * 32000, "ab" * 5),
    ]
    start = time.perf_counter()
    for text, expected in cases:
        assert trim_repeated_tail(text) == expected
    # Linear per pass: well under a second here; a cubic or per-period quadratic scan is far slower.
    assert time.perf_counter() - start < 10.0


def test_invalid_settings():
    with pytest.raises(ValueError):
        trim_repeated_tail("x", min_repeats=1)
    with pytest.raises(ValueError):
        trim_repeated_tail("x", min_block=20, max_block=10)


def test_empty_and_short_texts():
    assert trim_repeated_tail("") == ""
    assert trim_repeated_tail("abc" * 3) == "abc" * 3


# ---------------------------------------------------------------- flattering opener

BODY = "Let me redo the computation: 2x + 1 = 7 gives x = 3."


@pytest.mark.parametrize(
    "opener",
    [
        "You're absolutely right \u2014 ",
        "You are right, ",
        "Yes, you're absolutely right: ",
        "Indeed you are right. ",
        "You're absolutely right to question the sign in step 2. ",
        "You are right to point that out!\n\n",
        "Thank you for pointing that out. ",
        "Thank you for catching this!\n",
        "Great question! ",
        "Great question \u2014 ",
        "Good catch. ",
        "Nice catch! ",
        "Good point - ",
        "Nice point. ",
        "Good observation. ",
        "GOOD CATCH. ",
    ],
)
def test_opener_is_stripped(opener):
    assert strip_flattering_opener(opener + BODY) == BODY
    assert strip_flattering_opener("\n  " + opener + BODY) == BODY


def test_openers_in_a_row_and_capitalisation():
    text = "Thank you for checking. You're absolutely right \u2014 the sign was wrong. Good catch! " + BODY
    assert strip_flattering_opener(text) == "The sign was wrong. Good catch! " + BODY
    assert strip_flattering_opener("Thank you for checking. Good catch! " + BODY) == BODY
    assert strip_flattering_opener("You're right, the sign flips.") == "The sign flips."


@pytest.mark.parametrize(
    "text",
    [
        BODY,
        "  \n" + BODY,  # leading whitespace alone is not an opener: the text stays exactly as it was
        BODY + " You're absolutely right, " + BODY,  # in the middle
        "So, good catch. " + BODY,  # not at the start
        "You're absolutely right! " + BODY,  # the release's pattern needs a dash, comma, colon or period
        "You\u2019re absolutely right, " + BODY,  # curly apostrophe: not matched by the release either
        "You're right to worry\n" + BODY,  # sentence not ended on the same line
        "Thank you\n" + BODY,
        "Greatly, question the sign. " + BODY,
        "Goodness, what a catch. " + BODY,
    ],
)
def test_near_miss_openers_are_left_alone(text):
    assert strip_flattering_opener(text) == text


def test_opener_only_text_becomes_empty():
    assert strip_flattering_opener("You're absolutely right.") == ""


# ---------------------------------------------------------------- records


def _record(tok, eos, *, x="What is x?", y_init="x = 4.", y_rev="x = 3.", rev_id=0, end=True):
    def ids(text):
        out = tok.encode(text, add_special_tokens=False)
        return out + [eos] if end else out

    return {
        "question_id": "q0", "attempt_id": 0, "revision_id": rev_id,
        "x": x, "x_ids": [1, 2, 3],
        "y_init": y_init, "y_init_ids": ids(y_init), "r_init": 0.0,
        "y_rev": y_rev, "y_rev_ids": ids(y_rev), "r_rev": 1.0,
        "init_tokens": 99, "rev_tokens": 98, "extra": {"kept": True},
    }


def test_clean_records_rules_ids_and_counts(tok, eos):
    # Ids that no re-encoding would produce: an unchanged text must keep them as sampled.
    sentinel = [70, 71, 72, eos]
    clean = _record(tok, eos, rev_id=0)
    clean["y_init_ids"] = list(sentinel)
    clean["y_rev_ids"] = list(sentinel)
    looping = _record(tok, eos, y_init=PREFIX + BLOCK * 4, rev_id=1, end=False)  # hit the budget: no EOS
    looping["y_rev_ids"] = list(sentinel)
    flattering = _record(tok, eos, y_rev="Good catch! " + BODY, rev_id=2)
    flattering["y_init_ids"] = list(sentinel)
    both = _record(tok, eos, y_init=PREFIX + BLOCK * 3, y_rev="Great question. " + PREFIX + BLOCK * 3, rev_id=3)
    emptied = _record(tok, eos, y_rev="Thank you for the hint.", rev_id=4)
    duplicate = _record(tok, eos, y_rev=BODY, rev_id=5)  # same cleaned (x, y_init, y_rev) as `flattering`
    other_rev = _record(tok, eos, y_rev="x = 3, checked.", rev_id=6)  # same x and y_init as `clean`
    records = [clean, looping, flattering, both, emptied, duplicate, other_rev]
    before = json.dumps(records, sort_keys=True)

    result = clean_records(records, tok, eos_ids={eos})

    assert json.dumps(records, sort_keys=True) == before  # input not modified
    assert isinstance(result, CleaningResult)
    assert [r["revision_id"] for r in result.records] == [0, 1, 2, 3, 6]
    assert result.changed == {"repeated_tail": 2, "flattering_opener": 3}
    assert result.removed == {"emptied": 1, "duplicate": 1}
    assert result.reencoded == {"y_init_ids": 2, "y_rev_ids": 2}

    kept = {r["revision_id"]: r for r in result.records}
    assert kept[0] == clean  # untouched, sampled ids included
    # Trimmed y_init without EOS: re-encoded, nothing appended; the unchanged y_rev keeps its ids.
    assert kept[1]["y_init"] == PREFIX + BLOCK
    assert kept[1]["y_init_ids"] == tok.encode(PREFIX + BLOCK, add_special_tokens=False)
    assert kept[1]["y_rev_ids"] == sentinel
    # Stripped y_rev: re-encoded, EOS put back; y_init unchanged keeps its ids.
    assert kept[2]["y_rev"] == BODY
    assert kept[2]["y_rev_ids"] == tok.encode(BODY, add_special_tokens=False) + [eos]
    assert kept[2]["y_init_ids"] == sentinel
    # Both rules on y_rev (trim first, then the opener), trim on y_init.
    assert kept[3]["y_init"] == PREFIX + BLOCK
    assert kept[3]["y_rev"] == PREFIX + BLOCK
    assert kept[3]["y_init_ids"] == tok.encode(PREFIX + BLOCK, add_special_tokens=False) + [eos]
    assert kept[3]["y_rev_ids"] == kept[3]["y_init_ids"]
    # Other keys unchanged.
    for r in result.records:
        assert (r["init_tokens"], r["rev_tokens"], r["extra"], r["x_ids"]) == (99, 98, {"kept": True}, [1, 2, 3])
        assert r["r_init"] == 0.0 and r["r_rev"] == 1.0 and r["question_id"] == "q0"

    summary = result.as_summary()
    assert json.loads(json.dumps(summary)) == summary
    assert summary["records_in"] == 7 and summary["records_out"] == 5
    assert summary["changed"] == result.changed and summary["removed"] == result.removed


def test_eos_not_in_eos_ids_is_not_put_back(tok, eos):
    record = _record(tok, eos, y_rev="Nice point. " + BODY)
    (out,) = clean_records([record], tok).records  # eos_ids empty
    assert out["y_rev_ids"] == tok.encode(BODY, add_special_tokens=False)


def test_dedupe_keeps_first_and_needs_all_three_fields(tok, eos):
    a = _record(tok, eos, rev_id=0)
    same = _record(tok, eos, rev_id=1)
    other_x = _record(tok, eos, x="What is y?", rev_id=2)
    other_init = _record(tok, eos, y_init="x = 5.", rev_id=3)
    other_rev = _record(tok, eos, y_rev="x = 3!", rev_id=4)
    result = clean_records([a, same, other_x, other_init, other_rev, _record(tok, eos, rev_id=5)], tok, eos_ids={eos})
    assert [r["revision_id"] for r in result.records] == [0, 2, 3, 4]
    assert result.removed == {"emptied": 0, "duplicate": 2}
    assert result.changed == {"repeated_tail": 0, "flattering_opener": 0}


def test_cleaning_makes_duplicates(tok, eos):
    # Differ only in the trimmed loop / the opener: duplicates after cleaning, as in the release.
    a = _record(tok, eos, y_init=PREFIX + BLOCK * 3, y_rev=BODY, rev_id=0)
    b = _record(tok, eos, y_init=PREFIX + BLOCK * 7, y_rev="You're absolutely right, " + BODY[0].lower() + BODY[1:], rev_id=1)
    result = clean_records([a, b], tok, eos_ids={eos})
    assert [r["revision_id"] for r in result.records] == [0]
    assert result.removed["duplicate"] == 1
    assert result.changed == {"repeated_tail": 2, "flattering_opener": 1}


def test_empty_input_and_missing_fields(tok):
    result = clean_records([], tok)
    assert result.records == [] and result.as_summary()["records_out"] == 0
    with pytest.raises(ValueError, match="y_rev"):
        clean_records([{"x": "q", "y_init": "a"}], tok)
