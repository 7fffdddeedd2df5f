"""The "similar" distractor strategy: per image and level, the same-level names most similar to the
image by CLIP/SigLIP image-text similarity.

The released "similar" CUB files look like "top-3 most similar same-level names for this image by
SigLIP image-text similarity" (hierarchy-protocol.md section 1.2), but no mining code was published.
:class:`SimilarDistractors` is that rule as a :mod:`harness.data.distractors` strategy (listed as
"similar" in its ``STRATEGIES`` table, which imports this module only when the strategy is asked for):
every name at the asked depth is embedded once per run as `template.format(name)`, every image once,
and the ranking is cosine similarity, ties broken by the pool's sorted order, so the result is
deterministic and never contains the truth. It lives with the backends because it needs a model;
re-mining a file with it is :func:`harness.data.similar.mine_items`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import torch

from harness.backends.clip import TextVocab, check_template, fill
from harness.backends.contrastive import (
    DEFAULT_SIGLIP,
    ContrastiveModel,
    default_workers,
    embed_images,
    load_model,
)
from harness.data.distractors import LevelQuery, depth_pools
from harness.data.items import parse_root_map, remap
from harness.data.taxonomy import Taxonomy


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
