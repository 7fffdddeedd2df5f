"""How the released CUB "similar" and "random" files differ (or how any mined file compares with them).

    python -m bench.clip_distractors [FILE ...] [--taxonomy cub]

Per level, for each file: the sibling share of distractors (`harness.data.distractors.distractor_stats`:
distractors sharing the truth's parent), the share a uniform draw of other same-level names would give
(the expectation for each question, averaged), the distinct distractors offered per truth name, and
how often a truth's most frequent distractor is offered (share of that truth's questions). Then the
share of the first file's distractors that each other file offers too, for the same image and level.
Default files: the two shipped CUB files.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "data/hierarchy/CUB200_with_similar_choice.jsonl",
           ROOT / "data/hierarchy/CUB200_with_random_choice.jsonl"]


def measures(path: Path, taxonomy) -> dict[int, dict]:
    from harness.data.distractors import _parents_by_depth, depth_pools, distractor_stats
    from harness.data.items import read_items

    par, _ = _parents_by_depth(taxonomy)
    pools = [sorted({n.lower() for n in p}) for p in depth_pools(taxonomy)]
    # per depth: parent -> number of names under it (uniform-draw expectation of the sibling share)
    kids: list[Counter] = [Counter() for _ in pools]
    for d, pool in enumerate(pools):
        for n in pool:
            for p in par[d].get(n, ()):
                kids[d][p] += 1
    offered: dict[int, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    asked: dict[int, Counter] = defaultdict(Counter)
    expect: dict[int, list[float]] = defaultdict(list)
    for item in read_items(path):
        prev = None
        for lv in item.levels:
            if lv.truth is None:
                prev = None
                continue
            t = lv.truth.lower()
            asked[lv.n][t] += 1
            for c in lv.choices:
                if c.lower() != t:
                    offered[lv.n][t][c.lower()] += 1
            d = lv.n - 1
            if prev is not None and d < len(pools):
                expect[lv.n].append((kids[d][prev] - 1) / (len(pools[d]) - 1))
            prev = t
    sib = distractor_stats(path, taxonomy)
    out = {}
    for n in sorted(offered):
        per_truth = offered[n]
        out[n] = {
            "sibling_pct": sib[n].percent if n in sib else None,
            "uniform_pct": 100 * sum(expect[n]) / len(expect[n]) if expect[n] else None,
            "distinct_per_truth": sum(len(c) for c in per_truth.values()) / len(per_truth),
            "top_offered_pct": 100 * sum(c.most_common(1)[0][1] / asked[n][t] for t, c in per_truth.items())
            / len(per_truth),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, default=DEFAULT)
    ap.add_argument("--taxonomy", default="cub")
    args = ap.parse_args(argv)

    from harness.data.similar import overlap_stats
    from harness.data.taxonomy import load_taxonomy

    tax = load_taxonomy(args.taxonomy)
    fmt = lambda v, f: "-" if v is None else format(v, f) + "%"
    for f in args.files:
        print(f"## {f.name}")
        print("| level | sibling share | uniform-draw share | distinct distractors per truth | top distractor offered |")
        print("|---|---|---|---|---|")
        for n, m in measures(f, tax).items():
            print(f"| {n} | {fmt(m['sibling_pct'], '.1f')} | {fmt(m['uniform_pct'], '.1f')} | "
                  f"{m['distinct_per_truth']:.1f} | {m['top_offered_pct']:.1f}% |")
        print()
    first = args.files[0]
    for other in args.files[1:]:
        print(f"## distractors of {first.name} also offered by {other.name}")
        print(" ".join(f"L{s.level} {s.percent:.1f}%" for s in overlap_stats(first, other).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
