"""Similar-choice mining: per image and level, the same-level names most similar to the image.

The released "similar" CUB files look like "top-3 most similar same-level names for this image by
SigLIP image-text similarity" (hierarchy-protocol.md section 1.2), but no mining code was published.
:class:`SimilarDistractors` is that rule as a :mod:`harness.data.distractors` strategy (registered as
"similar" by :mod:`harness.cli.clip`): every name at the asked depth is embedded once per run as
`template.format(name)`, every image once, and the ranking is cosine similarity, ties broken by the
pool's sorted order, so the result is deterministic and never contains the truth.

:func:`mine_items` re-mines an existing items file (same images, labels and truths; new distractors),
which is how a mined set is compared with a released one; :func:`overlap_stats` measures how many
distractors two files share per level.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.backends.contrastive import (
    DEFAULT_SIGLIP,
    ContrastiveModel,
    default_workers,
    embed_images,
    load_model,
)
from harness.backends.clip import TextVocab, check_template, fill
from harness.data.distractors import LevelQuery, check_distractors, depth_pools, rng_for
from harness.data.items import parse_root_map, read_items, remap
from harness.data.taxonomy import Taxonomy, load_taxonomy


def _int(v: object, name: str) -> int:
    try:
        return int(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"similar distractors: option {name} must be an integer, got {v!r}") from None


class SimilarDistractors:
    """The k same-depth names with the highest image-text similarity (SigLIP by default).

    Options (strings are accepted, as from a command line): model (a spec of
    :func:`harness.backends.contrastive.load_model`, or a loaded model), template, device, dtype, batch_size
    (images per encoder call), workers (image threads), text_batch, image_root_map (OLD=NEW prefixes
    applied when reading images; the records keep the original paths), keep (ranked names kept per
    question; choose() recomputes when k needs more)."""

    name = "similar"

    def __init__(self, taxonomy: Taxonomy, model: str | ContrastiveModel = DEFAULT_SIGLIP, *,
                 template: str = "a photo of a {}.", device: str = "auto", dtype: str = "float32",
                 batch_size: int | str = 32, workers: int | str | None = None, text_batch: int | str = 256,
                 image_root_map: Sequence[str] | str = (), keep: int | str = 32, **unknown: object):
        if unknown:
            raise ValueError(f"similar distractors: unknown option(s) {', '.join(sorted(unknown))}; known: model, "
                             "template, device, dtype, batch_size, workers, text_batch, image_root_map, keep")
        check_template(template)
        self.taxonomy = taxonomy
        self.template = template
        self.model = load_model(model, device, dtype) if isinstance(model, str) else model
        self.batch_size = _int(batch_size, "batch_size")
        self.workers = default_workers() if workers in (None, "") else _int(workers, "workers")
        self.keep = _int(keep, "keep")
        self.root_map = parse_root_map([image_root_map] if isinstance(image_root_map, str) else image_root_map)
        self.pools = depth_pools(taxonomy)
        self.vocab = TextVocab(self.model, _int(text_batch, "text_batch"))
        self._pool_rows: dict[int, torch.Tensor] = {}
        self._own: dict[tuple[int, int], tuple[Sequence[str], bool]] = {}
        self._rank: dict[tuple[str, int], tuple[str, ...]] = {}

    # -- embeddings ----------------------------------------------------------------------------------

    def _pool_matrix(self, pool: Sequence[str]) -> torch.Tensor:
        rows = torch.tensor(self.vocab.ids(fill(self.template, n) for n in pool), device=self.model.device)
        return self.vocab.matrix[rows]

    def _depth_matrix(self, depth: int) -> torch.Tensor:
        if depth not in self._pool_rows:
            self._pool_rows[depth] = self._pool_matrix(self.pools[depth])
        return self._pool_rows[depth]

    def embed_images(self, images: Sequence[str]) -> torch.Tensor:
        """(len(images), D) embeddings; images read through image_root_map, decoded in the pool."""
        rows = []
        for img, emb in embed_images(self.model, images, path=lambda p: remap(p, self.root_map),
                                     batch_size=self.batch_size, workers=self.workers):
            if isinstance(emb, BaseException):
                raise ValueError(f"similar distractors: cannot read image {img!r}: {emb}") from emb  # noqa: TRY004
            rows.append(emb)
        return torch.stack(rows) if rows else torch.empty(0)

    # -- the strategy ------------------------------------------------------------------------------

    def prepare(self, queries: Sequence[LevelQuery]) -> None:
        """Rank the pool for every query of a batch: each image embedded once, one matmul per depth."""
        self._rank.clear()
        self._rank_queries(queries, self.keep)

    def _rank_queries(self, queries: Sequence[LevelQuery], keep: int) -> None:
        todo = [q for q in queries if (q.image, q.depth) not in self._rank]
        if not todo:
            return
        images = list(dict.fromkeys(q.image for q in todo))
        row = {img: i for i, img in enumerate(images)}
        emb = self.embed_images(images)
        by_depth: dict[int, list[LevelQuery]] = defaultdict(list)
        for q in todo:
            by_depth[q.depth].append(q)
        for depth, qs in by_depth.items():
            pool = self.pools[depth]
            idx = torch.tensor([row[q.image] for q in qs], device=emb.device)
            sims = emb[idx] @ self._depth_matrix(depth).T  # (Q, pool)
            # stable sort: equal similarities keep the pool's sorted order (deterministic ties)
            order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :keep].cpu().tolist()
            for q, o in zip(qs, order):
                self._rank[(q.image, q.depth)] = tuple(pool[i] for i in o)

    def ranking(self, query: LevelQuery, keep: int | None = None) -> tuple[str, ...]:
        """Names at the query's depth, most similar to its image first (truth included)."""
        keep = keep or self.keep
        key = (query.image, query.depth)
        if key not in self._rank or len(self._rank[key]) < min(keep, len(self.pools[query.depth])):
            self._rank.pop(key, None)
            self._rank_queries([query], keep)
        return self._rank[key]

    def _is_own_pool(self, pool: Sequence[str], depth: int) -> bool:
        """Whether `pool` equals this depth's pool, compared once per pool object (the builder passes
        the same tuple for every question; a reference is kept so the id is not reused)."""
        key = (id(pool), depth)
        hit = self._own.get(key)
        if hit is None or hit[0] is not pool:
            hit = (pool, depth < len(self.pools) and tuple(pool) == self.pools[depth])
            self._own[key] = hit
        return hit[1]

    def choose(self, query: LevelQuery, pool: Sequence[str], k: int, rng: random.Random) -> list[str]:
        if k <= 0:
            return []
        truth = query.truth.lower()
        if not self._is_own_pool(pool, query.depth):  # a caller's own pool: rank it directly
            emb = self.embed_images([query.image])
            sims = (emb @ self._pool_matrix(pool).T)[0]
            order = torch.sort(sims, descending=True, stable=True).indices.tolist()
            return [pool[i] for i in order if pool[i].lower() != truth][:k]
        ranked = self.ranking(query, max(self.keep, k + 1))
        return [n for n in ranked if n.lower() != truth][:k]


