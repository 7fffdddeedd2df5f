"""`harness build` and `harness distractor-stats`: items from a taxonomy and an image list, and how
hard their distractors are. The library is :mod:`harness.data.build` and :mod:`harness.data.distractors`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import orjson

from harness.data.build import (
    FORMATS,
    BuildReport,
    build_items,
    detect_format,
    image_refs,
    write_jsonl_atomic,
)
from harness.data.distractors import distractor_stats, format_stats, make_strategy
from harness.data.imagelists import LabelMatcher
from harness.data.items import detect_taxonomy
from harness.data.taxonomy import load_taxonomy


def _cmd_build(args: argparse.Namespace) -> int:
    tax = load_taxonomy(args.taxonomy)
    fmt = args.format or detect_format(args.images)
    report = BuildReport()
    matcher = LabelMatcher(tax)
    refs = image_refs(fmt, args.images, tax, split=args.split, imagenet_classes=args.imagenet_classes,
                      imagenet_wnids=args.imagenet_wnids, matcher=matcher, report=report)
    opts: dict[str, object] = {}
    for o in args.choices_option:
        k, sep, v = o.partition("=")
        if not sep or not k:
            raise ValueError(f"--choices-option expects KEY=VALUE, got {o!r}")
        opts[k] = v
    strategy = make_strategy(args.choices, tax, **opts) if opts else args.choices
    records = build_items(tax, refs, strategy, args.n_choices, args.seed, lowercase=args.lowercase,
                          on_unmatched="error" if args.strict else "skip", limit=args.limit,
                          split=args.split if args.split not in (None, "all") else "test",
                          report=report, matcher=matcher)
    first = next(records, None)
    if first is None:
        for m in report.messages:
            print(f"harness build: skipped: {m}", file=sys.stderr)
        print(f"harness build: no items built from {args.images} ({report.summary()}); {args.out} not written",
              file=sys.stderr)
        return 1
    write_jsonl_atomic(_chain(first, records), args.out)
    for m in report.messages[:10]:
        print(f"harness build: skipped: {m}", file=sys.stderr)
    if len(report.messages) > 10:
        print(f"harness build: ... {sum(report.skipped.values()) - 10:,} more skipped", file=sys.stderr)
    print(f"{args.out}: {report.summary()} [taxonomy {args.taxonomy}, format {fmt}, choices {args.choices}, "
          f"seed {args.seed}]")
    return 0


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _cmd_distractor_stats(args: argparse.Namespace) -> int:
    tax_id = args.taxonomy or detect_taxonomy(args.file)
    stats = distractor_stats(args.file, tax_id, strict=not args.lenient)
    if args.json:
        sys.stdout.write(orjson.dumps({"file": str(args.file), "taxonomy": str(tax_id),
                                       "levels": [s.as_dict() for s in stats.values()]},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(f"{args.file} (taxonomy {tax_id}): share of distractors sharing the truth's parent")
        print(format_stats(stats))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    b = subparsers.add_parser(
        "build", help="build 4-choice items from a taxonomy and an image list",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build items (reference annotation format, one image a line, one level per taxonomy "
                    "path element) from a taxonomy and an image list or dataset folder.",
        epilog="input formats (--format, guessed from --images when left out):\n"
               "  jsonl     lines with image, label[, split]\n"
               "  csv       header image,label[,split]\n"
               "  cub       CUB_200_2011 folder (images.txt, image_class_labels.txt, classes.txt,\n"
               "            train_test_split.txt); --split test|train|all\n"
               "  inat      iNaturalist 2021 val/train json; the taxonomy's kingdom is kept\n"
               "  imagenet  val folder of wnid subfolders + --imagenet-classes (LOC_synset_mapping.txt,\n"
               "            a JSON wnid->name object, or names in index order with --imagenet-wnids or\n"
               "            the sorted folder wnids); classes outside the taxonomy are skipped\n"
               "  food      food-101 folder (meta/<split>.txt, images/); classes outside the taxonomy\n"
               "            are skipped\n"
               "Labels match taxonomy keys case-insensitively with '-'/'_' as spaces. Unmatched labels\n"
               "are skipped and reported (--strict: stop at the first, naming file and line).\n"
               "See also: harness distractor-stats ITEMS.jsonl --taxonomy cub")
    b.add_argument("--taxonomy", required=True, help="taxonomy id (cub, inat_animal, inat_plant, "
                   "imagenet_animal, imagenet_artifact, food) or a taxonomy JSON file")
    b.add_argument("--images", required=True, metavar="LIST_OR_ROOT", help="image list file or dataset folder/json")
    b.add_argument("--format", choices=FORMATS, default=None, help="input format (default: guessed)")
    b.add_argument("--out", required=True, metavar="ITEMS.jsonl", help="output (written atomically)")
    b.add_argument("--choices", default="random", metavar="STRATEGY",
                   help="distractor strategy: random, siblings (same parent first), similar (CLIP/SigLIP "
                        "image-text similarity; needs the [clip] extra) (default random)")
    b.add_argument("--choices-option", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy option, e.g. model=hf:google/siglip-so400m-patch14-384, device=cuda, "
                        "batch_size=64 (repeatable)")
    b.add_argument("--n-choices", type=int, default=4, help="options per level, truth included (default 4)")
    b.add_argument("--seed", type=int, default=0, help="seed of the per-question RNG (default 0)")
    b.add_argument("--split", default="test",
                   help="split to take (cub: test|train|all; food: test|train; lists: rows of this split) "
                        "and the split value written (default test)")
    b.add_argument("--imagenet-classes", metavar="FILE", help="wnid -> class name mapping (imagenet format)")
    b.add_argument("--imagenet-wnids", metavar="FILE",
                   help="sorted wnid list for index-ordered class names (default: the wnid folders)")
    b.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="lower-case levels and choices (default: on for cub, as the released files; off otherwise)")
    b.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N items")
    b.add_argument("--strict", action="store_true",
                   help="stop at the first label that matches no taxonomy leaf (default: skip and report)")
    b.set_defaults(func=_cmd_build)

    s = subparsers.add_parser(
        "distractor-stats", help="per level, the share of distractors sharing the truth's parent",
        description="Measure distractor hardness: per level (from level 2), the share of distractors whose "
                    "parent in the taxonomy is the truth's parent (sibling share). Shipped CUB files: random "
                    "0.9% at species; similar 26.6% at species, 23.2% at genus.")
    s.add_argument("file", metavar="ITEMS.jsonl", help="items file to measure (reference annotation format)")
    s.add_argument("--taxonomy", default=None,
                   help="taxonomy id or file (default: the items' taxonomy field, else guessed from labels)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--lenient", action="store_true", help="skip invalid lines instead of stopping")
    s.set_defaults(func=_cmd_distractor_stats)
