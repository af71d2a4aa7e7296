"""The multi-seed reading of the demo's claims: mean ± sd and the paired t-interval verdict."""

import math

import pytest

from sdzero_mcore.eval.seeds import format_mean_sd, mean_sd, paired_verdict, t95


def test_mean_sd_skips_missing_values():
    mean, sd, count = mean_sd([1.0, None, 3.0, float("nan")])
    assert (mean, count) == (2.0, 2) and sd == pytest.approx(math.sqrt(2.0))
    assert format_mean_sd([1.0, 3.0]) == "2.0 ± 1.4"
    assert format_mean_sd([5.0]) == "5.0" and format_mean_sd([None]) == "-"


def test_paired_verdict_reads_the_interval_of_the_mean_difference():
    # differences 2, 3, 4: mean 3, sd 1, half width 4.303 / sqrt(3) = 2.484 -> above 0
    verdict = paired_verdict([12.0, 13.0, 14.0], [10.0, 10.0, 10.0])
    assert verdict.answer == "yes" and verdict.mean_difference == pytest.approx(3.0)
    assert verdict.half_width == pytest.approx(4.303 / math.sqrt(3))
    assert paired_verdict([10.0, 10.0, 10.0], [12.0, 13.0, 14.0]).answer == "no"
    # differences 1, -1, 3: mean 1, sd 2, half width 4.97 -> straddles 0
    assert paired_verdict([11.0, 9.0, 13.0], [10.0, 10.0, 10.0]).answer == "within noise"
    # pairing matters: each side's spread is large, the paired differences are not
    assert paired_verdict([10.0, 30.0, 50.0], [9.0, 29.0, 49.0]).answer == "yes"


def test_one_seed_gives_no_verdict_and_lengths_must_match():
    verdict = paired_verdict([12.0], [10.0])
    assert verdict.answer == "one seed" and "no verdict" in verdict.describe()
    assert paired_verdict([None], [1.0]).answer == "no data"
    with pytest.raises(ValueError, match="equal lengths"):
        paired_verdict([1.0, 2.0], [1.0])
    assert t95(2) == 4.303 and t95(100) == 1.96
