"""Re-mining an items file's distractors, and comparing two files' distractors.

:func:`mine_items` re-mines an existing items file with any distractor strategy (same images,
labels and truths; new distractors), which is how a mined set is compared with a released one (the
"similar" CLIP/SigLIP strategy is :class:`harness.backends.clip_mining.SimilarDistractors`);
:func:`overlap_stats` measures how many distractors two files share per level.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.data.distractors import DistractorStrategy, LevelQuery, check_distractors, depth_pools, rng_for
from harness.data.imagelists import LabelMatcher
from harness.data.items import read_items
from harness.data.taxonomy import Taxonomy, load_taxonomy


@dataclass
class MineReport:
    items: int = 0
    questions: int = 0
    skipped: int = 0


def _depth_offset(first_truth: str | None, names0: set[str], n_depths: int) -> int:
    """Level 1 is depth 0 when its truth is a depth-0 name (CUB, or files carrying the root), else 1."""
    return 0 if first_truth is None or first_truth.lower() in names0 or n_depths < 2 else 1


def mine_items(items_path: str | Path, taxonomy: str | Path | Taxonomy, strategy: DistractorStrategy,
               n_choices: int = 4, seed: int = 0, *, lowercase: bool | None = None, limit: int | None = None,
               batch_size: int = 256, report: MineReport | None = None) -> Iterator[dict]:
    """Records of `items_path` with each level's distractors re-mined (image, label, split and truths
    kept; the truth's position drawn per question as `harness build` does). Every level's truth must
    lie on the path of the item's leaf in the taxonomy (errors name file and line)."""
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy)
    tax_id = tax.info.id if tax.info else tax.source.stem
    lowercase = tax_id == "cub" if lowercase is None else lowercase
    matcher = LabelMatcher(tax)
    names0 = {n.lower() for n in tax.names_by_depth()[0]}
    pools = depth_pools(tax)
    pools_lower = [frozenset(x.lower() for x in p) for p in pools]
    name = getattr(strategy, "name", type(strategy).__name__)
    prepare = getattr(strategy, "prepare", None)
    report = report if report is not None else MineReport()
    k = n_choices - 1

    def parsed():
        n = 0
        for item in read_items(items_path):
            if limit is not None and n >= limit:
                return
            n += 1
            key = matcher.match(item.label)
            if key is None:
                raise ValueError(f"{items_path}:{item.line}: field 'label': {item.label!r} matches no leaf of "
                                 f"taxonomy {tax_id}")
            path = tax.paths[key]
            off = _depth_offset(item.levels[0].truth, names0, len(path))
            qs = []
            for lv in item.levels:
                d = lv.n - 1 + off
                if lv.truth is None:
                    continue
                if d >= len(path) or path[d].lower() != lv.truth.lower():
                    raise ValueError(f"{items_path}:{item.line}: field 'level{lv.n}': truth {lv.truth!r} is not "
                                     f"on the taxonomy path of {key!r} ({' > '.join(path)})")
                qs.append((lv, LevelQuery(item.image, key, path, d)))
            yield item, qs

    batch: list = []

    def flush():
        if prepare is not None:
            prepare([q for _, qs in batch for _, q in qs])
        for item, qs in batch:
            rec: dict = {"image": item.image, "label": item.label}
            if item.split is not None:
                rec["split"] = item.split
            mined = {lv.n: (lv, q) for lv, q in qs}
            for lv in item.levels:
                if lv.n not in mined:
                    rec[f"level{lv.n}"], rec[f"choices_level{lv.n}"] = lv.truth, list(lv.choices)
                    continue
                q = mined[lv.n][1]
                rng = rng_for(item.image, q.depth, seed)
                wrong = list(strategy.choose(q, pools[q.depth], k, rng))
                check_distractors(q, wrong, pools_lower[q.depth], k, name)
                if lowercase:
                    wrong = [x.lower() for x in wrong]
                wrong.insert(rng.randrange(len(wrong) + 1), lv.truth)
                rec[f"level{lv.n}"], rec[f"choices_level{lv.n}"] = lv.truth, wrong
                report.questions += 1
            if item.taxonomy is not None:
                rec["taxonomy"] = item.taxonomy
            report.items += 1
            yield rec
        batch.clear()

    for entry in parsed():
        batch.append(entry)
        if len(batch) >= batch_size:
            yield from flush()
    if batch:
        yield from flush()


@dataclass
class LevelOverlap:
    level: int
    questions: int = 0
    distractors: int = 0  # distractors of file A
    shared: int = 0  # ... also offered by file B for the same image and level

    @property
    def percent(self) -> float:
        return 100.0 * self.shared / self.distractors if self.distractors else 0.0

    def as_dict(self) -> dict:
        return {"level": self.level, "questions": self.questions, "distractors": self.distractors,
                "shared": self.shared, "shared_pct": round(self.percent, 2)}


def overlap_stats(a: str | Path, b: str | Path) -> dict[int, LevelOverlap]:
    """Per level, the share of A's distractors that B offers too for the same image (case-insensitive).
    Items are matched by id (the image path unless an `id` field is given); unmatched items are left out."""
    other: dict[str, dict[int, tuple[str | None, frozenset[str]]]] = {}
    for item in read_items(b):
        other[item.id] = {lv.n: (lv.truth, frozenset(c.lower() for c in lv.choices)) for lv in item.levels}
    out: dict[int, LevelOverlap] = {}
    for item in read_items(a):
        levels = other.get(item.id)
        if levels is None:
            continue
        for lv in item.levels:
            if lv.truth is None or lv.n not in levels:
                continue
            st = out.setdefault(lv.n, LevelOverlap(lv.n))
            st.questions += 1
            truth = lv.truth.lower()
            for c in lv.choices:
                if c.lower() == truth:
                    continue
                st.distractors += 1
                st.shared += c.lower() in levels[lv.n][1]
    return dict(sorted(out.items()))
