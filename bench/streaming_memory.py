"""Peak RSS of the process running the engine while it streams many synthetic questions to the stub.

Generates N/4 items x 4 levels (cycled from the shipped CUB file, every item distinct) in a temp
folder, starts the bench stub in its own process, and runs the engine in a fresh child process
(`--child`) set up as `harness run --mode text --preset gpt-4o` sets it up (every level is asked, so
N questions = N requests; text mode means `harness run` turns dedupe on). The child samples its RSS
with psutil every 0.25 s and reports getrusage(RUSAGE_SELF).ru_maxrss at the end. Target: < 500 MB.

    python -m bench.streaming_memory [--questions 1000000] [--concurrency 64] [--dedupe auto|on|off] [--memo-cap N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import orjson

from bench._client_common import ROOT, HarnessRun, fmt_table, log, machine, run_args, write_items
from bench._client_stub import StubProcess

MB = 1e6


class _LRU(OrderedDict):
    """Prototype of the suggested fix (bench only, --memo-cap): Engine._memo as a bounded LRU."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > self.cap:
            self.popitem(last=False)


async def _child(url: str, data: Path, out: Path, concurrency: int, dedupe: str, total: int, memo_cap: int = 0) -> dict:
    import psutil

    proc = psutil.Process()
    args = run_args(url, data, out, mode="text", concurrency=concurrency, extra=["--preset", "gpt-4o"])
    h = HarnessRun(args, dedupe=None if dedupe == "auto" else dedupe == "on")
    gc.collect()
    base_rss = proc.memory_info().rss
    samples: list[tuple[float, int, int]] = []  # (seconds, questions done, rss)
    async with h:
        if memo_cap:
            h.engine._memo = _LRU(memo_cap)
        s = h.engine.stats
        t0 = time.perf_counter()
        c0 = time.process_time()

        async def sample() -> None:
            last_log = 0.0
            while True:
                now = time.perf_counter() - t0
                samples.append((now, s.answered + s.failed, proc.memory_info().rss))
                if now - last_log >= 15:
                    last_log = now
                    done = s.answered + s.failed
                    log(f"  [memory] {done:,}/{total:,} questions, {done / max(now, 1e-9):,.0f} q/s, "
                        f"RSS {samples[-1][2] / MB:,.0f} MB")
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        try:
            stats = await h.run()
        finally:
            sampler.cancel()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        samples.append((wall, stats.answered + stats.failed, proc.memory_info().rss))
    n = stats.answered + stats.failed
    return {
        "questions": n, "answered": stats.answered, "failed": stats.failed, "cached": stats.cached,
        "dedupe": h.dedupe, "memo_cap": memo_cap, "wall_s": wall, "qps": n / wall, "cpu_ms_per_q": cpu * 1000 / max(n, 1),
        "base_rss_mb": base_rss / MB, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
        "sampled_peak_mb": max(r for _, _, r in samples) / MB,
        "memo_entries": len(h.engine._memo),
        "rss_at": _rss_at(samples, n),
        "results_lines": sum(1 for _ in h.results.open("rb")),
    }


def _rss_at(samples, n) -> list[tuple[int, float]]:
    """RSS (MB) when 10 %, 20 %, ... 100 % of the questions were done."""
    out = []
    for k in range(1, 11):
        target = n * k // 10
        r = next((r for _, d, r in samples if d >= target), samples[-1][2])
        out.append((target, round(r / MB, 1)))
    return out


def slope_mb_per_100k(rss_at: list[tuple[int, float]]) -> float:
    """Growth between 20 % and 100 % of the run, MB per 100,000 questions (the start is warm-up)."""
    (q0, r0), (q1, r1) = rss_at[1], rss_at[-1]
    return (r1 - r0) / max(q1 - q0, 1) * 100_000


def measure(questions: int, concurrency: int = 64, dedupe: str = "auto", memo_cap: int = 0) -> dict:
    """Generate the items, start the stub, run the child; returns the child's figures."""
    n_items = -(-questions // 4)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        data = write_items(tmp / "items.jsonl", n_items)
        log(f"[memory] {n_items:,} items x 4 levels written in {time.perf_counter() - t0:.1f} s "
            f"({data.stat().st_size / MB:,.0f} MB); streaming {n_items * 4:,} questions, dedupe={dedupe}")
        with StubProcess() as stub:
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            cmd = [sys.executable, "-m", "bench.streaming_memory", "--child", "--url", stub.url, "--data", str(data),
                   "--out", str(tmp / "run"), "--concurrency", str(concurrency), "--dedupe", dedupe,
                   "--questions", str(n_items * 4), "--memo-cap", str(memo_cap)]
            s0 = stub.cpu()
            p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, check=False)
            stub_cpu = stub.cpu() - s0
            if p.returncode != 0:
                raise RuntimeError(f"memory child failed (exit {p.returncode})")
            res = orjson.loads(p.stdout.strip().splitlines()[-1])
            res["stub_requests"] = stub.stats()["requests"]
            res["stub_cpu_ms_per_q"] = stub_cpu * 1000 / max(res["questions"], 1)
    res["slope_mb_per_100k"] = slope_mb_per_100k(res["rss_at"])
    return res


def describe(res: dict) -> str:
    pts = ", ".join(f"{q // 1000:,}k: {r:,.0f}" for q, r in res["rss_at"][1::2])
    memo = f", memo capped at {res['memo_cap']:,} (prototype fix)" if res.get("memo_cap") else ""
    return (f"{res['questions']:,} questions (dedupe {'on' if res['dedupe'] else 'off'}{memo}) in {res['wall_s']:,.0f} s "
            f"({res['qps']:,.0f} q/s, {res['cpu_ms_per_q']:.3f} CPU ms/q, {res['stub_requests']:,} requests at the stub); RSS before run {res['base_rss_mb']:,.0f} MB, "
            f"peak {res['peak_rss_mb']:,.0f} MB; RSS (MB) by questions done: {pts}; "
            f"growth {res['slope_mb_per_100k']:,.1f} MB per 100k questions; memo entries {res['memo_entries']:,}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=1_000_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--dedupe", choices=["auto", "on", "off"], default="auto",
                    help="auto: as `harness run` (on in text mode)")
    ap.add_argument("--memo-cap", type=int, default=0,
                    help="bench-only prototype of the suggested fix: bound Engine._memo to an LRU of this many entries")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        res = asyncio.run(_child(a.url, Path(a.data), Path(a.out), a.concurrency, a.dedupe, a.questions, a.memo_cap))
        sys.stdout.write(orjson.dumps(res).decode() + "\n")
        return 0
    res = measure(a.questions, a.concurrency, a.dedupe, a.memo_cap)
    m = machine()
    print(f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Python {m['python']}")
    print(describe(res))
    rows = [[f"{q:,}", f"{r:,.0f}"] for q, r in res["rss_at"]]
    print(fmt_table(rows, ["questions done", "RSS MB"]))
    ok = res["peak_rss_mb"] < 500
    print(f"peak RSS {res['peak_rss_mb']:,.0f} MB for {res['questions']:,} questions: target < 500 MB "
          + ("met" if ok else "MISSED"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
