"""Endpoint failover and cache locality (issue 15 part 4): figures, not a timed test.

2 and 4 loopback stub endpoints (subprocesses, each answering after a fixed per-request latency), the
engine as `harness run --mode text` drives it (dedupe off: every question is a request), per-endpoint
concurrency C. Capacity of one endpoint = C / latency questions/s.
  healthy   questions/s over the run vs N endpoints' capacity
  killed    one endpoint SIGKILLed at --kill-at seconds: questions/s after the kill vs the N-1 survivors'
            capacity (target: within 20 %), every question answered, none failed
  locality  share of items whose questions all reached one endpoint (target: 100 %; in the killed run
            the dead endpoint's items in flight at the kill move once, by design)

    python -m bench.endpoint_failover [--items 1500] [--latency 0.1] [--concurrency 16] [--kill-at 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from itertools import islice
from pathlib import Path

from harness.backends.http import Client, RetryPolicy
from harness.data.items import read_items
from harness.engine.core import Engine
from harness.prompts.hierarchy import PromptConfig, Renderer
from harness.tasks.hierarchy import ChatTask, Decoding, questions, units
from tests.support.engine_helpers import CUB_SIMILAR
from tests.support.stub_server import free_port


class Recorder(Client):
    """The HTTP client, recording which endpoint answered each affinity key (client side)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.where: dict[int, set[str]] = defaultdict(set)

    def pick(self, key=None):
        ep = super().pick(key)
        if ep is not None and key is not None:
            self.where[key].add(ep.base)
        return ep


def wait_port(port: int, timeout: float = 20.0) -> None:
    import socket

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"stub on port {port} did not start")


def start_stubs(n: int, latency: float) -> list[tuple[subprocess.Popen, str]]:
    out = []
    for _ in range(n):
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "tests.support.stub_server", "--port", str(port),
                              "--latency", str(latency)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append((p, f"http://127.0.0.1:{port}/v1"))
    for p, url in out:
        wait_port(int(url.rsplit(":", 1)[1].split("/")[0]))
    return out


async def one_run(urls, procs, *, items: int, conc: int, kill_at: float | None) -> dict:
    cfg = PromptConfig(taxonomy="cub", mode="text")
    renderer = Renderer(cfg, answer="generate")
    done_t: list[float] = []
    client = Recorder(urls, None, timeout=30, concurrency=conc, connections=4 * conc * len(urls))
    async with client:
        engine = Engine(client, ChatTask(cfg, Decoding(model="stub-model", answer="generate")),
                        lambda rec: done_t.append(time.monotonic()), concurrency=2 * conc * len(urls),  # as harness run sets it
                        retry=RetryPolicy(max_retries=8, base=0.05, cap=1.0), dedupe=False)
        killed = None
        if kill_at is not None:
            async def kill():
                nonlocal killed
                await asyncio.sleep(kill_at)
                procs[-1].kill()
                killed = time.monotonic()
            killer = asyncio.create_task(kill())
        t0 = time.monotonic()
        await engine.run(units(questions(islice(read_items(CUB_SIMILAR), items), renderer, set())))
        t1 = time.monotonic()
        if kill_at is not None:
            killer.cancel()
    s = engine.stats
    asked = s.answered + s.failed
    res = {"questions": asked, "answered": s.answered, "failed": s.failed, "retried": s.retried, "seconds": t1 - t0,
           "qps": asked / (t1 - t0), "unavailable": s.unavailable,
           "locality": sum(len(v) == 1 for v in client.where.values()) / max(1, len(client.where)),
           "per_endpoint": [e.requests for e in client.endpoints]}
    if killed is not None:
        # answered lines after the kill (auto-filled leaves are written at production time: leave out
        # lines of the first 0.5 s after the kill, the dead endpoint's in-flight requests moving over)
        after = [t for t in done_t if t >= killed + 0.5]
        res["qps_after_kill"] = len(after) / max(1e-9, t1 - (killed + 0.5)) * 3 / 4  # 3 of 4 lines are asked
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1500, help="CUB items (3 asked questions each)")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds per request at each endpoint")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight per endpoint")
    ap.add_argument("--kill-at", type=float, default=3.0, help="seconds into the run when one endpoint dies")
    a = ap.parse_args()
    cap1 = a.concurrency / a.latency
    print(f"# endpoint failover: {a.items} items x 3 questions, latency {a.latency * 1000:.0f} ms, "
          f"{a.concurrency} in flight per endpoint (capacity {cap1:.0f} q/s an endpoint), {os.cpu_count()} CPUs")
    print("| endpoints | run | questions/s | target (capacity) | ratio | failed | retries | locality | requests per endpoint |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (2, 4):
        for kill in (None, a.kill_at):
            procs = start_stubs(n, a.latency)
            try:
                r = asyncio.run(one_run([u for _, u in procs], [p for p, _ in procs], items=a.items,
                                        conc=a.concurrency, kill_at=kill))
            finally:
                for p, _ in procs:
                    p.kill()
                    p.wait()
            if kill is None:
                qps, target, label = r["qps"], n * cap1, "healthy"
            else:
                qps, target, label = r["qps_after_kill"], (n - 1) * cap1, f"1 killed at {kill:g} s (after the kill)"
            print(f"| {n} | {label} | {qps:,.0f} | {target:,.0f} | {qps / target:.0%} | {r['failed']} | {r['retried']} "
                  f"| {r['locality']:.1%} | {r['per_endpoint']} |" + (f" UNAVAILABLE: {r['unavailable']}" if r["unavailable"] else ""),
                  flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