# --- re-mining an items file --------------------------------------------------------------------------


@dataclass
class MineReport:
    items: int = 0
    questions: int = 0
    skipped: int = 0


def _depth_offset(first_truth: str | None, names0: set[str], n_depths: int) -> int:
    """Level 1 is depth 0 when its truth is a depth-0 name (CUB, or files carrying the root), else 1."""
    return 0 if first_truth is None or first_truth.lower() in names0 or n_depths < 2 else 1


def mine_items(items_path: str | Path, taxonomy: str | Path | Taxonomy, strategy: SimilarDistractors,
               n_choices: int = 4, seed: int = 0, *, lowercase: bool | None = None, limit: int | None = None,
               batch_size: int = 256, report: MineReport | None = None) -> Iterator[dict]:
    """Records of `items_path` with each level's distractors re-mined (image, label, split and truths
    kept; the truth's position drawn per question as `harness build` does). Every level's truth must
    lie on the path of the item's leaf in the taxonomy (errors name file and line)."""
    from harness.data.build import LabelMatcher

    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy)
    tax_id = tax.info.id if tax.info else tax.source.stem
    lowercase = tax_id == "cub" if lowercase is None else lowercase
    matcher = LabelMatcher(tax)
    names0 = {n.lower() for n in tax.names_by_depth()[0]}
    pools_lower = [frozenset(x.lower() for x in p) for p in strategy.pools]
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
        strategy.prepare([q for _, qs in batch for _, q in qs])
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
                wrong = list(strategy.choose(q, strategy.pools[q.depth], k, rng))
                check_distractors(q, wrong, pools_lower[q.depth], k, strategy.name)
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
