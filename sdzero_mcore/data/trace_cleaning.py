"""Cleaning of Phase 1 (self-revision) tuples before SFT, as the official release does it.

The release (princeton-pli/Self-Distillation-Zero) cleans D_revision before it builds the SFT
files: ``scripts/run_srt_data.sh`` runs ``self-revision-training/prepare_data.py`` without
``--no_clean``, so cleaning is on for every run that produced the paper's tables. Its rules live in
``prepare_data.py`` (the repeating-tail trim, the opener strip, the per-record cleaning and the
filter-and-dedupe step). This module restates them as pure functions on this project's Phase 1
records; it shares no code with the release.

Functions and the release behaviour each follows
------------------------------------------------
:func:`trim_repeated_tail` -- the release's repeating-suffix trim (``prepare_data.py``):

- a candidate period ``L`` runs from ``min_block`` (10) to ``min(max_block, len // min_repeats)``
  (1500), smallest first, and the first ``L`` that qualifies wins;
- for that ``L`` the periodic tail is the longest suffix in which every character equals the one
  ``L`` characters later; it qualifies when it is at least ``min_repeats * L`` (3 copies) long.
  The region may end in a partial copy and may begin mid-block;
- the text is cut to everything before that region plus its first ``L`` characters: exactly one
  copy is kept, every other copy (and a trailing partial copy) is dropped;
- this is repeated, up to ``max_passes`` (5) times, because a cut can expose a longer period
  (e.g. ``...Y Y Y Z Z Z`` with Z a prefix of Y: the Z's go first, then the Y's); it stops at
  the first pass that cuts nothing, and at once when the text is shorter than
  ``min_repeats * min_block``;
- consequence kept from the release: a block shorter than ``min_block`` that repeats many times
  is trimmed to one copy of its smallest multiple that is at least ``min_block`` long
  (a 9-character block repeated 12 times leaves two copies, 18 characters).

The release walks the tail character by character for every ``L``; here the periodic-tail
lengths of all candidate periods come from one Z-function pass over the reversed text, so a
pass costs O(len(text) + max_block) whatever the text (a 16K-token trace is about 64K
characters). The result is the same as the release's for every input.

:func:`strip_flattering_opener` -- the release's sycophantic-opening strip (``prepare_data.py``),
applied to y_rev only. Openers are matched, case-insensitively, at the start of the text after
its leading whitespace:

- "You're/You are [absolutely] right to <...>" up to the end of its sentence (``.``, ``!`` or
  ``?`` on the same line): the whole sentence goes;
- "[Yes|Indeed[,!.]] You're/You are [absolutely] right" followed by ``—``, ``-``, ``,``, ``:``
  or ``.``: only the phrase and its punctuation go. As in the release, "You're absolutely
  right!" (an exclamation mark) and a curly apostrophe (``You’re``) are not matched;
- "Thank you for <...>" up to the end of its sentence (same line);
- "Great question <...>" and "Good/Nice catch/point/observation <...>" up to the first ``.``,
  ``!``, ``?``, ``—`` or ``-`` on the same line;
- the whitespace after a removed opener goes with it, openers are removed one after another
  until none is left at the start ("Thank you for that. You're absolutely right — ..."), and
  when anything was removed a lower-case first letter of the rest is capitalised.

  Deviation: when no opener matches, the text is returned exactly as given. The release strips
  leading whitespace from every y_rev even then (its docstring says the text is returned
  unchanged); that would change, and so re-tokenise, traces that had no opener.

:func:`clean_records` -- the release's per-record cleaning followed by its dedupe
(``prepare_data.py``, which cleans every record before filtering and deduplicating):

- y_init: the repeated-tail trim; y_rev: the repeated-tail trim, *then* the opener strip (the
  release's order; x is never changed);
- then deduplication on the cleaned ``(x, y_init, y_rev)``, keeping the first occurrence in input
  order, so two tuples that differ only in what cleaning removed are duplicates, as in the release.

  Additions (not in the release): a record in which a rule left y_init or y_rev empty or
  whitespace-only is dropped (the release keeps it; a text that was empty before cleaning is
  not touched by any rule and is left to the caller). The release's filter on the revision's
  correctness (``y_revised_correct``) is not applied here: the caller passes D_revision (the
  records with ``r_rev == 1``), or filters afterwards, with the same result since the reward
  is a function of the text. Records are copied, never modified in place, and the token ids are
  kept consistent with the text: a changed text's ``*_ids`` are re-encoded with
  ``tokenizer.encode(text, add_special_tokens=False)`` and a trailing end token (an id in
  ``eos_ids``) that the sampled ids had is put back; an unchanged text keeps its sampled ids
  as they were. Other keys (``init_tokens``, ``rev_tokens``, rewards, ids of the question,
  attempt and revision, ...) are kept unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

__all__ = [
    "CleaningResult",
    "RULES",
    "clean_records",
    "strip_flattering_opener",
    "trim_repeated_tail",
]

# The release's defaults (prepare_data.py).
MIN_BLOCK = 10
MAX_BLOCK = 1500
MIN_REPEATS = 3
MAX_PASSES = 5

# Rule names as they appear in CleaningResult and its summary.
REPEATED_TAIL = "repeated_tail"
FLATTERING_OPENER = "flattering_opener"
EMPTIED = "emptied"
DUPLICATE = "duplicate"
RULES = (REPEATED_TAIL, FLATTERING_OPENER, EMPTIED, DUPLICATE)


# --------------------------------------------------------------------------------------------
# (a) repeated tail
# --------------------------------------------------------------------------------------------

def _lcp_with_shifts(s: str, max_shift: int) -> list[int]:
    """``z[k]`` = length of the longest common prefix of ``s`` and ``s[k:]`` for 1 <= k <= max_shift.

    The Z-algorithm restricted to the first shifts: the window [left, right) is the rightmost
    match found so far (``s[left:right] == s[:right - left]``), and every character comparison
    either fails (once per shift) or moves ``right`` forward, so the cost is O(max_shift + len(s)).
    """
    n = len(s)
    z = [0] * (max_shift + 1)
    left = right = 0
    for k in range(1, max_shift + 1):
        length = min(right - k, z[k - left]) if k < right else 0
        while k + length < n and s[length] == s[k + length]:
            length += 1
        z[k] = length
        if k + length > right:
            left, right = k, k + length
    return z


def _trim_once(text: str, min_block: int, max_block: int, min_repeats: int) -> str:
    n = len(text)
    longest = min(max_block, n // min_repeats)
    if longest < min_block:
        return text
    # On the reversed text, z[L] is how far the period-L tail of ``text`` extends beyond its last
    # L characters: the tail text[n - L - z[L]:] is periodic with period L, and no longer one is.
    z = _lcp_with_shifts(text[::-1], longest)
    for period in range(min_block, longest + 1):
        if z[period] >= (min_repeats - 1) * period:
            # Keep what precedes the periodic tail and one period of it.
            return text[: n - z[period]]
    return text


def trim_repeated_tail(
    text: str,
    *,
    min_block: int = MIN_BLOCK,
    max_block: int = MAX_BLOCK,
    min_repeats: int = MIN_REPEATS,
    max_passes: int = MAX_PASSES,
) -> str:
    """Cut a block of ``min_block``..``max_block`` characters that repeats ``min_repeats``+ times at
    the end of ``text`` down to one copy (the release's rule; see the module docstring)."""
    if min_block < 1 or max_block < min_block:
        raise ValueError(f"need 1 <= min_block <= max_block, got min_block={min_block}, max_block={max_block}")
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be at least 2, got {min_repeats}")
    if max_passes < 1:
        raise ValueError(f"max_passes must be at least 1, got {max_passes}")
    for _ in range(max_passes):
        if len(text) < min_repeats * min_block:
            break
        trimmed = _trim_once(text, min_block, max_block, min_repeats)
        if trimmed == text:
            break
        text = trimmed
    return text


# --------------------------------------------------------------------------------------------
# (b) flattering opener
# --------------------------------------------------------------------------------------------

_YOU_ARE_RIGHT = r"you(?:'re| are)\s+(?:absolutely\s+)?right"
_SENTENCE_REST = r"[^.!?\n]*[.!?]"  # the rest of the sentence, on the same line
_CLAUSE_REST = r"[^.!?\n]*?[.!?\u2014-]"  # up to the first sentence end or dash

# At most one of these can match a given text (each starts differently), so the order in which
# they are tried does not change the result.
_OPENERS = tuple(
    re.compile(pattern + r"\s*", re.IGNORECASE)
    for pattern in (
        _YOU_ARE_RIGHT + r"\s+to\s+" + _SENTENCE_REST,  # the whole sentence
        r"(?:(?:yes|indeed)[,!.]?\s+)?" + _YOU_ARE_RIGHT + r"\s*[\u2014,:.-]+",  # the phrase only
        r"thank\s+you\s+for" + _SENTENCE_REST,
        r"great\s+question" + _CLAUSE_REST,
        r"(?:good|nice)\s+(?:catch|point|observation)" + _CLAUSE_REST,
    )
)


def strip_flattering_opener(text: str) -> str:
    """Remove the flattering openers ("You're absolutely right", "Thank you for", "Great question",
    "Good/Nice catch/point") at the start of a revision (the release's rule; see the module
    docstring). A text without one is returned unchanged."""
    rest = text.lstrip()
    stripped = False
    while True:
        match = next((m for m in (p.match(rest) for p in _OPENERS) if m), None)
        if match is None:
            break
        rest = rest[match.end():].lstrip()
        stripped = True
    if not stripped:
        return text
    if rest[:1].islower():
        rest = rest[0].upper() + rest[1:]
    return rest


# --------------------------------------------------------------------------------------------
# (c) records: the rules, dedupe, and token ids that follow the text
# --------------------------------------------------------------------------------------------

_REQUIRED_KEYS = ("x", "y_init", "y_rev")
_TEXT_FIELDS = ("y_init", "y_rev")


@dataclass
class CleaningResult:
    """The records kept (input order) and what each rule did.

    ``changed[rule]``: input records in which the rule changed a text (counted before any record
    is dropped, so a record can be counted here and in ``removed``). ``removed[rule]``: records
    dropped by the rule. ``reencoded[field]``: kept records whose ``field`` (``y_init_ids`` /
    ``y_rev_ids``) was re-encoded because its text changed.
    """

    records: list[dict]
    n_in: int
    changed: dict[str, int] = field(default_factory=lambda: {REPEATED_TAIL: 0, FLATTERING_OPENER: 0})
    removed: dict[str, int] = field(default_factory=lambda: {EMPTIED: 0, DUPLICATE: 0})
    reencoded: dict[str, int] = field(default_factory=lambda: {"y_init_ids": 0, "y_rev_ids": 0})

    @property
    def n_out(self) -> int:
        return len(self.records)

    def as_summary(self) -> dict[str, Any]:
        """A JSON-able dict for a collection summary (no records, only counts and settings)."""
        return {
            "records_in": self.n_in,
            "records_out": self.n_out,
            "changed": dict(self.changed),
            "removed": dict(self.removed),
            "reencoded": dict(self.reencoded),
            "rules": {
                REPEATED_TAIL: {
                    "fields": ["y_init", "y_rev"], "min_block": MIN_BLOCK, "max_block": MAX_BLOCK,
                    "min_repeats": MIN_REPEATS, "max_passes": MAX_PASSES,
                },
                FLATTERING_OPENER: {"fields": ["y_rev"]},
                DUPLICATE: {"key": ["x", "y_init", "y_rev"], "keep": "first"},
            },
            "follows": "princeton-pli/Self-Distillation-Zero self-revision-training/prepare_data.py",
        }


def _reencode(tokenizer: Any, text: str, old_ids: Sequence[int], eos_ids: frozenset[int]) -> list[int]:
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    if len(old_ids) and int(old_ids[-1]) in eos_ids:
        end = int(old_ids[-1])
        if not ids or ids[-1] != end:
            ids.append(end)
    return ids


def clean_records(records: Sequence[dict], tokenizer: Any, *, eos_ids: Iterable[int] = frozenset()) -> CleaningResult:
    """Apply the release's cleaning to Phase 1 revision records (see the module docstring).

    Each record needs the text fields ``x``, ``y_init`` and ``y_rev``; ``y_init_ids`` /
    ``y_rev_ids``, when present, are re-encoded only if their text changed, with a trailing id
    from ``eos_ids`` that they ended with put back. The input records are not modified.
    """
    eos = frozenset(int(t) for t in eos_ids)
    result = CleaningResult(records=[], n_in=len(records))
    seen: set[tuple[str, str, str]] = set()
    for index, record in enumerate(records):
        missing = [key for key in _REQUIRED_KEYS if not isinstance(record.get(key), str)]
        if missing:
            raise ValueError(f"record {index}: missing or non-text field(s) {', '.join(missing)}")
        y_init = trim_repeated_tail(record["y_init"])
        y_rev_trimmed = trim_repeated_tail(record["y_rev"])
        y_rev = strip_flattering_opener(y_rev_trimmed)
        if y_init != record["y_init"] or y_rev_trimmed != record["y_rev"]:
            result.changed[REPEATED_TAIL] += 1
        if y_rev != y_rev_trimmed:
            result.changed[FLATTERING_OPENER] += 1

        cleaned = {"y_init": y_init, "y_rev": y_rev}
        if any(record[f].strip() and not cleaned[f].strip() for f in _TEXT_FIELDS):
            result.removed[EMPTIED] += 1
            continue
        key = (record["x"], y_init, y_rev)
        if key in seen:
            result.removed[DUPLICATE] += 1
            continue
        seen.add(key)

        out = dict(record)
        for name in _TEXT_FIELDS:
            if cleaned[name] == record[name]:
                continue
            out[name] = cleaned[name]
            ids_key = f"{name}_ids"
            if ids_key in record:
                out[ids_key] = _reencode(tokenizer, cleaned[name], record[ids_key], eos)
                result.reencoded[ids_key] += 1
        result.records.append(out)
    return result
