"""Evaluation metrics as pure functions: pass@k / avg@k, correction rate, revision keywords, KL localisation.

Definitions follow the paper's evaluation protocol and token-level analysis (docs/method.md). Dataset-level
accuracies are in percent (0..100); ``pass_at_k`` itself is a probability (0..1).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)`` for ``c`` correct of ``n`` samples.

    Uses the product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` because the binomials overflow
    floats for large ``n``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if k > n:
        raise ValueError(f"k must be <= n (samples per question), got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got c={c}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        all_wrong *= 1.0 - k / i
    return 1.0 - all_wrong


def _sample_counts(rewards: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(samples, correct) per question, after checking the rewards are non-empty and binary."""
    if len(rewards) == 0:
        raise ValueError("rewards is empty: no questions to score")
    counts = []
    for index, samples in enumerate(rewards):
        if len(samples) == 0:
            raise ValueError(f"question {index} has no samples")
        for reward in samples:
            if reward not in (0, 1):
                raise ValueError(f"question {index} has reward {reward!r}; rewards must be 0 or 1")
        counts.append((len(samples), sum(int(reward) for reward in samples)))
    return counts


def avg_at_k(rewards: Sequence[Sequence[int]]) -> float:
    """Mean accuracy over each question's samples, averaged over questions, in percent.

    ``rewards[i]`` holds the 0/1 rewards of the samples of question ``i``.
    """
    counts = _sample_counts(rewards)
    return 100.0 * sum(c / n for n, c in counts) / len(counts)


def pass_at_k_dataset(rewards: Sequence[Sequence[int]], k: int) -> float:
    """Unbiased pass@k averaged over questions, in percent (each question needs at least ``k`` samples)."""
    counts = _sample_counts(rewards)
    total = 0.0
    for index, (n, c) in enumerate(counts):
        try:
            total += pass_at_k(n, c, k)
        except ValueError as error:
            raise ValueError(f"question {index}: {error}") from None
    return 100.0 * total / len(counts)


def correction_rate(first_pct: float, revised_pct: float) -> float:
    """Share of first-attempt failures fixed by the revision, in percent: (revised - first) / (100 - first).

    Negative when revising breaks more than it fixes; ``math.nan`` when ``first_pct`` is 100,
    since there is nothing left to correct.
    """
    for name, value in (("first_pct", first_pct), ("revised_pct", revised_pct)):
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{name} must be a percentage in [0, 100], got {value}")
    if first_pct == 100.0:
        return math.nan
    return 100.0 * (revised_pct - first_pct) / (100.0 - first_pct)


_LET_ME_PHRASES = (
    "let me recheck", "let me check", "let me recalculate", "let me correct", "let me rethink",
    "let me double check", "let me start over", "let me try again",
)
# Appendix E.1 in its order, then the "let's" variants it mentions without listing.
REVISION_KEYWORDS: tuple[str, ...] = (
    "wait", "hold on", "actually", "on second thought", "let me recheck", "let me check",
    "let me recalculate", "let me correct", "my mistake", "i made a mistake", "this is wrong",
    "that is wrong", "incorrect", "re-evaluate", "let me rethink", "let me double check",
    "wait a minute", "let me start over", "let me try again", "oops",
) + tuple("let's" + phrase[len("let me"):] for phrase in _LET_ME_PHRASES)

# Longest phrase first so that at any position the regex prefers "wait a minute" over "wait" and
# "let me double check" over "let me check"; re.finditer then keeps matches non-overlapping.
_KEYWORDS_LONGEST_FIRST = sorted(REVISION_KEYWORDS, key=len, reverse=True)
# Words of a phrase may be split by any whitespace run or a hyphen ("let me double-check").
# The lookarounds make matches whole words, so "incorrect" never yields "correct".
_PHRASE_PATTERNS = (
    r"[\s-]+".join(re.escape(word) for word in phrase.split(" ")) for phrase in _KEYWORDS_LONGEST_FIRST
)
# One group per phrase, in _KEYWORDS_LONGEST_FIRST order, so match.lastindex names the phrase.
_KEYWORD_PATTERN = re.compile(r"(?<!\w)(?:" + "|".join(f"({pattern})" for pattern in _PHRASE_PATTERNS) + r")(?!\w)")


