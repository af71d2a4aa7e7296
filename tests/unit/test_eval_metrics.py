"""sdzero_mcore.eval.metrics and .report on fixed inputs; expected values are worked out by hand."""

import json
import math

import pytest

from sdzero_mcore.eval.metrics import (
    REVISION_KEYWORDS,
    avg_at_k,
    correction_rate,
    keyword_counts,
    keyword_stats,
    localization_buckets,
    pass_at_k,
    pass_at_k_dataset,
)
from sdzero_mcore.eval.report import (
    compare_runs,
    compare_table,
    load_run,
    plot_localization,
    token_kl_html,
    write_localization_csv,
    write_run,
)

NAN = math.nan


# --- pass@k -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (10, 2, 3, 1 - 56 / 120),  # 1 - C(8,3)/C(10,3)
        (10, 3, 1, 0.3),  # k = 1 is the plain accuracy c/n
        (8, 0, 4, 0.0),
        (8, 8, 4, 1.0),
        (8, 5, 4, 1.0),  # only 3 wrong samples: every 4-subset holds a correct one
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_the_unbiased_estimator_not_one_minus_power():
    # The biased plug-in 1 - (1 - c/n)^k gives 1 - 0.75^2 = 0.4375 here.
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 2) != pytest.approx(0.4375)


def test_pass_at_k_stable_for_large_n():
    # C(999,500)/C(1000,500) = 500/1000; C(1998,1000)/C(2000,1000) = (1000*999)/(2000*1999).
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(2000, 2, 1000) == pytest.approx(1 - 999000 / 3998000, abs=1e-12)


@pytest.mark.parametrize(
    "n, c, k, name",
    [(4, 1, 0, "k"), (4, 1, 5, "k"), (4, -1, 2, "c"), (4, 5, 2, "c")],
)
def test_pass_at_k_rejects_bad_arguments_by_name(n, c, k, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        pass_at_k(n, c, k)


# --- dataset-level avg@k / pass@k ---------------------------------------------------------------

REWARDS = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_avg_at_k_is_percent_averaged_over_questions():
    assert avg_at_k(REWARDS) == pytest.approx(50.0)  # (0.5 + 1 + 0) / 3
    assert avg_at_k([[1, 0, 0], [1]]) == pytest.approx(100 * (1 / 3 + 1) / 2)  # per question, not pooled


def test_pass_at_k_dataset_is_percent_averaged_over_questions():
    # Question 0: 1 - C(2,2)/C(4,2) = 5/6; question 1: 1; question 2: 0.
    assert pass_at_k_dataset(REWARDS, 2) == pytest.approx(100 * (5 / 6 + 1) / 3)
    assert pass_at_k_dataset(REWARDS, 1) == pytest.approx(50.0)


@pytest.mark.parametrize(
    "rewards, match",
    [
        ([], "empty"),
        ([[1], []], "question 1"),
        ([[1, 0], [1, 2]], "question 1"),
        ([[1, 0.5]], "question 0"),
    ],
)
def test_dataset_metrics_reject_bad_rewards(rewards, match):
    for metric in (avg_at_k, lambda r: pass_at_k_dataset(r, 1)):
        with pytest.raises(ValueError, match=match):
            metric(rewards)


def test_pass_at_k_dataset_names_question_with_too_few_samples():
    with pytest.raises(ValueError, match="question 1"):
        pass_at_k_dataset([[1, 0, 1], [1, 0]], 3)


# --- correction rate ----------------------------------------------------------------------------

def test_correction_rate_values():
    assert correction_rate(40.0, 55.0) == pytest.approx(25.0)  # 15 of the 60 missing points
    assert correction_rate(0.0, 10.0) == pytest.approx(10.0)
    assert correction_rate(50.0, 40.0) == pytest.approx(-20.0)  # revising broke answers
    assert math.isnan(correction_rate(100.0, 100.0))


@pytest.mark.parametrize("first, revised, name", [(-1.0, 50.0, "first_pct"), (50.0, 100.5, "revised_pct")])
def test_correction_rate_rejects_non_percentages(first, revised, name):
    with pytest.raises(ValueError, match=name):
        correction_rate(first, revised)


# --- revision keywords --------------------------------------------------------------------------

def test_keyword_list_has_appendix_phrases_and_lets_variants():
    appendix = [
        "wait", "hold on", "actually", "on second thought", "let me recheck", "let me check",
        "let me recalculate", "let me correct", "my mistake", "i made a mistake", "this is wrong",
        "that is wrong", "incorrect", "re-evaluate", "let me rethink", "let me double check",
        "wait a minute", "let me start over", "let me try again", "oops",
    ]
    lets = [
        "let's recheck", "let's check", "let's recalculate", "let's correct", "let's rethink",
        "let's double check", "let's start over", "let's try again",
    ]
    assert list(REVISION_KEYWORDS) == appendix + lets


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Wait a minute, that is off.", {"wait a minute": 1}),
        ("Let me double check this. Let me check it.", {"let me double check": 1, "let me check": 1}),
        ("Let me double-check.", {"let me double check": 1}),
        ("This is incorrect; the rest is correct.", {"incorrect": 1}),
        ("Let\u2019s check again. Let's try again.", {"let's check": 1, "let's try again": 1}),
        ("WAIT, wait.\nAwaiting the factually waited result.", {"wait": 2}),
        ("I made a mistake. My mistake! Oops.", {"i made a mistake": 1, "my mistake": 1, "oops": 1}),
        ("Hold\non, let me\nre-evaluate: re-evaluated, pre-evaluate.", {"hold on": 1, "re-evaluate": 1}),
        ("Nothing to see here.", {}),
    ],
)
def test_keyword_counts_whole_words_longest_first(text, expected):
    assert dict(keyword_counts(text)) == expected


