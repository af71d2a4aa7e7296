"""Pulling the final answer out of a model response: the last \\boxed{...} and the last code fence."""

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


_LANGUAGE_ALIASES = {
    "python": "python",
    "python3": "python",
    "py": "python",
    "py3": "python",
    "cpp": "cpp",
    "c++": "cpp",
    "cc": "cpp",
    "cxx": "cpp",
}

# An opening fence with an optional language tag, the body, and the closing fence. The body is
# non-greedy so consecutive blocks stay separate.
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def last_code_block(text: str) -> Optional[tuple[str, str]]:
    """(language, source) of the last closed ``` fenced block, or None.

    language is "python", "cpp", or the lower-cased tag as written for other languages. A plain
    ``` fence is taken as C++ when the source has an #include line, else as Python (the two
    languages the code reward runs). An unclosed final fence (a truncated response) is ignored.
    """
    blocks = _FENCE.findall(text)
    if not blocks:
        return None
    tag, source = blocks[-1]
    tag = tag.strip().lower()
    if tag:
        language = _LANGUAGE_ALIASES.get(tag, tag)
    else:
        language = "cpp" if re.search(r"^\s*#\s*include\b", source, re.MULTILINE) else "python"
    return language, source
