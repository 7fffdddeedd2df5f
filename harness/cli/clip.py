"""CLI of the contrastive baselines: `harness clip-run` (score items with CLIP/SigLIP) and
`harness clip-mine` (re-mine an items file's distractors by image-text similarity).

Importing this module is cheap (no torch): the torch modules (:mod:`harness.backends.contrastive`,
:mod:`harness.backends.clip`, :mod:`harness.backends.clip_mining`) load when a command runs.
"""

from __future__ import annotations

import argparse
import sys

from harness.backends.clip_defaults import DEFAULT_OPEN_CLIP, DEFAULT_SIGLIP
from harness.backends.clip_defaults import TEMPLATE_HIERARCHY as TEMPLATE

_MODEL_HELP = ("open_clip:ARCH/PRETRAINED (tag, checkpoint file, or `random`), open_clip:hf-hub:ORG/REPO, "
               "open_clip:local-dir:PATH, hf:HUB_ID_OR_PATH (transformers CLIP/SigLIP), or a local model folder")


def _workers(v: int | None) -> int:
    from harness.backends.contrastive import default_workers

    return default_workers() if v is None else v


def clip_spec(args):
    """The RunSpec of a `harness clip-run` command line (a `harness run --backend clip` run)."""
    from harness.runs.spec import RunSpec

    return RunSpec.model_validate({
        "out": args.out, "data": args.data, "model": args.model,
        "backend": {"kind": "clip", "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
                    # --workers 0 (decode in the encoder loop) is one decoding thread now
                    "workers": None if args.workers is None else max(args.workers, 1), "text_batch": args.text_batch},
        "task": {"kind": "hierarchy", "mode": "image", "answer": "clip", "template": args.template},
        "limit": args.limit, "image_root_map": args.image_root_map, "strict": args.strict,
        "retry_errors": args.retry_errors, "force": args.force})


def _cmd_run(args) -> int:
    from harness.backends.clip import check_template
    from harness.cli.run import print_result
    from harness.cli.spec_errors import validated
    from harness.runs.execute import execute

    check_template(args.template)  # before the model loads
    spec = validated(clip_spec, args)
    return print_result(execute(spec, progress=not args.quiet))


def _taxonomy_of(path: str, given: str | None) -> str:
    from harness.data.items import detect_taxonomy

    return detect_taxonomy(path, given)


def _cmd_mine(args) -> int:
    from harness.backends.clip_mining import SimilarDistractors
    from harness.data.build import write_jsonl_atomic
    from harness.data.distractors import distractor_stats, format_stats
    from harness.data.similar import MineReport, mine_items, overlap_stats
    from harness.data.taxonomy import load_taxonomy

    if not 2 <= args.n_choices <= 26:
        raise ValueError(f"--n-choices must be between 2 and 26, got {args.n_choices}")
    tax_id = _taxonomy_of(args.data, args.taxonomy)
    tax = load_taxonomy(tax_id)
    strategy = SimilarDistractors(tax, args.model, template=args.template, device=args.device, dtype=args.dtype,
                                  batch_size=args.batch_size, workers=_workers(args.workers),
                                  image_root_map=args.image_root_map)
    report = MineReport()
    n = write_jsonl_atomic(mine_items(args.data, tax, strategy, args.n_choices, args.seed, lowercase=args.lowercase,
                                      limit=args.limit, report=report), args.out)
    print(f"{args.out}: {n:,} items, {report.questions:,} questions re-mined with {args.model} "
          f"(template {args.template!r}, taxonomy {tax_id})")
    print("sibling share (distractors sharing the truth's parent):")
    print(format_stats(distractor_stats(args.out, tax)))
    for other in args.compare:
        print(f"\n{other}: sibling share")
        print(format_stats(distractor_stats(other, tax)))
        print(f"distractors of {args.out} also offered by {other} (same image and level):")
        for st in overlap_stats(args.out, other).values():
            print(f"  level {st.level}: {st.shared:,} of {st.distractors:,} ({st.percent:.1f}%)")
    return 0


def _common(p: argparse.ArgumentParser, default_model: str) -> None:
    p.add_argument("--model", default=default_model, help=_MODEL_HELP)
    p.add_argument("--data", required=True, metavar="ITEMS.jsonl", help="items (reference annotation format)")
    p.add_argument("--image-root-map", action="append", default=[], metavar="OLD=NEW",
                   help="rewrite image path prefixes when reading images (repeatable)")
    p.add_argument("--template", default=TEMPLATE,
                   help="option text template, `{}` or `{cls}` for the option (classification paper: 'A photo of a {cls}')")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--workers", type=int, default=None, help="image decoding threads (default: CPUs - 1, at most 16)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model precision (the reference used float32)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N items only")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    r = subparsers.add_parser(
        "clip-run", help="score items with a CLIP/SigLIP model (local, batched): `harness run --backend clip:MODEL`",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Zero-shot CLIP/SigLIP baseline: per question, the option whose text is most similar to the image "
                    "(options in file order, as the reference). The same run as `harness run --backend clip:MODEL` (one "
                    "engine, store and resume): writes OUT/results.jsonl (+ per-letter `scores` and `logits`), "
                    "run.json, summary.json; rerun to resume. Report with `harness report OUT`.")
    _common(r, DEFAULT_OPEN_CLIP)
    r.add_argument("--out", required=True, metavar="DIR", help="run folder")
    r.add_argument("--text-batch", type=int, default=256, help="texts per text-encoder call")
    r.add_argument("--strict", action="store_true", help="stop at the first invalid input line")
    r.add_argument("--retry-errors", action="store_true", help="score again the questions that failed before")
    r.add_argument("--force", action="store_true", help="resume even if run.json settings differ")
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.set_defaults(func=_cmd_run)

    m = subparsers.add_parser(
        "clip-mine", help="re-mine an items file's distractors by image-text similarity (similar choices)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Per image and level, the k same-level names most similar to the image (SigLIP by default) "
                    "become the distractors; images, labels and truths are kept. Prints the sibling share of the "
                    "result (and of --compare files, with the share of distractors both offer). New items from "
                    "an image list: `harness build --choices similar`.")
    _common(m, DEFAULT_SIGLIP)
    m.add_argument("--out", required=True, metavar="ITEMS.jsonl", help="output items (written atomically)")
    m.add_argument("--taxonomy", default=None, help="taxonomy id or file (default: from the items)")
    m.add_argument("--n-choices", type=int, default=4, help="options per level, truth included")
    m.add_argument("--seed", type=int, default=0, help="seed of the truth's position")
    m.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="lower-case the mined names (default: on for cub, as the released files)")
    m.add_argument("--compare", action="append", default=[], metavar="ITEMS.jsonl",
                   help="an items file of the same images to compare with (e.g. the released similar file)")
    m.set_defaults(func=_cmd_mine)


if __name__ == "__main__":  # pragma: no cover
    from harness.cli import main

    sys.exit(main(sys.argv[1:]))