def keyword_counts(text: str) -> Counter:
    """Occurrences of each ``REVISION_KEYWORDS`` phrase in ``text``: case-insensitive, whole words,
    longest match first, non-overlapping. Curly apostrophes count as straight ones."""
    normalised = text.lower().replace("\u2019", "'")
    return Counter(
        _KEYWORDS_LONGEST_FIRST[match.lastindex - 1] for match in _KEYWORD_PATTERN.finditer(normalised)
    )


def keyword_stats(texts: Sequence[str]) -> dict:
    """Revision-keyword behaviour over responses.

    Returns ``{"per_response": mean keyword count per response, "responses_with_keyword":
    fraction of responses with at least one, "counts": {phrase: total}}`` where ``counts`` holds
    only phrases that occur, most frequent first.
    """
    if len(texts) == 0:
        raise ValueError("texts is empty: no responses to count keywords in")
    totals: Counter = Counter()
    with_keyword = 0
    for text in texts:
        counts = keyword_counts(text)
        totals.update(counts)
        with_keyword += bool(counts)
    return {
        "per_response": sum(totals.values()) / len(texts),
        "responses_with_keyword": with_keyword / len(texts),
        "counts": dict(sorted(totals.items(), key=lambda item: (-item[1], item[0]))),
    }


def localization_buckets(per_token_kl: Sequence[Sequence[float]], num_buckets: int = 20) -> dict:
    """How concentrated each response's token KL is (paper Section 4.1, Figure 4).

    Each response's tokens are sorted by KL, largest first; the token of rank ``j`` (0-based) in a
    response of ``n`` tokens falls in bucket ``floor(j * num_buckets / n)``, so bucket 0 holds the
    top ``1/num_buckets`` of its tokens. Per response and non-empty bucket this computes the
    bucket's mean KL and its share of the response's total KL; each bucket's value is then averaged
    over the responses that have tokens in it (``nan`` when none do: responses shorter than
    ``num_buckets`` leave some buckets empty).

    A response whose total KL is not positive (all zeros) has no meaningful shares; it contributes
    a share of 0 to every bucket it fills, rather than being dropped, so that ``kl_share`` stays
    nan-free and counts the same responses as ``mean_kl``. Empty responses are skipped and not
    counted in ``responses``.

    Returns ``{"mean_kl": [num_buckets floats], "kl_share": [num_buckets floats], "responses": int}``.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    kl_sums = [0.0] * num_buckets
    share_sums = [0.0] * num_buckets
    filled = [0] * num_buckets  # responses with at least one token in the bucket
    responses = 0
    for index, kls in enumerate(per_token_kl):
        if len(kls) == 0:
            continue
        if not all(math.isfinite(value) for value in kls):
            raise ValueError(f"response {index} has a non-finite KL value")
        responses += 1
        ranked = sorted(kls, reverse=True)
        bucket_values: list[list[float]] = [[] for _ in range(num_buckets)]
        for rank, value in enumerate(ranked):
            bucket_values[rank * num_buckets // len(ranked)].append(value)
        total = sum(ranked)
        for bucket, values in enumerate(bucket_values):
            if values:
                kl_sums[bucket] += sum(values) / len(values)
                share_sums[bucket] += sum(values) / total if total > 0 else 0.0
                filled[bucket] += 1
    return {
        "mean_kl": [kl_sums[b] / filled[b] if filled[b] else math.nan for b in range(num_buckets)],
        "kl_share": [share_sums[b] / filled[b] if filled[b] else math.nan for b in range(num_buckets)],
        "responses": responses,
    }