def test_keyword_stats():
    stats = keyword_stats(["Wait, wait.", "Oops, hold on.", "Fine."])
    assert stats["per_response"] == pytest.approx(4 / 3)
    assert stats["responses_with_keyword"] == pytest.approx(2 / 3)
    assert stats["counts"] == {"wait": 2, "hold on": 1, "oops": 1}
    assert list(stats["counts"])[0] == "wait"  # most frequent first
    with pytest.raises(ValueError):
        keyword_stats([])


# --- token localisation -------------------------------------------------------------------------

def _assert_buckets(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        if math.isnan(want):
            assert math.isnan(got)
        else:
            assert got == pytest.approx(want)


def test_localization_single_spike_lands_in_first_bucket():
    kl = [0.0] * 20
    kl[13] = 1.0  # position in the response does not matter, rank does
    result = localization_buckets([kl])
    _assert_buckets(result["mean_kl"], [1.0] + [0.0] * 19)
    _assert_buckets(result["kl_share"], [1.0] + [0.0] * 19)
    assert result["responses"] == 1


def test_localization_flat_response_has_equal_shares():
    result = localization_buckets([[0.5] * 40])  # two tokens per bucket
    _assert_buckets(result["mean_kl"], [0.5] * 20)
    _assert_buckets(result["kl_share"], [0.05] * 20)


def test_localization_short_response_leaves_buckets_empty():
    # 5 tokens, 20 buckets: ranks 0..4 go to buckets 0, 4, 8, 12, 16 (floor(j * 20 / 5)).
    result = localization_buckets([[2.0, 5.0, 1.0, 4.0, 3.0]])
    mean_kl = [NAN] * 20
    share = [NAN] * 20
    for bucket, value in zip((0, 4, 8, 12, 16), (5.0, 4.0, 3.0, 2.0, 1.0)):
        mean_kl[bucket] = value
        share[bucket] = value / 15.0
    _assert_buckets(result["mean_kl"], mean_kl)
    _assert_buckets(result["kl_share"], share)


def test_localization_averages_over_responses_and_sorts_descending():
    spike = [0.0] * 19 + [2.0]
    flat = [1.0] * 20
    result = localization_buckets([spike, flat])
    assert result["responses"] == 2
    assert result["mean_kl"][0] == pytest.approx(1.5)  # (2 + 1) / 2
    assert result["kl_share"][0] == pytest.approx(0.525)  # (1 + 0.05) / 2
    assert result["mean_kl"][5] == pytest.approx(0.5)  # (0 + 1) / 2
    assert result["kl_share"][5] == pytest.approx(0.025)  # (0 + 0.05) / 2

    two = localization_buckets([[0.0, 3.0, 0.0, 1.0]], num_buckets=2)  # sorted: [3, 1 | 0, 0]
    _assert_buckets(two["mean_kl"], [2.0, 0.0])
    _assert_buckets(two["kl_share"], [1.0, 0.0])


def test_localization_skips_empty_and_zero_total_counts_as_zero_share():
    result = localization_buckets([[], [0.0, 0.0]], num_buckets=2)
    assert result["responses"] == 1
    _assert_buckets(result["mean_kl"], [0.0, 0.0])
    _assert_buckets(result["kl_share"], [0.0, 0.0])
    with pytest.raises(ValueError, match="response 0"):
        localization_buckets([[1.0, NAN]])


# --- report: run files and the comparison table --------------------------------------------------

def _run(**overrides):
    run = {
        "name": "sd-zero", "checkpoint": "ckpt/phase2", "dataset": "aime24", "questions": 30, "k": 4,
        "temperature": 0.7, "max_new_tokens": 1024, "seed": 0,
        "avg_at_k": 61.25, "pass_at_k": 80.0, "mean_response_tokens": 3518.44,
        "keywords": {"per_response": 1.5, "responses_with_keyword": 0.75, "counts": {"wait": 3}},
        "revise": {"first_accuracy": 40.0, "revised_accuracy": 55.0, "correction_rate": 25.0,
                   "first_tokens": 3000.0, "revised_tokens": 1200.5},
        "budget": {"generations": 49000, "generated_tokens": 123456789},
    }
    run.update(overrides)
    return run


def _table_rows(table):
    lines = table.strip().splitlines()
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_compare_table_rows_and_columns():
    base = _run(name="base", avg_at_k=49.8, pass_at_k=70.04, mean_response_tokens=3708.0,
                keywords={"per_response": 0.25, "responses_with_keyword": 0.2, "counts": {}},
                revise=None, budget=None)
    header, rule, full, missing = _table_rows(compare_table([_run(), base]))
    assert header == [
        "run", "avg@4", "pass@4", "first acc", "revised acc", "correction rate",
        "mean length (tokens)", "revision keywords / response", "generations", "generated tokens",
    ]
    assert set(rule) == {"---"} and len(rule) == len(header)
    assert full == ["sd-zero", "61.2", "80.0", "40.0", "55.0", "25.0", "3518.4", "1.50", "49000", "123456789"]
    assert missing == ["base", "49.8", "70.0", "-", "-", "-", "3708.0", "0.25", "-", "-"]


def test_compare_table_mixed_k_and_nan():
    other = _run(name="k8", k=8, avg_at_k=NAN, mean_response_tokens=None, keywords=None,
                 revise={"first_accuracy": 100.0, "revised_accuracy": 100.0, "correction_rate": None,
                         "first_tokens": 10.0, "revised_tokens": 12.0})
    header, _, first, second = _table_rows(compare_table([_run(), other]))
    assert header[1:3] == ["avg@k", "pass@k"]
    assert first[1:3] == ["61.2 (k=4)", "80.0 (k=4)"]
    assert second[1:3] == ["n/a (k=8)", "80.0 (k=8)"]
    assert second[5] == "n/a"  # null correction rate in a revise block: perfect first attempt
    assert second[6:8] == ["-", "-"]


def test_write_and_load_run_roundtrip(tmp_path):
    run = _run(revise={**_run()["revise"], "first_accuracy": 100.0, "correction_rate": NAN})
    write_run(tmp_path / "a" / "eval.json", run)
    text = (tmp_path / "a" / "eval.json").read_text()
    assert "NaN" not in text and '"correction_rate": null' in text
    loaded = load_run(tmp_path / "a")  # a run directory resolves to its eval.json
    assert loaded["revise"]["correction_rate"] is None
    assert loaded["budget"] == run["budget"]

    write_run(tmp_path / "b.json", _run(name="other"))
    table = compare_runs([tmp_path / "a", tmp_path / "b.json"])
    assert "| sd-zero |" in table and "| other |" in table


def test_load_run_errors_name_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_run(tmp_path / "nowhere.json")
    with pytest.raises(FileNotFoundError, match="eval.json"):
        load_run(tmp_path)  # a directory without eval.json
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_run(broken)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"name": "x", "k": 4, "avg_at_k": 1.0}))
    with pytest.raises(ValueError, match="partial.json.*pass_at_k"):
        load_run(partial)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(ValueError, match="list.json"):
        load_run(listed)


