"""CLIP/SigLIP scoring throughput: a `harness run --backend clip` run (the engine, the dynamically
batching ClipScorer: one image encode per item, a text vocabulary, images decoded in the engine's pool;
results written to a run folder) vs a reference-style loop (per level: encode the image and its 4 option
texts) on the same model, same items, same images. Prints images/s and encoder work per item side by side.

    python -m bench.clip_throughput [--model SPEC] [--items 200] [--batch-size 64] [--workers N]
                                    [--device auto] [--threads T] [--image-size 500x375]

Without --model a tiny random-weight SigLIP is built offline (encoder cost ~0, so the figures show the
pipeline's own overhead); `--model open_clip:ViT-B-32/random` gives a real-size encoder without a
download; with internet, `--model hf:google/siglip-so400m-patch14-384` etc. Images are generated
JPEGs at CUB's typical size (500x375) at the remapped paths of the first --items CUB items.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUB = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"
TEMPLATE = "a photo of a {}."


def make_images(root: Path, n: int, size: tuple[int, int]) -> str:
    """Noisy JPEGs (so decoding costs what a photo costs) at the first n items' remapped paths."""
    import numpy as np
    from PIL import Image

    from harness.data.items import read_items

    for item in islice(read_items(CUB), n):
        p = root / item.image[len(PREFIX) + 1:]
        if p.exists():
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        seed = int.from_bytes(hashlib.blake2b(item.image.encode(), digest_size=4).digest(), "big")
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 255, size=3)
        arr = np.clip(base + rng.normal(0, 40, size=(size[1], size[0], 3)), 0, 255).astype("uint8")
        Image.fromarray(arr).save(p, quality=90)
    return f"{PREFIX}={root}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default: a tiny random SigLIP built offline)")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--reference-items", type=int, default=None,
                    help="items for the (slow) reference loop (default: same as --items)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="image threads (default: CPUs - 1)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--image-size", default="500x375")
    ap.add_argument("--workdir", default=None, help="where images (and the tiny model) go (default: a temp dir)")
    args = ap.parse_args(argv)

    import orjson
    import torch

    from harness.backends.clip import reference_scores
    from harness.backends.contrastive import default_workers, load_model
    from harness.data.items import read_items
    from harness.runs.execute import execute
    from harness.runs.spec import RunSpec
    from harness.tasks.clip import questions_for
    from tests.support.tiny_contrastive import build_tiny_hf

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clip-bench-"))
    w, h = (int(x) for x in args.image_size.split("x"))
    root_map = make_images(work / "images", args.items, (w, h))
    spec = args.model or str(build_tiny_hf(work / "tiny-siglip", "siglip"))
    workers = default_workers() if args.workers is None else args.workers
    items = list(islice(read_items(CUB, root_map=[root_map]), args.items))
    n_ref = min(args.reference_items or args.items, len(items))

    def run_spec(out: Path, limit: int) -> RunSpec:
        return RunSpec(out=str(out), data=str(CUB), model=spec, limit=limit, image_root_map=[root_map],
                       backend={"kind": "clip", "device": args.device, "dtype": args.dtype,
                                "batch_size": args.batch_size, "workers": workers},
                       task={"template": TEMPLATE})

    def run(out: Path, limit: int):
        seen = {}
        r = execute(run_spec(out, limit), on_engine=lambda e: seen.setdefault("scorer", e.backend))
        if r.status != "done":
            raise SystemExit(f"bench run {out}: {r.status}: {r.message}")
        return r, seen["scorer"]

    run(work / "warmup", 4)  # allocator, kernels, lazy imports: not counted
    torch.manual_seed(0)  # `ARCH/random` specs: the run and the reference loop get the same weights
    r, scorer = run(work / "run", args.items)
    t_batched = r.stats["seconds"]  # engine time (model loading excluded)
    recs = [orjson.loads(x) for x in (work / "run" / "results.jsonl").read_bytes().splitlines()]
    bc = scorer.counts
    vocab = scorer.stats()["vocab"]
    device = scorer.model.device

    torch.manual_seed(0)
    model = load_model(spec, args.device, args.dtype)

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    reference_scores(model, items[0], TEMPLATE)  # warm-up
    c0 = dict(model.counts.as_dict())
    sync()
    t = time.perf_counter()
    ref = {q.qid: s for it in items[:n_ref]
           for q, s in zip(questions_for(it, TEMPLATE), reference_scores(model, it, TEMPLATE))}
    sync()
    t_ref = time.perf_counter() - t
    c1 = model.counts.as_dict()
    rc = {k: c1[k] - c0[k] for k in c1}

    n_q_ref = len(ref)
    agree = sum(r["letter"] == "ABCD"[ref[r["qid"]].best] for r in recs if r["qid"] in ref) / max(n_q_ref, 1)
    n = len(items)
    rows = [
        ("items", f"{n:,}", f"{n_ref:,}"),
        ("questions", f"{len(recs):,}", f"{n_q_ref:,}"),
        ("seconds", f"{t_batched:.2f}", f"{t_ref:.2f}"),
        ("images/s", f"{n / t_batched:,.1f}", f"{n_ref / t_ref:,.1f}"),
        ("questions/s", f"{len(recs) / t_batched:,.1f}", f"{n_q_ref / t_ref:,.1f}"),
        ("image encoder calls / item", f"{bc.image_calls / n:.3f}", f"{rc['image_calls'] / n_ref:.3f}"),
        ("text encoder calls / item", f"{bc.text_calls / n:.3f}", f"{rc['text_calls'] / n_ref:.3f}"),
        ("images encoded / item", f"{bc.images / n:.3f}", f"{rc['images'] / n_ref:.3f}"),
        ("texts encoded / item", f"{bc.texts / n:.3f}", f"{rc['texts'] / n_ref:.3f}"),
    ]
    print(f"# CLIP/SigLIP scoring throughput: {spec}")
    print(f"device {device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, image threads "
          f"{workers}, batch {args.batch_size}, images {w}x{h} JPEG, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print()
    print(f"| {'':<28} | {'harness run':>12} | {'reference loop':>14} |")
    print(f"|{'-' * 30}|{'-' * 14}|{'-' * 16}|")
    for name, a, b in rows:
        print(f"| {name:<28} | {a:>12} | {b:>14} |")
    print()
    print(f"speed-up (images/s): {(n / t_batched) / (n_ref / t_ref):.1f}x; same predictions on "
          f"{100 * agree:.2f}% of the {n_q_ref:,} questions both scored; distinct texts {vocab:,}; "
          f"{bc.images / max(bc.image_calls, 1):.1f} images per encoder call (batch size {args.batch_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
