"""Performance check of `harness report --json` on a million-question results.jsonl.

Generates 250,000 items x 4 levels (1,000,000 result lines with the contract fields, built from the
shipped CUB annotations so paths, truths, options and answers look real) in a temporary folder, then
runs `harness report --json` on it as a subprocess and prints wall time and the child's peak RSS.
Not a test: a measurement (target: under 10 s and under 1 GB).

    python bench/report_1m.py [--items 250000] [--keep DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
CUB = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def generate(path: Path, n_items: int, seed: int = 0) -> int:
    """Write n_items x (levels per CUB record) result lines; returns the line count."""
    rng = random.Random(seed)
    recs = [json.loads(line) for line in CUB.read_text().splitlines() if line.strip()]
    n = 0
    with path.open("wb") as f:
        buf = []
        for i in range(n_items):
            rec = recs[i % len(recs)]
            item = f"{rec['image']}#{i // len(recs)}" if i >= len(recs) else rec["image"]
            for lv in range(1, 5):
                opts = list(rec[f"choices_level{lv}"])
                rng.shuffle(opts)
                choices = dict(zip(LETTERS, opts))
                truth = rec[f"level{lv}"]
                r = rng.random()
                if r < 0.02:  # unanswered (error)
                    letter, pred, raw, err = None, None, None, "timeout"
                elif r < 0.70:  # right
                    letter = LETTERS[opts.index(truth)]
                    pred, raw, err = truth, letter, None
                else:  # wrong
                    letter = rng.choice([L for L, o in choices.items() if o != truth])
                    pred, raw, err = choices[letter], letter, None
                qid = hashlib.blake2b(f"{item}\x1f{lv}\x1fimage\x1f0\x1fgenerate\x1f".encode(),
                                      digest_size=10).hexdigest()
                buf.append(orjson.dumps({
                    "qid": qid, "item": item, "level": lv, "truth": truth, "choices": choices,
                    "letter": letter, "prediction": pred, "raw": raw, "error": err, "scored": True,
                }) + b"\n")
                n += 1
            if len(buf) >= 20000:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    return n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=250_000)
    ap.add_argument("--keep", help="write the results file here instead of a temporary folder")
    ap.add_argument("--repeat", type=int, default=1, help="run the report this many times (best wall time)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "results.jsonl"
        t0 = time.perf_counter()
        n = generate(path, args.items)
        gen_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 1e6
        print(f"generated {n:,} lines ({size_mb:.0f} MB) in {gen_s:.1f} s: {path}")
        walls = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "harness.cli", "report", "--json", str(out)],
                                  capture_output=True, text=True, cwd=ROOT, check=False)
            walls.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
        # ru_maxrss of RUSAGE_CHILDREN: the largest peak RSS among waited-for children (KiB on Linux)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        summary = json.loads(proc.stdout)
        print(f"harness report --json: wall {min(walls):.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)}), "
              f"peak RSS {peak_mib:.0f} MiB")
        print(f"n_items {summary['n_items']:,}, n_questions {summary['n_questions']:,}, hca {summary['hca']}, "
              f"leaf_acc {summary['leaf_acc']}, per_level {summary['per_level']}")
        ok = min(walls) < 10 and peak_mib < 1024
        print("target (< 10 s, < 1 GB):", "met" if ok else "MISSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