# --- report: localisation CSV / PNG and token HTML -----------------------------------------------

def _buckets_by_reward():
    incorrect = localization_buckets([[0.0] * 19 + [4.0], [0.1] * 19 + [2.0]])
    correct = localization_buckets([[0.2] * 20, [0.3] * 20])
    return {0: incorrect, 1: correct}


def test_write_localization_csv(tmp_path):
    path = tmp_path / "out" / "localization.csv"
    write_localization_csv(path, _buckets_by_reward())
    lines = path.read_text().splitlines()
    assert lines[0] == "bucket,mean_kl_r0,kl_share_r0,mean_kl_r1,kl_share_r1"
    assert len(lines) == 21
    bucket, mean0, share0, mean1, share1 = lines[1].split(",")
    assert bucket == "0"
    assert float(mean0) == pytest.approx(3.0)  # (4 + 2) / 2
    assert float(mean1) == pytest.approx(0.25)
    assert float(share1) == pytest.approx(0.05)
    assert [p.name for p in path.parent.iterdir()] == ["localization.csv"]  # no temp file left

    short = tmp_path / "short.csv"
    write_localization_csv(short, {0: localization_buckets([[1.0]], num_buckets=2)})
    assert short.read_text().splitlines()[1:] == ["0,1.0,1.0,,", "1,,,,"]


def test_plot_localization_writes_png(tmp_path):
    path = tmp_path / "plots" / "localization.png"
    plot_localization(path, _buckets_by_reward())  # has zeros: linear y axis
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    positive = {1: localization_buckets([[0.2] * 20])}
    plot_localization(path, positive)  # all positive: log y axis; overwrites in place
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["localization.png"]
    with pytest.raises(ValueError):
        plot_localization(path, {2: positive[1]})


def test_token_kl_html_escapes_and_colours(tmp_path):
    path = tmp_path / "tokens.html"
    token_kl_html(path, ["x", " <b>", "\n", "&y"], [0.0, 2.0, 1.0, 0.5], title="resp <1>")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "&lt;b&gt;" in page and "<b>" not in page
    assert "&amp;y" in page
    assert "resp &lt;1&gt;" in page
    assert 'style="background: rgb(255, 255, 255)" title="KL 0">x</span>' in page
    assert 'style="background: rgb(255, 0, 0)" title="KL 2">' in page  # the max is full red
    assert 'title="KL 1">\n</span>' in page  # newline kept inside <pre>
    with pytest.raises(ValueError, match="length"):
        token_kl_html(path, ["a"], [0.1, 0.2], title="t")
