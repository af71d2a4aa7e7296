"""Stop strings, applied to finished completions the same way for every backend.

The release ends Phase 1 samples at strings ("Question:", "<|im_end|>", "<|endoftext|>",
"<|im_start|>") as well as at the end token. A stop string that is one special token of the
vocabulary (the chat markers) is a stop token id (:func:`stop_string_ids`): the engine stops on it
and the token stays in the ids, like the end token. The others are matched, as vLLM matches them,
in the text without special tokens. Engines differ in how they report a stop string (vLLM drops
it from the text but not always from the ids; HF generate keeps it), so the cut is made here, on
the completion's own ids: the completion keeps the tokens that decode to text before the first
stop string, and nothing is re-tokenised. A token that holds both text before the stop string and
the string's start is dropped with it (rare with BPE vocabularies: stop strings usually begin a token).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from sdzero_mcore.rollout.base import Completion


def _special_tokens(tokenizer: Any) -> set[str]:
    return set(getattr(tokenizer, "all_special_tokens", ())) | set(getattr(tokenizer, "added_tokens_encoder", {}))


def stop_string_ids(tokenizer: Any, stop_strings: Sequence[str]) -> list[int]:
    """The ids of the stop strings that are single special tokens of ``tokenizer`` (e.g. ``<|im_end|>``)."""
    special = _special_tokens(tokenizer)
    return sorted({int(tokenizer.convert_tokens_to_ids(s)) for s in stop_strings if s in special})


def text_stop_strings(tokenizer: Any, stop_strings: Sequence[str]) -> list[str]:
    """The stop strings matched in text: those that are not single special tokens."""
    special = _special_tokens(tokenizer)
    return [s for s in stop_strings if s and s not in special]


def first_stop(text: str, stop_strings: Sequence[str]) -> int:
    """The index in ``text`` where the first of ``stop_strings`` begins, or -1."""
    found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return min(found) if found else -1


def cut_at_stop_strings(completion: Completion, tokenizer: Any, stop_strings: Sequence[str]) -> Completion:
    """``completion`` ended before its first stop string (finish reason ``stop``), or unchanged.
    Special tokens are not text here: stop them with their ids (:func:`stop_string_ids`)."""
    stop_strings = text_stop_strings(tokenizer, stop_strings)
    if not stop_strings:
        return completion
    ids = completion.token_ids

    def text_of(n: int) -> str:
        return tokenizer.decode(ids[:n], skip_special_tokens=True)

    offset = first_stop(text_of(len(ids)), stop_strings)
    if offset < 0:
        return completion
    # the longest prefix of ids whose text ends at or before the stop string (prefix texts grow with n)
    low, high = 0, len(ids)
    while low < high:
        middle = (low + high + 1) // 2
        if len(text_of(middle)) <= offset and first_stop(text_of(middle), stop_strings) < 0:
            low = middle
        else:
            high = middle - 1
    kept = list(ids[:low])
    logprobs = completion.logprobs[:low] if completion.logprobs is not None else None
    return replace(completion, token_ids=kept, text=text_of(low), finish_reason="stop", logprobs=logprobs)
