"""Feature extraction speed and memory: `harness probe extract` on a tiny random VLM (CPU).

1. features/s: items per second of `run_extraction` (the code behind `harness probe extract`) with the
   tiny LLaVA and tiny Qwen2-VL, for the hierarchy-vision recipe (vision + projector: the forward stops
   after the vision tower) and the hierarchy-llm recipe (the whole LLM prefill), batch sizes 1 and 8.
2. memory: peak RSS of a fresh process extracting N synthetic items (N given by --sizes; 100,000 by
   default for the largest) into a store, with the store size on disk and the time; memory should not
   grow with N (one shard buffer, a streaming reader).

Synthetic inputs: a pool of 64 random PNGs (20-60 px sides) cycled by a JSONL file of N lines, each
item a distinct id, labelled by the CUB taxonomy. Prints a markdown report.

    python -m bench.probe_features [--sizes 1000,10000,100000] [--model llava|qwen2vl] [--rate-items 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
CUB_LEAVES = ["Black-footed Albatross", "Laysan Albatross", "Sooty Albatross", "Groove-billed Ani",
              "Common Yellowthroat", "Brewer Blackbird", "Red-winged Blackbird", "Rusty Blackbird"]


def make_images(folder: Path, n: int = 64) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(20, 61, 2))
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def make_items(path: Path, n: int, images: list[str]) -> Path:
    with path.open("wb") as f:
        buf = []
        for i in range(n):
            buf.append(orjson.dumps({"id": f"item{i}", "image": images[i % len(images)],
                                     "label": CUB_LEAVES[i % len(CUB_LEAVES)],
                                     "split": "train" if i % 2 else "test"}) + b"\n")
            if len(buf) >= 10_000:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    return path


def build_model(family: str, folder: Path) -> Path:
    from transformers.utils import logging as hf_logging

    from tests.support.tiny_models import build_tiny_llava, build_tiny_qwen2vl

    hf_logging.disable_progress_bar()

    return (build_tiny_llava if family == "llava" else build_tiny_qwen2vl)(folder)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> None:
    """One extraction in this (fresh) process; prints a JSON line of figures."""
    import torch

    from harness.data.taxonomy import load_taxonomy
    from probes.data import read_image_items
    from probes.extract import Extractor, run_extraction
    from probes.recipes import load_recipe

    torch.set_num_threads(args.threads)
    ext = Extractor(args.model_dir, device="cpu")
    recipe = load_recipe(args.recipe)
    base = _rss_mb()
    items = read_image_items(args.data, taxonomy=load_taxonomy("cub"))
    t0 = time.perf_counter()
    rep = run_extraction(ext, items, args.out, recipe, settings={"bench": True}, batch_size=args.batch_size,
                         shard_size=1024, limit=args.limit)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file())
    print(orjson.dumps({"n": rep.n_rows, "seconds": dt, "items_per_s": rep.n_rows / dt, "rss_after_load_mb": base,
                        "peak_rss_mb": _rss_mb(), "store_mb": size / 1e6}).decode(), flush=True)


def run_child(model_dir: Path, data: Path, out: Path, recipe: str, batch_size: int, threads: int,
              limit: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench.probe_features", "--child", "--model-dir", str(model_dir), "--data", str(data),
           "--out", str(out), "--recipe", recipe, "--batch-size", str(batch_size), "--threads", str(threads)]
    if limit:
        cmd += ["--limit", str(limit)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    res = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"child failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return orjson.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", default="hierarchy-vision")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--model", choices=["llava", "qwen2vl"], default="llava", help="model of the memory runs")
    ap.add_argument("--sizes", default="1000,10000,100000", help="item counts of the memory runs")
    ap.add_argument("--rate-items", type=int, default=256, help="items per features/s measurement")
    ap.add_argument("--skip-rate", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0

    print(f"# probe feature extraction (tiny random VLMs, CPU)\n\nmachine: {platform.machine()}, "
          f"{os.cpu_count()} cores, python {platform.python_version()}, torch threads {args.threads}\n")
    with tempfile.TemporaryDirectory(prefix="probe-bench-") as tmp:
        tmp = Path(tmp)
        images = make_images(tmp / "images")
        if not args.skip_rate:
            data = make_items(tmp / "rate.jsonl", args.rate_items, images)
            print("## features/s\n\n| model | recipe | batch | items | s | items/s | peak RSS MB |\n|---|---|---|---|---|---|---|")
            for fam in ("llava", "qwen2vl"):
                mdir = build_model(fam, tmp / fam)
                for recipe in ("hierarchy-vision", "hierarchy-llm"):
                    for bs in (1, 8):
                        r = run_child(mdir, data, tmp / f"rate-{fam}-{recipe}-{bs}", recipe, bs, args.threads)
                        print(f"| {fam} | {recipe} | {bs} | {r['n']} | {r['seconds']:.1f} | {r['items_per_s']:.1f} "
                              f"| {r['peak_rss_mb']:.0f} |", flush=True)
        sizes = [int(s) for s in args.sizes.split(",")]
        mdir = tmp / f"mem-{args.model}"
        build_model(args.model, mdir)
        print(f"\n## memory against dataset size ({args.model}, hierarchy-vision, batch 8, shard 1024, float16)\n\n"
              "| items | s | items/s | RSS after model load MB | peak RSS MB | store MB |\n|---|---|---|---|---|---|")
        for n in sizes:
            data = make_items(tmp / f"mem-{n}.jsonl", n, images)
            r = run_child(mdir, data, tmp / f"mem-{n}", "hierarchy-vision", 8, args.threads)
            print(f"| {r['n']:,} | {r['seconds']:.0f} | {r['items_per_s']:.0f} | {r['rss_after_load_mb']:.0f} | "
                  f"{r['peak_rss_mb']:.0f} | {r['store_mb']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
