"""Client throughput and client CPU of the harness engine against other client styles, plus streaming
memory, images encoded per item and prefix-cache locality. A measurement that prints figures, not a test.

    python -m bench.client_throughput [--questions 10000] [--concurrency 64]

Everything talks to an instant loopback stub (bench/_client_stub.py: tests.support.stub_server.Stub with
server-side counters) running in a SEPARATE PROCESS, so the stub's CPU is not counted as client CPU.
Client CPU = time.process_time() of this process (all its threads) over the timed section.

Throughput section, the same N distinct text-mode questions rendered from the shipped CUB file
(`harness run --mode text --preset gpt-4o`: the reference GPT text protocol, every level asked):
  (a) engine    harness.engine.core.Engine set up as `harness run` sets it up (dedupe on, as in text mode),
                rendering items lazily and writing a temp results.jsonl;
  (b) reference a ThreadPoolExecutor of 10 threads calling the synchronous
                openai.OpenAI().chat.completions.create once per question (the reference GPT script);
  (c) bare      aiohttp + orjson at the same concurrency, request bodies pre-built (the ceiling);
  (d) async-openai  openai.AsyncOpenAI (default httpx transport) at the same concurrency.
Then: peak RSS while streaming --memory-questions synthetic questions (bench.streaming_memory, in
a fresh child process); an image-mode run over --image-items generated PNG items x 4 levels (images
encoded per item, data-URL payloads per distinct image at the stub) and the prefix-cache locality of
its arrivals at the stub.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import aiohttp
import orjson

from bench import streaming_memory
from bench._client_common import HarnessRun, fmt_table, log, machine, run_args, write_items
from bench._client_stub import StubProcess
from harness.data.items import read_items
from harness.prompts.hierarchy import Renderer

# ---------------------------------------------------------------- the clients

async def engine_client(url: str, data: Path, out: Path, concurrency: int, limit: int | None = None,
                        dedupe: bool | None = None) -> dict:
    extra = ["--preset", "gpt-4o"] + (["--limit", str(limit)] if limit else [])
    h = HarnessRun(run_args(url, data, out, mode="text", concurrency=concurrency, extra=extra), dedupe=dedupe)
    async with h:
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        stats = await h.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": stats.answered + stats.failed, "failed": stats.failed, "wall": wall, "cpu": cpu,
            "note": f"dedupe {'on' if h.dedupe else 'off'}, cached {stats.cached}"}


def request_bodies(url: str, data: Path, out: Path, n: int, concurrency: int) -> list[dict]:
    """The chat bodies the engine sends for the first n questions (same settings, same order)."""
    h = HarnessRun(run_args(url, data, out, mode="text",
                            concurrency=concurrency, extra=["--preset", "gpt-4o"]))
    s = h.settings
    renderer = Renderer(s.prompt, answer=s.answer)
    qs = (q for item in read_items(data) for q in renderer.render(item) if q.auto is None)
    return [h.exp.task.body(q, None) for q in islice(qs, n)]


def reference_client(url: str, bodies: list[dict], threads: int = 10) -> dict:
    from openai import OpenAI

    client = OpenAI(api_key="sk-bench", base_url=url)

    def ask(body: dict) -> str | None:
        r = client.chat.completions.create(**body)
        return r.choices[0].message.content

    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        answers = list(ex.map(ask, bodies))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    client.close()
    return {"n": sum(a is not None for a in answers), "failed": 0, "wall": wall, "cpu": cpu,
            "note": f"{threads} threads, sync openai SDK"}


async def bare_client(url: str, bodies: list[dict], concurrency: int) -> dict:
    conn = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    answers: list[str] = []
    async with aiohttp.ClientSession(connector=conn, headers={"Content-Type": "application/json"}) as session:
        it = iter(bodies)
        target = url + "/chat/completions"

        async def worker() -> None:
            for body in it:
                async with session.post(target, data=orjson.dumps(body)) as r:
                    d = orjson.loads(await r.read())
                answers.append(d["choices"][0]["message"]["content"])

        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"n": len(answers), "failed": 0, "wall": wall, "cpu": cpu, "note": "bodies pre-built; dumps+post+loads"}


async def async_openai_client(url: str, bodies: list[dict], concurrency: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key="sk-bench", base_url=url)
    answers: list[str | None] = []
    it = iter(bodies)

    async def worker() -> None:
        for body in it:
            r = await client.chat.completions.create(**body)
            answers.append(r.choices[0].message.content)

    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await client.close()
    return {"n": len(answers), "failed": 0, "wall": wall, "cpu": cpu, "note": "default httpx transport"}


def timed(stub: StubProcess, fn, *a, **kw) -> dict:
    """Run one client measurement; add the stub's request count and CPU over the same span, and the
    CPU that other processes of the machine used meanwhile (in cores: contention makes rates noisy)."""
    import psutil

    stub.reset()
    s0, m0 = stub.cpu(), psutil.cpu_times()
    res = fn(*a, **kw)
    m1 = psutil.cpu_times()
    res["stub_cpu"] = stub.cpu() - s0
    busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
    res["others_cores"] = max(0.0, busy(m1) - busy(m0) - res["cpu"] - res["stub_cpu"]) / res["wall"]
    res["stub_requests"] = stub.stats()["requests"]
    res["qps"] = res["n"] / res["wall"]
    res["cpu_ms"] = res["cpu"] * 1000 / max(res["n"], 1)
    res["stub_cpu_ms"] = res["stub_cpu"] * 1000 / max(res["stub_requests"], 1)
    return res


def throughput(stub: StubProcess, tmp: Path, n: int, n_ref: int, concurrency: int, with_async_openai: bool,
               repeat: int) -> dict:
    data = write_items(tmp / "throughput_items.jsonl", -(-max(n, n_ref) // 4))
    bodies = request_bodies(stub.url, data, tmp / "bodies", max(n, n_ref), concurrency)
    limit_items = -(-n // 4)
    log(f"[throughput] {n:,} questions ({limit_items:,} items x 4 levels), concurrency {concurrency}; "
        f"reference-style and async-openai clients: {n_ref:,} questions")
    # warm-up (connections, imports, first-call costs), not timed
    asyncio.run(engine_client(stub.url, data, tmp / "warm", concurrency, limit=64))
    asyncio.run(bare_client(stub.url, bodies[:256], concurrency))
    reference_client(stub.url, bodies[:100])
    if with_async_openai:
        asyncio.run(async_openai_client(stub.url, bodies[:256], concurrency))

    runs: dict[str, list[dict]] = {}
    for r in range(repeat):
        log(f"[throughput] round {r + 1}/{repeat}: engine")
        runs.setdefault("engine", []).append(timed(
            stub, lambda r=r: asyncio.run(engine_client(stub.url, data, tmp / f"engine{r}", concurrency,
                                                         limit=limit_items))))
        log(f"[throughput] round {r + 1}/{repeat}: bare aiohttp+orjson")
        runs.setdefault("bare", []).append(timed(stub, lambda: asyncio.run(bare_client(stub.url, bodies[:n], concurrency))))
        log(f"[throughput] round {r + 1}/{repeat}: reference-style (10 threads x sync OpenAI)")
        runs.setdefault("reference", []).append(timed(stub, reference_client, stub.url, bodies[:n_ref]))
        if with_async_openai:
            log(f"[throughput] round {r + 1}/{repeat}: AsyncOpenAI")
            runs.setdefault("async_openai", []).append(timed(
                stub, lambda: asyncio.run(async_openai_client(stub.url, bodies[:n_ref], concurrency))))
    best = {k: max(v, key=lambda x: x["qps"]) for k, v in runs.items()}
    best["_all"] = {k: [round(x["qps"]) for x in v] for k, v in runs.items()}  # type: ignore[assignment]
    return best


def with_latency(tmp: Path, latency: float, n: int, n_ref: int, concurrencies: list[int]) -> dict:
    """The same clients against a stub that takes `latency` seconds per answer (a server, not a CPU
    race): the reference style is then bound by its 10 threads, the engine by its concurrency."""
    data = write_items(tmp / "latency_items.jsonl", -(-max(n, n_ref) // 4))
    out: dict = {}
    with StubProcess(latency=latency) as stub:
        bodies = request_bodies(stub.url, data, tmp / "latency_bodies", max(n, n_ref), max(concurrencies))
        log(f"[latency {latency * 1000:.0f} ms] reference-style, {n_ref:,} questions")
        out["reference"] = timed(stub, reference_client, stub.url, bodies[:n_ref])
        for c in concurrencies:
            log(f"[latency {latency * 1000:.0f} ms] engine, concurrency {c}, {n:,} questions")
            out[f"engine@{c}"] = timed(stub, lambda c=c: asyncio.run(
                engine_client(stub.url, data, tmp / f"latency_engine{c}", c, limit=-(-n // 4))))
            log(f"[latency {latency * 1000:.0f} ms] bare aiohttp, concurrency {c}")
            out[f"bare@{c}"] = timed(stub, lambda c=c: asyncio.run(bare_client(stub.url, bodies[:n], c)))
    return out


# ---------------------------------------------------------------- images and locality

def make_pngs(folder: Path, n: int, side: int = 256) -> list[str]:
    import random

    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(0)
    paths = []
    for i in range(n):
        im = Image.frombytes("RGB", (side, side), rnd.randbytes(side * side * 3))
        p = folder / f"img_{i:05d}.png"
        im.save(p, format="PNG", compress_level=1)
        paths.append(str(p))
    return paths


def locality(keys: list[str], window: int) -> dict:
    """From the stub's arrival order: for each image (item), the largest share of its requests that
    fall within `window` consecutive arrivals, and the span (last - first arrival index)."""
    pos: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        pos.setdefault(k, []).append(i)
    shares, spans, whole = [], [], 0
    for idx in pos.values():
        best, j = 0, 0
        for i in range(len(idx)):  # sliding window over sorted positions
            while idx[i] - idx[j] >= window:
                j += 1
            best = max(best, i - j + 1)
        shares.append(best / len(idx))
        spans.append(idx[-1] - idx[0])
        whole += best == len(idx)
    n_q = sum(len(v) for v in pos.values())
    return {"items": len(pos), "window": window,
            "share_in_window": sum(s * len(v) for s, v in zip(shares, pos.values())) / max(n_q, 1),
            "items_all_in_window": whole / max(len(pos), 1),
            "span_median": statistics.median(spans) if spans else 0, "span_max": max(spans) if spans else 0}


def images_and_locality(stub: StubProcess, tmp: Path, n_items: int, concurrency: int) -> dict:
    import harness.backends.http as engine_mod

    paths = make_pngs(tmp / "png", n_items)
    data = write_items(tmp / "image_items.jsonl", n_items, images=paths, unique_text=False)
    calls = {"n": 0}
    real = engine_mod.encode_image

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    engine_mod.encode_image = counting  # the engine's _encode looks the name up in its module
    try:
        stub.reset()
        args = run_args(stub.url, data, tmp / "image_run", mode="image", concurrency=concurrency)

        async def go():
            async with HarnessRun(args) as h:
                t0 = time.perf_counter()
                stats = await h.run()
                return stats, time.perf_counter() - t0

        stats, wall = asyncio.run(go())
    finally:
        engine_mod.encode_image = real
    st = stub.stats()
    imgs = st["images"].values()
    n_q = stats.answered + stats.failed
    return {
        "items": stats.items, "questions": n_q, "failed": stats.failed, "wall": wall,
        "images_encoded": stats.images_encoded, "encode_calls": calls["n"],
        "encoded_per_item": stats.images_encoded / max(stats.items, 1), "encode_calls_per_item": calls["n"] / max(stats.items, 1),
        "distinct_images_at_stub": len(st["images"]),
        "requests_per_image": sum(v["n"] for v in imgs) / max(len(st["images"]), 1),
        "payloads_per_image_max": max((v["payloads"] for v in imgs), default=0),
        "data_url_requests": sum(v["data_url"] for v in imgs),
        "png_kb": sum(Path(p).stat().st_size for p in paths) / len(paths) / 1024,
        "locality": locality(st["arrival_keys"], concurrency),
    }


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--questions", type=int, default=10_000, help="questions for the engine and the bare client")
    ap.add_argument("--ref-questions", type=int, default=2_000,
                    help="questions for the reference-style and AsyncOpenAI clients (slow; rates are compared)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of the throughput section (best of)")
    ap.add_argument("--no-async-openai", action="store_true", help="skip (d)")
    ap.add_argument("--memory-questions", type=int, default=100_000,
                    help="questions streamed for peak RSS (0: skip; 1000000 takes ~7 min here)")
    ap.add_argument("--image-items", type=int, default=200)
    ap.add_argument("--latency", type=float, default=0.1,
                    help="server latency (s) of the second throughput section (0: skip)")
    ap.add_argument("--latency-questions", type=int, default=4_000)
    ap.add_argument("--latency-ref-questions", type=int, default=600)
    ap.add_argument("--latency-concurrency", default="64,256", help="engine concurrencies with latency")
    ap.add_argument("--markdown", help="also write the report to this file")
    a = ap.parse_args()

    m = machine()
    started = datetime.now(timezone.utc)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp_s, StubProcess() as stub:
        tmp = Path(tmp_s)
        tp = throughput(stub, tmp, a.questions, a.ref_questions, a.concurrency, not a.no_async_openai, a.repeat)
        log(f"[images] {a.image_items} PNG items x 4 levels, image mode")
        im = images_and_locality(stub, tmp, a.image_items, a.concurrency)
        lat = with_latency(tmp, a.latency, a.latency_questions, a.latency_ref_questions,
                           [int(c) for c in a.latency_concurrency.split(",")]) if a.latency else None
    mem = streaming_memory.measure(a.memory_questions, a.concurrency) if a.memory_questions else None
    total_s = time.perf_counter() - t_all

    lines = [f"# client benchmark, {started:%Y-%m-%d %H:%M} UTC",
             "",
             (f"machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']} GiB RAM, Python {m['python']}, "
             f"{m['platform']}, {m['event_loop']}"),
             f"command: python -m bench.client_throughput {' '.join(sys.argv[1:])}".rstrip(),
             f"stub: bench/_client_stub.py (instant, no faults) in a separate process; concurrency {a.concurrency}",
             "",
             "## throughput (text mode, CUB-derived distinct questions, `--preset gpt-4o`)",
             ""]
    names = {"engine": "(a) harness engine", "reference": "(b) reference-style: 10 threads x sync OpenAI",
             "bare": "(c) bare aiohttp + orjson (ceiling)", "async_openai": "(d) AsyncOpenAI default transport"}
    rows = []
    for k in ("engine", "reference", "bare", "async_openai"):
        if k not in tp:
            continue
        r = tp[k]
        rows.append([names[k], f"{r['n']:,}", f"{r['qps']:,.0f}", f"{r['cpu_ms']:.3f}",
                     f"{r['stub_cpu_ms']:.3f}", f"{r['stub_requests']:,}", f"{r['others_cores']:.2f}", r["note"]])
    lines.append(fmt_table(rows, ["client", "questions", "q/s", "client CPU ms/q", "stub CPU ms/req",
                                  "requests at stub", "other processes (cores)", "note"]))
    e, b, ref = tp["engine"], tp["bare"], tp["reference"]
    r_bare, r_ref = e["qps"] / b["qps"], e["qps"] / ref["qps"]
    lines += ["", (f"engine / bare = {r_bare:.2f} (target >= 0.5: {'met' if r_bare >= 0.5 else 'MISSED'}); "
              f"engine / reference-style = {r_ref:.1f}x (target >= 10x: {'met' if r_ref >= 10 else 'MISSED'})")]
    lines.append(f"by client CPU per question (less sensitive to contention): bare / engine = {b['cpu_ms'] / e['cpu_ms']:.2f}, "
                 f"reference-style / engine = {ref['cpu_ms'] / e['cpu_ms']:.1f}x")
    lines.append(f"client CPU per question: engine {e['cpu_ms']:.3f} ms, bare {b['cpu_ms']:.3f} ms, "
                 f"reference-style {ref['cpu_ms']:.3f} ms"
                 + (f", AsyncOpenAI {tp['async_openai']['cpu_ms']:.3f} ms" if "async_openai" in tp else ""))
    if a.repeat > 1:
        lines.append(f"q/s of every round (best shown above): {tp['_all']}")
    lines.append("'other processes (cores)': CPU used by the rest of the machine during the timed span "
                 "(the host is shared; rates drop when it is not ~0)")
    if lat is not None:
        ms = a.latency * 1000
        lines += ["", f"## throughput with {ms:.0f} ms server latency (stub answers after {ms:.0f} ms)", ""]
        rows = []
        for k, r in lat.items():
            name = ("reference-style: 10 threads x sync OpenAI" if k == "reference" else
                    f"harness engine, concurrency {k.split('@')[1]}" if k.startswith("engine") else
                    f"bare aiohttp + orjson, concurrency {k.split('@')[1]}")
            rows.append([name, f"{r['n']:,}", f"{r['qps']:,.0f}", f"{r['cpu_ms']:.3f}", f"{r['others_cores']:.2f}"])
        lines.append(fmt_table(rows, ["client", "questions", "q/s", "client CPU ms/q", "other processes (cores)"]))
        lref = lat["reference"]["qps"]
        lines += ["", "engine / reference-style with latency: " + ", ".join(
            f"concurrency {k.split('@')[1]}: {r['qps'] / lref:.1f}x" for k, r in lat.items() if k.startswith("engine"))
            + f" (the reference style is capped at 10 threads / {a.latency:g} s = {10 / a.latency:,.0f} q/s)"]

    lines += ["", (f"## images and prefix-cache locality (image mode, {im['items']} generated PNG items x 4 levels, "
              f"~{im['png_kb']:.0f} KiB each, base64 data URLs)"), ""]
    loc = im["locality"]
    rows = [
        ["Engine.stats.images_encoded / items", f"{im['images_encoded']} / {im['items']} = {im['encoded_per_item']:.2f}"],
        ["encode_image calls / items (counted)", f"{im['encode_calls']} / {im['items']} = {im['encode_calls_per_item']:.2f}"],
        ["distinct images seen at the stub", f"{im['distinct_images_at_stub']}"],
        ["requests per distinct image (= levels)", f"{im['requests_per_image']:.2f}"],
        ["distinct data-URL payloads per image (max)", f"{im['payloads_per_image_max']}"],
        ["requests carrying a data URL", f"{im['data_url_requests']:,} of {im['questions']:,} questions"],
        [f"share of an item's questions within {loc['window']} consecutive arrivals",
         f"{loc['share_in_window']:.3f}"],
        [f"items with all questions within {loc['window']} consecutive arrivals", f"{loc['items_all_in_window']:.3f}"],
        ["arrival span of an item's questions (median / max)", f"{loc['span_median']} / {loc['span_max']}"],
        ["image-mode run", (f"{im['questions']:,} questions in {im['wall']:.1f} s ({im['questions'] / im['wall']:,.0f} q/s), "
                           f"{im['failed']} failed")],
    ]
    lines.append(fmt_table(rows, ["figure", "value"]))

    if mem is not None:
        lines += ["", (f"## streaming memory ({mem['questions']:,} synthetic text-mode questions, "
                  "fresh child process, `harness run` settings)"), ""]
        rows = [[f"{q:,}", f"{r:,.0f}"] for q, r in mem["rss_at"]]
        lines.append(fmt_table(rows, ["questions done", "RSS MB (psutil)"]))
        extra = mem["base_rss_mb"] + mem["slope_mb_per_100k"] * 10
        lines += ["", streaming_memory.describe(mem),
                  f"peak RSS (ru_maxrss) {mem['peak_rss_mb']:,.0f} MB at {mem['questions']:,} questions: target < 500 MB "
                  + ("met" if mem["peak_rss_mb"] < 500 else "MISSED")]
        if mem["questions"] < 1_000_000:
            lines.append(f"EXTRAPOLATION (not measured): at the measured growth, 1,000,000 questions would end near "
                         f"{extra:,.0f} MB (run `python -m bench.streaming_memory` to measure 1M)")

    lines += ["", "## summary", ""]
    rows = [["engine q/s", f"{e['qps']:,.0f}", ""],
            ["engine client CPU ms/question", f"{e['cpu_ms']:.3f}", ""],
            ["engine / bare aiohttp", f"{r_bare:.2f}", ">= 0.5: " + ("met" if r_bare >= 0.5 else "MISSED")],
            ["engine / reference-style, instant stub", f"{r_ref:.1f}x", ">= 10x: " + ("met" if r_ref >= 10 else "MISSED")],
            ["client CPU per question, reference-style / engine", f"{ref['cpu_ms'] / e['cpu_ms']:.1f}x", ""],
            ["images encoded per item", f"{im['encoded_per_item']:.2f}", "= 1: " + ("met" if im["encode_calls_per_item"] == 1 and im['encoded_per_item'] == 1 else "MISSED")],
            ["data-URL payloads per distinct image", f"{im['payloads_per_image_max']}", "= 1: " + ("met" if im["payloads_per_image_max"] == 1 else "MISSED")],
            ["item questions within a concurrency window", f"{loc['share_in_window']:.3f}", ""]]
    if lat is not None:
        for k, r in lat.items():
            if k.startswith("engine"):
                x = r["qps"] / lat["reference"]["qps"]
                rows.append([f"engine@{k.split('@')[1]} / reference-style, {a.latency * 1000:.0f} ms latency",
                             f"{x:.1f}x", ">= 10x: " + ("met" if x >= 10 else "MISSED")])
    if mem is not None:
        rows.append([f"peak RSS, {mem['questions']:,} questions", f"{mem['peak_rss_mb']:,.0f} MB",
                     "< 500 MB: " + ("met" if mem["peak_rss_mb"] < 500 else "MISSED")])
        if mem["questions"] < 1_000_000:
            rows.append(["RSS at 1M questions (EXTRAPOLATED)", f"~{extra:,.0f} MB",
                         "< 500 MB: " + ("likely" if extra < 500 else "likely MISSED")])
    rows += [["machine", f"{m['cpus']} CPUs, Python {m['python']}", ""], ["total bench time", f"{total_s:,.0f} s", ""]]
    lines.append(fmt_table(rows, ["figure", "value", "target"]))
    text = "\n".join(lines)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
