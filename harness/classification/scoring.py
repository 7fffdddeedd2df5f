"""Is a free-form answer the right class? Three scorers of increasing strictness.

- `substring` (reference): `label.lower() in pred.lower()`. Known false positives: a class name that is
  a substring of another name or word ("ant" in "elephant", "tiger" in "tiger shark"); known misses:
  names with " / " alternatives or parentheticals ("kite (bird of prey)") are almost never written out.
- `exact`: the answer, normalised (case, punctuation, a leading article, a trailing period), is one of
  the class's forms.
- `corrected`: find every class named in the answer as whole words (a plural "s"/"es" on the last word
  allowed), drop mentions that lie inside a longer mention of another class ("tiger" inside "tiger
  shark"), and call the answer right only when exactly one class is left and it is the truth. An
  answer naming several classes is `ambiguous` (wrong), one naming none is `none` (wrong). When the
  answer has a final-answer cue ("the answer is ...", "Answer: ..."), the text after the last cue is
  scored (chain-of-thought answers).
A class's forms: its name; the name without a parenthetical ("kite" for "kite (bird of prey)"); each
" / " alternative; and user synonyms. A derived form that another class also has is dropped.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import orjson

ScorerName = Literal["substring", "exact", "corrected"]
SCORERS: tuple[ScorerName, ...] = ("substring", "exact", "corrected")

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_PAREN = re.compile(r"\s*\([^)]*\)\s*")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_CUE = re.compile(r"(?:final answer|the answer|answer)\s*(?:is|would be|:)\s*", re.IGNORECASE)


def norm(s: str) -> str:
    """Lower-case, every run of non-alphanumerics -> one space (hyphens, apostrophes, punctuation)."""
    return " ".join(_NON_ALNUM.sub(" ", s.lower()).split())


def final_answer(text: str) -> str:
    """The text after the last final-answer cue, or the whole text when there is none."""
    last = None
    for m in _CUE.finditer(text):
        last = m
    if last is None or not text[last.end():].strip():
        return text
    return text[last.end():]


def load_synonyms(path: str | Path, classes: Iterable[str]) -> dict[str, list[str]]:
    """User synonym lists: a JSON object {class: [synonym, ...]}, or a .jsonl file of {"class": .., "synonyms": [..]}."""
    path = Path(path)
    known = set(classes)
    raw = path.read_bytes()
    entries: list[tuple[int, object, object]] = []
    if path.suffix != ".jsonl":
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); a .jsonl file holds one {{class, synonyms}} a line") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object {{class: [synonyms]}} (or a .jsonl file)")
        entries = [(0, k, v) for k, v in data.items()]
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: expected an object with 'class' and 'synonyms'")  # noqa: TRY004
            entries.append((n, rec.get("class"), rec.get("synonyms")))
    out: dict[str, list[str]] = {}
    for n, cls, syns in entries:
        where = f"{path}:{n}" if n else str(path)
        if cls not in known:
            raise ValueError(f"{where}: field 'class': {cls!r} is not in the class list")
        if not isinstance(syns, list) or not all(isinstance(s, str) and s.strip() for s in syns):
            raise ValueError(f"{where}: field 'synonyms' of {cls!r}: must be a list of non-empty strings")
        out.setdefault(cls, []).extend(syns)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True, slots=True)
class Mention:
    start: int  # word index
    end: int  # exclusive
    classes: tuple[int, ...]  # class indices having this form


@dataclass(frozen=True, slots=True)
class Verdict:
    correct: bool
    status: Literal["correct", "wrong", "ambiguous", "none"]
    predicted: str | None  # the one class named, else None
    named: tuple[str, ...]


class NameIndex:
    """Every form of every class, indexed by first word for whole-word matching of answers."""

    def __init__(self, classes: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None = None):
        self.classes = list(dict.fromkeys(classes))
        self.pos = {c: i for i, c in enumerate(self.classes)}
        synonyms = synonyms or {}
        primary: dict[str, set[int]] = defaultdict(set)
        derived: dict[str, set[int]] = defaultdict(set)
        for i, c in enumerate(self.classes):
            primary[norm(c)].add(i)
            for s in synonyms.get(c, ()):
                primary[norm(s)].add(i)
            for alt in c.split(" / ") if " / " in c else ():
                derived[norm(alt)].add(i)
            head = _PAREN.sub(" ", c).strip()
            if head != c:
                derived[norm(head)].add(i)
        forms: dict[str, set[int]] = {f: set(ix) for f, ix in primary.items() if f}
        for f, ix in derived.items():
            if f and f not in primary and len(ix) == 1:  # a derived form no other class claims
                forms.setdefault(f, set()).update(ix)
        self.forms_of: dict[int, list[str]] = defaultdict(list)
        self._by_first: dict[str, list[tuple[tuple[str, ...], tuple[int, ...]]]] = defaultdict(list)
        for f, ix in forms.items():
            words = tuple(f.split())
            for i in ix:
                self.forms_of[i].append(f)
            self._by_first[words[0]].append((words, tuple(sorted(ix))))
        for lst in self._by_first.values():
            lst.sort(key=lambda t: -len(t[0]))

    def forms(self, cls: str) -> list[str]:
        return sorted(self.forms_of[self.pos[cls]])

    def mentions(self, text: str) -> list[Mention]:
        """Whole-word occurrences of any form (the last word may carry a plural s/es)."""
        words = norm(text).split()
        out = []
        for i, w in enumerate(words):
            for first in {w, w[:-1] if w.endswith("s") else None, w[:-2] if w.endswith("es") else None}:
                for form, ix in self._by_first.get(first or "", ()):
                    n = len(form)
                    if i + n > len(words):
                        continue
                    if n == 1:
                        ok = True  # `first` already allows the plural
                    else:
                        last = words[i + n - 1]
                        ok = (w == form[0] and tuple(words[i + 1:i + n - 1]) == form[1:-1]
                              and last in (form[-1], form[-1] + "s", form[-1] + "es"))
                    if ok:
                        out.append(Mention(i, i + n, ix))
        return out

    def named(self, text: str) -> tuple[str, ...]:
        """Classes named by maximal mentions (not inside a longer mention of another class), in order."""
        ms = self.mentions(text)
        keep = []
        for m in ms:
            inside = any(o is not m and o.start <= m.start and m.end <= o.end and (o.end - o.start) > (m.end - m.start)
                         and not set(o.classes) & set(m.classes) for o in ms)
            if not inside:
                keep.append(m)
        keep.sort(key=lambda m: m.start)
        seen: dict[int, None] = {}
        for m in keep:
            for i in m.classes:
                seen.setdefault(i, None)
        return tuple(self.classes[i] for i in seen)

    def exact(self, text: str) -> str | None:
        """The class whose form the whole answer is (article and trailing punctuation dropped), if one."""
        s = _ARTICLE.sub("", norm(text))
        hits = {self.classes[i] for w, ix in self._by_first.get(s.split()[0] if s else "", ())
                if " ".join(w) == s for i in ix}
        return hits.pop() if len(hits) == 1 else None


def substring(pred: str | None, label: str, synonyms: Sequence[str] = ()) -> bool:
    """Reference rule (plus optional synonyms): label, lower-cased, is a substring of the answer."""
    if not pred:
        return False
    p = pred.lower()
    return any(s.lower() in p for s in (label, *synonyms))


def exact(pred: str | None, label: str, index: NameIndex) -> bool:
    return bool(pred) and index.exact(pred) == label  # type: ignore[arg-type]


def corrected(pred: str | None, label: str, index: NameIndex) -> Verdict:
    if not pred or not pred.strip():
        return Verdict(False, "none", None, ())
    named = index.named(final_answer(pred))
    if not named:
        return Verdict(False, "none", None, ())
    if len(named) > 1:
        return Verdict(False, "ambiguous", None, named)
    return Verdict(named[0] == label, "correct" if named[0] == label else "wrong", named[0], named)


def score(pred: str | None, label: str, scorer: ScorerName, index: NameIndex,
          synonyms: Mapping[str, Sequence[str]] | None = None) -> bool:
    if scorer == "substring":
        return substring(pred, label, (synonyms or {}).get(label, ()))
    if scorer == "exact":
        return exact(pred, label, index)
    if scorer == "corrected":
        return corrected(pred, label, index).correct
    raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
