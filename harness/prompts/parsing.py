"""Answer extraction: the reference substring parser and a robust parser that never guesses."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Literal

ParserName = Literal["reference", "robust"]


def parse_reference(raw: str, letters: str = "ABCD") -> str | None:
    """Reference quirk: the first of the offered letters (A, B, C, D: alphabetical order) appearing
    anywhere in the response as a substring, else None ("Unknown"). "C. Arthropoda" parses as A,
    "Based on..." as B. The reference walks `choice_map.keys()`, i.e. exactly the offered letters."""
    # only the offered letters, as the reference (`next(key for key in choice_map.keys() if key in
    # response)`): a two-option question never returns "C" or "D"
    for L in letters:
        if L in raw:
            return L
    return None


_WRAP = r"[\(\[\{<*_\"'`]*"
_UNWRAP = r"[\)\]\}>*_\"'`]*"
# "A", "A.", "(A)", "A)", "**A**", "A: text", "A. text" at the very start
_LEADING = re.compile(rf"^\s*{_WRAP}([A-Z]){_UNWRAP}(?:[.:)]|\s*$|\s+-\s)")
# "Answer: A", "the answer is (B)", "correct option is C", "Option D", "choice: B"
_PHRASE = re.compile(
    rf"\b(?:answer|option|choice)s?{_UNWRAP}(?:\s+(?:is|would be|will be|should be))?\s*[:\-]?{_UNWRAP}\s*"
    rf"(?:option\s+)?{_WRAP}([A-Z])\b(?!['’]\w)",
    re.IGNORECASE,
)
_ALTERNATIVE = re.compile(rf"{_UNWRAP}\s*(?:,|/|or|and)\s*{_WRAP}([A-Z])\b")
_NORM = re.compile(r"[^0-9a-z]+")


@lru_cache(maxsize=1 << 16)  # option texts repeat across a run (CUB: ~400 distinct names)
def _norm(s: str) -> str:
    return _NORM.sub(" ", s.lower()).strip()


def parse_robust(raw: str, options: dict[str, str]) -> str | None:
    """A bare letter, "A.", "(A)", "Answer: A", "the answer is A", or an exact option text.

    Every rule that fires proposes a letter among the offered ones; two different letters is
    ambiguous and gives None. Never guesses."""
    s = raw.strip()
    if not s:
        return None
    if len(s) == 1 and s in options:  # the common answer, a bare letter: only an option *named* like a
        low = s.lower()               # letter could make it ambiguous (the full rules below agree)
        if not any(_norm(t) == low for L, t in options.items() if L != s):
            return s
    found: set[str] = set()
    m = _LEADING.match(s)
    if m and m.group(1) in options:
        found.add(m.group(1))
    for m in _PHRASE.finditer(s):
        g = m.group(1)
        if g.islower() and s[m.end(1):].strip(" .)]*'\"`"):
            continue  # "the answer is a bird": an article, not a letter
        if g.upper() in options:
            found.add(g.upper())
            # "Answer: A or B" / "A and C": a second offered letter right after is ambiguous
            if alt := _ALTERNATIVE.match(s, m.end()):
                found.add(alt.group(1))
    ns = _norm(s)
    # exact option text, possibly after a leading letter ("B. diomedeidae")
    for L, text in options.items():
        nt = _norm(text)
        if nt and (ns == nt or ns == f"{L.lower()} {nt}"):
            found.add(L)
    if len(found) == 1:
        return found.pop()
    return None


def parse_letter(raw: str | None, options: dict[str, str], parser: ParserName) -> str | None:
    if raw is None:
        return None
    if parser == "reference":
        return parse_reference(raw, "".join(options))
    return parse_robust(raw, options)


def parse_yes_no(raw: str | None) -> int:
    """Binary prompts (reference): stripped, lower-cased; starts with "y" -> 1, "n" -> 0, else -1."""
    if raw is None:
        return -1
    s = raw.strip().lower()
    return 1 if s.startswith("y") else 0 if s.startswith("n") else -1
