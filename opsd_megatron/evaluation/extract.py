"""Final-answer extraction (`\\boxed{...}` / `\\fbox{...}`) and the normalised-string fallback comparison.

Pure string code, linear in the response length, safe to run anywhere (no sympy, no signals):

    extract_boxed("... so \\\\boxed{\\\\frac{1}{2}}.")   # -> "\\\\frac{1}{2}"
    normalize_answer("\\\\dfrac{1}{2}") == normalize_answer("\\\\frac{1}{2}")   # True

Rules of `extract_boxed`: the answer is the content of the LAST `\\boxed` / `\\fbox` in the text whose braces
balance (escaped `\\{` `\\}` do not count as braces), so an unclosed trailing box (a truncated response)
falls back to the previous complete one; `\\boxed 5` (one token after a space, valid TeX) is accepted; an
empty last box, or no complete box at all, gives None.
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character or a brace


def _match_braces(text: str) -> dict[int, int]:
    """Index of every `{` that closes -> index of its `}` (one pass; escaped `\\{` `\\}` are skipped)."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_TOKEN.finditer(text):
        c = m.group(0)
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            match[stack.pop()] = m.start()
    return match


def _box_content(text: str, end: int, match: dict[int, int]) -> str | None:
    """Content of the box whose command name ends at `text[end]` (brace group or `\\boxed 5` form)."""
    j = end
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        close = match.get(j)
        return None if close is None else text[j + 1 : close]
    if j > end:  # "\boxed 5": the argument runs to the next space or `$`
        m = re.match(r"[^\s$]+", text[j : j + 1000])
        return m.group(0) if m else None
    return None


def extract_boxed(text: str | None) -> str | None:
    """The content of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, stripped; None if none.

    Scans boxes from the last one backwards and returns the first whose braces close, so an unclosed trailing
    `\\boxed{` (a response cut at max_new_tokens) falls back to the previous complete box. Nested braces are
    balanced; escaped braces (`\\{1,2\\}`) are content, not structure. One O(len(text)) pass.
    """
    if not text:
        return None
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    match = _match_braces(text)
    for end in reversed(starts):
        content = _box_content(text, end, match)
        if content is None:
            continue
        content = content.strip()
        return content or None
    return None


# --- normalised-string fallback ---------------------------------------------------------------------------

_TEXT_CMDS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(answer: str | None) -> str | None:
    """A conservative canonical string form of an answer, for the fallback comparison and for Maj@n votes.

    Removes presentation only: `$` delimiters, `\\left`/`\\right`, spacing commands and whitespace,
    `\\dfrac`/`\\tfrac` -> `\\frac`, `\\text{...}` wrappers, degree signs, `\\%`, thousands separators in a
    plain number, a trailing period, and trailing zeros of a decimal (`2.50` -> `2.5`, `204.0` -> `204`).
    It never changes the value of a mathematical expression.
    """
    if answer is None:
        return None
    s = answer.strip().strip("$").strip()
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    prev = None
    while prev != s:  # unwrap nested \text{...}
        prev = s
        s = _TEXT_CMDS.sub(r"\1", s)
    s = _SPACING.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    return s or None


def strings_match(predicted: str | None, reference: str | None) -> bool:
    """Fallback verdict: both answers non-empty and equal after `normalize_answer`."""
    a, b = normalize_answer(predicted), normalize_answer(reference)
    return a is not None and a == b
