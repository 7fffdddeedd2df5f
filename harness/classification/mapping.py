"""Map free-form answers into the candidate label set (Ritossa 2024): zero-shot NLI or embeddings.

An answer that already is a candidate is taken as is (`exact`: the normalised answer is a candidate's
form; `contained`: additionally, the answer names exactly one candidate as whole words, see
scoring.py). Only the rest go to the mapper, and how each answer got its label is recorded, so a
report says how many answers needed mapping. torch/transformers are imported only by the mappers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from harness.classification.scoring import NameIndex, final_answer, norm

DirectRule = Literal["none", "exact", "contained"]
DEFAULT_NLI = "facebook/bart-large-mnli"
DEFAULT_EMBEDDING = "sentence-transformers/all-MiniLM-L6-v2"


class Mapper(Protocol):
    name: str

    def map(self, answer: str, candidates: Sequence[str]) -> str:
        """The candidate the answer most probably means."""


def direct(answer: str | None, candidates: Sequence[str], rule: DirectRule, index: NameIndex | None = None,
           ) -> str | None:
    """The candidate an answer names without any model, or None."""
    if not answer or rule == "none":
        return None
    a = norm(answer)
    for prefix in ("a ", "an ", "the "):
        a = a.removeprefix(prefix)
    for c in candidates:
        if norm(c) == a:
            return c
    if rule == "contained":
        idx = index or NameIndex(candidates)
        named = [c for c in idx.named(final_answer(answer)) if c in set(candidates)]
        if len(named) == 1:
            return named[0]
    return None


class NLIMapper:
    """transformers' zero-shot-classification pipeline: each candidate becomes the hypothesis
    "This example is {label}." and the candidate with the highest entailment wins."""

    def __init__(self, model: str = DEFAULT_NLI, *, device: str | int | None = None, batch_size: int = 16,
                 hypothesis_template: str = "This example is {}."):
        from transformers import pipeline

        self.name = f"nli:{model}"
        self.template = hypothesis_template
        self.batch_size = batch_size
        self.pipe = pipeline("zero-shot-classification", model=model, device=device)

    def map(self, answer: str, candidates: Sequence[str]) -> str:
        out = self.pipe(answer, candidate_labels=list(candidates), hypothesis_template=self.template,
                        multi_label=False, batch_size=self.batch_size)
        return out["labels"][0]


class EmbeddingMapper:
    """Cosine similarity of mean-pooled encoder embeddings (a sentence-transformers checkpoint loaded
    with plain transformers); candidate embeddings are cached."""

    def __init__(self, model: str = DEFAULT_EMBEDDING, *, device: str | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = f"embedding:{model}"
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).eval()
        self.device = device or "cpu"
        self.model.to(self.device)
        self.batch_size = batch_size
        self._cache: dict[str, object] = {}

    def embed(self, texts: Sequence[str]):
        torch = self.torch
        outs = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                h = self.model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            outs.append(torch.nn.functional.normalize(e, dim=-1))
        return torch.cat(outs)

    def map(self, answer: str, candidates: Sequence[str]) -> str:
        torch = self.torch
        missing = [c for c in dict.fromkeys(candidates) if c not in self._cache]
        if missing:
            for c, e in zip(missing, self.embed(missing)):
                self._cache[c] = e
        cand = torch.stack([self._cache[c] for c in candidates])  # type: ignore[misc]
        q = self.embed([answer])[0]
        return candidates[int(torch.argmax(cand @ q))]


def load_mapper(kind: str, model: str | None = None, device: str | None = None) -> Mapper:
    if kind == "nli":
        return NLIMapper(model or DEFAULT_NLI, device=device)
    if kind == "embedding":
        return EmbeddingMapper(model or DEFAULT_EMBEDDING, device=device)
    raise ValueError(f"unknown mapper {kind!r} (nli or embedding)")


def map_answer(answer: str | None, candidates: Sequence[str], mapper: Mapper | None, rule: DirectRule,
               index: NameIndex | None = None) -> tuple[str | None, str]:
    """(label, how): how is `direct`, `mapped`, `empty` (no answer) or `unmapped` (no mapper given)."""
    if not answer or not answer.strip():
        return None, "empty"
    d = direct(answer, candidates, rule, index)
    if d is not None:
        return d, "direct"
    if mapper is None:
        return None, "unmapped"
    return mapper.map(answer, candidates), "mapped"
