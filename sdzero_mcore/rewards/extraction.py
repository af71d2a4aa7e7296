"""Pulling the final answer out of a model response: the last \\boxed{...}, the release's fallback
chain for Phase-1 collection, and the last code fence."""

from __future__ import annotations

import re
from typing import Optional

# \boxed and \fbox, not followed by another letter (so \boxedsomething is not a box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _braced_group(text: str, open_index: int) -> Optional[str]:
    """The content of the brace group opening at text[open_index] == "{", or None if it never closes.

    A backslash escapes the next character, so \\{ and \\} (literal braces in LaTeX, e.g. sets)
    do not count towards nesting, while \\\\{ (a line break, then a group) does.
    """
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} / \\fbox{...} in text (stripped), or None.

    Accepts a space before the brace (\\boxed {5}) and the brace-less form \\boxed 5 (one token).
    Only the LAST box counts: if it is malformed (a response truncated inside it), the answer is
    missing, and an earlier box is not used instead, because the response's final answer is the
    thing being judged. An empty box gives "" (callers treat it as no answer).
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    after = matches[-1].end()
    index = after
    while index < len(text) and text[index] in " \t":
        index += 1
    if index < len(text) and text[index] == "{":
        content = _braced_group(text, index)
        return None if content is None else content.strip()
    if index > after:  # "\boxed 5": the next whitespace/dollar-delimited token
        token = re.match(r"[^\s$]+", text[index:])
        return token.group(0) if token else None
    return None


# Phrases after which the release's Phase-1 collection reads the final answer of a response
# that has no box. "the answer is" also covers "The answer is"; the release matched these
# phrases with their case as written, here any case counts.
_ANSWER_PHRASE = re.compile(r"\b(?:the|final) answer is", re.IGNORECASE)

# A decimal number with an optional minus sign ("-3", "2.5", ".5"); thousands commas are removed
# from the text first, so "1,000" reads as 1000.
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")


def fallback_answer(text: str) -> Optional[str]:
    """The final answer as the authors' release reads it when collecting Phase-1 data, or None.

    In order: the last \\boxed{} (when the response has a box command at all, its last box is the
    answer, even if it is malformed or empty, and nothing further is tried); else everything after
    the last "the answer is" / "final answer is" (any case; the rest of the response, as the
    release takes it, so the phrase should end the response); else the last number. The piece
    is returned raw: the math reward normalises it before comparing.
    """
    if _BOX_COMMAND.search(text):
        return last_boxed(text)
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        return text[phrases[-1].end():]
    numbers = _NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


# The languages the authors' release runs, with the tags it accepts for each; the code reward
# itself runs only python and cpp, the others are recognised so that they are reported as such.
_LANGUAGE_ALIASES = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "py3": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "cc": "cpp",
    "cxx": "cpp",
    "c": "c",
    "java": "java",
    "go": "go",
    "golang": "go",
    "rust": "rust",
    "rs": "rust",
}

# An opening fence with an optional language tag, the body, and the closing fence. The body is
# non-greedy so consecutive blocks stay separate.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)

# Reasoning a model wraps in <think>...</think> may hold drafts of the program; only closed
# blocks are removed, as in the release (see strip_think).
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)


def strip_think(text: str) -> str:
    """text without its closed <think>...</think> blocks.

    An unclosed <think> (a response cut off while reasoning) is left in place, as the authors'
    release leaves it, so a program drafted inside it can still be the one judged.
    """
    return _THINK_BLOCK.sub("", text)


def last_code_block(text: str) -> Optional[tuple[str, str]]:
    """(language, source) of the response's final program, or None when it has no closed fence.

    Closed <think> blocks are dropped first. The final program is the last closed ``` block
    tagged with a programming language the release knows (python, cpp, c, java, go, rust and
    their aliases), so a trailing block of sample output or plain text does not hide it; a
    response with no such tag gives its last block. language is the canonical name ("python",
    "cpp", "c", "java", "go", "rust") or the lower-cased tag as written. A plain ``` fence is
    taken as C++ when the source has an #include line, else as Python (the two languages the
    code reward runs). An unclosed final fence (a truncated response) is ignored.
    """
    blocks = _FENCE.findall(strip_think(text))
    if not blocks:
        return None
    for tag, source in reversed(blocks):
        language = _LANGUAGE_ALIASES.get(tag.strip().lower())
        if language is not None:
            return language, source
    tag, source = blocks[-1]
    tag = tag.strip().lower()
    if tag:
        return tag, source
    language = "cpp" if re.search(r"^\s*#\s*include\b", source, re.MULTILINE) else "python"
    return language, source
