"""`harness demo`: the whole flow offline, on any machine, in about a minute.

Builds a tiny random-weight LLaVA (no download), draws stand-in JPEGs for the first N images of the
shipped CUB benchmark at their remapped paths, starts a real local server for the model
(`transformers serve`, or vLLM on a GPU), runs `harness run` through it and prints the report.
The scores are chance-level by construction (random weights); the point is that every part runs.
"""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path

from harness.paths import data_dir

AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


def draw_images(items_path: Path, root: Path, n: int) -> int:
    """A small JPEG per item at the remapped path (colour from the species, so images differ)."""
    from PIL import Image, ImageDraw

    from harness.data.items import read_items

    k = 0
    for item in islice(read_items(items_path, root_map=[f"{AUTHORS_PREFIX}={root}"]), n):
        p = Path(item.image)
        if p.exists():
            k += 1
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.blake2b(item.label.encode(), digest_size=6).digest()
        im = Image.new("RGB", (96, 72), tuple(h[:3]))
        ImageDraw.Draw(im).ellipse((20, 10, 76, 62), fill=tuple(h[3:6]))
        im.save(p, format="JPEG", quality=90)
        k += 1
    return k


def add_cli(sub) -> None:
    p = sub.add_parser("demo", help="offline end-to-end demo: tiny random model, real local server, CUB items")
    p.add_argument("--out", default="runs/demo", help="folder for the model, images and run")
    p.add_argument("--items", type=int, default=40, help="how many CUB images")
    p.add_argument("--mode", choices=["image", "text"], default="image")
    p.add_argument("--endpoint", help="use this server instead of starting one (its model must accept images)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from harness.cli import main as cli_main
    from harness.demo_models import build_tiny_llava

    out = Path(args.out).resolve()
    model_dir = out / "tiny-llava"
    if not (model_dir / "config.json").exists():
        print(f"harness demo: building a tiny random LLaVA in {model_dir}")
        build_tiny_llava(model_dir)
    items = data_dir("hierarchy") / "CUB200_with_similar_choice.jsonl"
    root = out / "images"
    n = draw_images(items, root, args.items)
    print(f"harness demo: {n} stand-in images under {root}")
    run_dir = out / f"run-{args.mode}"
    argv = ["run", "--data", str(items), "--out", str(run_dir), "--limit", str(args.items), "--mode", args.mode,
            "--image-root-map", f"{AUTHORS_PREFIX}={root}", "--concurrency", "4", "--max-tokens", "3"]
    argv += ["--endpoint", args.endpoint, "--model", str(model_dir)] if args.endpoint else ["--model", str(model_dir)]
    rc = cli_main(argv)
    if rc not in (0, 3):
        return rc
    rc = cli_main(["report", str(run_dir)]) or rc
    print("harness demo: the model has random weights, so its answers are noise: most are not a letter and are\n"
          "counted as unanswered (never guessed). With a real model, point --model at it or --endpoint at a\n"
          f"server. Files: {run_dir}/results.jsonl (one line a question), run.json (manifest), summary.json.")
    return rc
