"""Scale check of `harness view` on a million-question run folder.

Generates a run folder of 250,000 items x 4 levels (1,000,000 result lines, as bench/report_1m.py,
plus the items file and a run.json so questions can be rendered), then measures, each in a fresh child
process:
  1. the index build (`harness.view.index.build`: the SQLite index and the cached `harness report`
     summary) - wall time and peak RSS;
  2. `harness view DIR --port 0` started over the built index: time to the printed URL, then the
     latency of the first page (/api/runs, the page, the first questions page, a filtered page, the
     "leaf right, ancestor wrong" page, a deep page, the taxonomy tree), and the server's RSS after them.

    python bench/view_index.py [--items 250000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.report_1m import CUB, generate


def write_items(path: Path, n_items: int) -> None:
    """The items file of the generated results (ids as report_1m writes them)."""
    recs = [json.loads(line) for line in CUB.read_text().splitlines() if line.strip()]
    with path.open("wb") as f:
        for i in range(n_items):
            rec = dict(recs[i % len(recs)])
            item = f"{rec['image']}#{i // len(recs)}" if i >= len(recs) else rec["image"]
            rec["id"] = item
            f.write(orjson.dumps(rec) + b"\n")


def write_manifest(folder: Path, data: Path) -> None:
    m = {"kind": "hierarchy", "status": "done",
         "spec": {"out": str(folder), "data": str(data), "model": "bench", "image_root_map": []},
         "settings": {"model": "bench", "data": str(data), "answer": "generate",
                      "prompt": {"taxonomy": "cub", "mode": "image", "variant": 0, "option_order": "hashed"}}}
    (folder / "run.json").write_bytes(orjson.dumps(m))


BUILD = """
import resource, sys, time
from pathlib import Path
from harness.view.index import build
t = time.perf_counter(); build(Path(sys.argv[1])); w = time.perf_counter() - t
print(f"{w:.3f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
"""


def get(url: str) -> tuple[float, int]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as r:
        body = r.read()
    return time.perf_counter() - t, len(body)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) RSS of a process in MiB, from /proc."""
    cur = peak = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=250_000)
    ap.add_argument("--keep", help="build the run folder here instead of a temporary folder")
    args = ap.parse_args()
    random.seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp) / "run-1m"
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if not (folder / "results.jsonl").is_file():
            n = generate(folder / "results.jsonl", args.items)
            write_items(folder.parent / "items.jsonl", args.items)
            write_manifest(folder, folder.parent / "items.jsonl")
        else:
            n = sum(1 for _ in (folder / "results.jsonl").open("rb"))
        size = (folder / "results.jsonl").stat().st_size / 1e6
        print(f"run folder: {n:,} result lines ({size:.0f} MB), generated in {time.perf_counter() - t0:.1f} s")
        for p in folder.glob("view-index*"):
            p.unlink()

        env = os.environ | {"PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", BUILD, str(folder)], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        idx = folder / "view-index.sqlite"
        print(f"index build (incl. the report summary): {float(out[0]):.1f} s, peak RSS {out[1]} MiB, "
              f"index {idx.stat().st_size / 1e6:.0f} MB")

        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "view", str(folder), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        try:
            line = proc.stdout.readline()  # "harness view: http://127.0.0.1:PORT/  (Ctrl-C to stop)"
            url = line.split()[2]
            ready = time.perf_counter() - t0
            print(f"harness view started (index already built): URL printed after {ready:.2f} s: {url}")
            first = 0.0
            for what, path in [("page (index.html)", ""), ("runs + summary", "api/runs"),
                               ("first questions page (25)", "api/questions?run=0&page=0&per=25")]:
                s, nbytes = get(url + path)
                first += s
                print(f"  {what:<44} {s * 1000:8.1f} ms  {nbytes / 1e3:8.1f} kB")
            print(f"  {'first page, all requests':<44} {first * 1000:8.1f} ms "
                  f"(start to first page shown: {ready + first:.2f} s)")
            for what, path in [("filtered: level 3, wrong", "api/questions?run=0&level=3&status=wrong&per=25"),
                               ("filtered: leaf right, ancestor wrong", "api/questions?run=0&lraw=1&per=25"),
                               ("filtered: one truth", "api/questions?run=0&truth=passeriformes&per=25"),
                               ("deep page (page 20,000 of 40,000)", "api/questions?run=0&page=20000&per=25"),
                               ("taxonomy tree", "api/tree?run=0")]:
                s, nbytes = get(url + path)
                print(f"  {what:<44} {s * 1000:8.1f} ms  {nbytes / 1e3:8.1f} kB")
            cur, peak = rss_mib(proc.pid)
            print(f"server RSS after these requests: {cur:.0f} MiB (peak {peak:.0f} MiB)")
        finally:
            proc.terminate()
            proc.wait(10)
    _ = resource  # (kept for symmetry with report_1m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
