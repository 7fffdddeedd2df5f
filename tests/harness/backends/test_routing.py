"""Issue 15 part 1: routing that knows its servers, each failure reproduced against loopback servers
(stubs for faults) and shown fixed - a dead endpoint among two, uniform 500s, garbage replies, a hang, a
server dying mid-run, no healthy endpoint then recovery with the same command, item affinity and the
data-parallel rank header."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import orjson
from aiohttp import web

from harness.backends.http import RANK_HEADER, Client, RetryPolicy, redact_url
from harness.engine.core import ErrorBreaker
from tests.support.engine_helpers import (
    CUB_SIMILAR,
    by_qid,
    cub_text_questions,
    image_items,
    read_results,
    run_cli,
    run_engine,
)
from tests.support.stub_server import Stub, StubThread, free_port

FAST = RetryPolicy(max_retries=8, base=0.005, cap=0.05)
QUICK_BREAKER = ErrorBreaker(min_failures=20, min_seconds=0.5)


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def _kill_after(st: StubThread, seconds: float) -> threading.Timer:
    t = threading.Timer(seconds, st.__exit__, args=(None, None, None))
    t.start()
    return t


def _answered_once(out, n_items: int) -> list[dict]:
    recs = read_results(out / "results.jsonl")
    by_qid(recs)  # raises on a qid written twice
    questions = cub_text_questions(CUB_SIMILAR, limit=n_items)
    got = {r["qid"] for r in recs if r.get("error") is None}
    assert {q.qid for q in questions} <= got
    assert not [r for r in recs if r.get("error")]
    return recs


def test_dead_endpoint_among_two_gets_no_traffic(tmp_path):
    # before: least-in-flight picked the dead endpoint (it fails at once): 300 items took 93 s, 834 retries
    stub = Stub(latency=0.002)
    with StubThread(stub) as st:
        t0 = time.monotonic()
        eng = run_engine([st.url, _dead_url()], CUB_SIMILAR, tmp_path, limit=300, concurrency=32,
                         retry=RetryPolicy(max_retries=8, base=0.5, cap=60))
        dt = time.monotonic() - t0
    _answered_once(tmp_path, 300)
    assert eng.stats.failed == 0 and eng.stats.unavailable is None
    assert eng.stats.retried <= 32, eng.stats.retried  # only the requests sent before it was taken out
    assert dt < 15, dt


def test_server_dying_mid_run_moves_its_items_to_the_survivor(tmp_path):
    a, b = Stub(latency=0.01), Stub(latency=0.01)
    with StubThread(a) as sa:
        sb = StubThread(b).__enter__()
        timer = _kill_after(sb, 0.6)
        eng = run_engine([sa.url, sb.url], CUB_SIMILAR, tmp_path, limit=600, concurrency=32)
        timer.join()
    _answered_once(tmp_path, 600)
    assert eng.stats.failed == 0 and eng.stats.unavailable is None
    assert a.requests > 0 and b.requests > 0


def _assert_stopped_unanswered(eng, out, needle: str, dt: float) -> None:
    s = eng.stats
    assert s.unavailable is not None and needle in s.unavailable, s.unavailable
    assert "nearly every request fails" in s.unavailable
    assert s.failed == 0 and s.fatal is None
    recs = read_results(out / "results.jsonl") if (out / "results.jsonl").exists() else []
    assert not [r for r in recs if r.get("error")]  # nothing recorded as failed: the resume asks them
    assert dt < 20, dt


def test_uniform_500s_stop_early_quoting_the_server(tmp_path):
    stub = Stub(faults={"500": 1.0}, fault_attempts=10**9)
    with StubThread(stub) as st:
        t0 = time.monotonic()
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=300, concurrency=16, retry=FAST,
                         error_breaker=ErrorBreaker(min_failures=20, min_seconds=0.5))
        dt = time.monotonic() - t0
    _assert_stopped_unanswered(eng, tmp_path, "HTTP 500: server error", dt)
    assert stub.requests < 900 * 9  # far fewer than 9 attempts a question


def test_garbage_replies_stop_early(tmp_path):
    stub = Stub(faults={"malformed": 1.0}, fault_attempts=10**9)
    with StubThread(stub) as st:
        t0 = time.monotonic()
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=300, concurrency=16, retry=FAST,
                         error_breaker=ErrorBreaker(min_failures=20, min_seconds=0.5))
        dt = time.monotonic() - t0
    _assert_stopped_unanswered(eng, tmp_path, "malformed JSON response", dt)


def test_a_hang_stops_early(tmp_path):
    stub = Stub(latency=3.0)  # every chat request hangs past the timeout; /health still answers
    with StubThread(stub) as st:
        t0 = time.monotonic()
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=100, concurrency=16, timeout=0.3, retry=FAST,
                         error_breaker=ErrorBreaker(min_failures=20, min_seconds=0.5))
        dt = time.monotonic() - t0
    _assert_stopped_unanswered(eng, tmp_path, "timeout", dt)


def test_no_healthy_endpoint_stops_with_exit_5_then_the_same_command_finishes(tmp_path, capsys):
    port = free_port()
    out = tmp_path / "o"
    argv = ["run", "--endpoint", f"http://127.0.0.1:{port}/v1", "--data", CUB_SIMILAR, "--out", out, "--quiet",
            "--mode", "text", "--limit", "800", "--concurrency", "8", "--unavailable-after", "1.5"]
    stub = Stub(latency=0.01)
    st = StubThread(stub, port=port).__enter__()
    timer = _kill_after(st, 0.8)
    t0 = time.monotonic()
    rc, _out, err = run_cli(capsys, *argv)
    dt = time.monotonic() - t0
    timer.join()
    assert rc == 5, err
    assert "no endpoint answered for 1.5 s" in err and f"127.0.0.1:{port}" in err, err
    assert dt < 15, dt
    manifest = orjson.loads((out / "run.json").read_bytes())
    assert manifest["status"] == "unavailable"
    first = read_results(out / "results.jsonl")
    assert first and not [r for r in first if r.get("error")]  # stopped questions are not failures
    assert len(first) < 4 * 800
    with StubThread(Stub(latency=0.001), port=port):  # the server is back: the same command finishes
        rc, _out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    recs = _answered_once(out, 800)
    assert len(recs) == 4 * 800  # every question exactly once (3 asked + the auto-filled leaf an item)


def test_all_questions_of_an_item_reach_one_endpoint(tmp_path):
    data = image_items(tmp_path, 40)
    stubs = [Stub() for _ in range(4)]
    for s in stubs:
        s.keep_bodies = True
    threads = [StubThread(s) for s in stubs]
    for t in threads:
        t.__enter__()
    try:
        eng = run_engine([t.url for t in threads], data, tmp_path / "o", mode="image", concurrency=16)
    finally:
        for t in threads:
            t.__exit__(None, None, None)
    assert eng.stats.failed == 0
    where: dict[str, set[int]] = defaultdict(set)
    for k, s in enumerate(stubs):
        for body in s.bodies:
            img = next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")
            where[img["image_url"]["url"]].add(k)
    assert len(where) == 40
    assert all(len(v) == 1 for v in where.values()), where.values()  # locality 100 %
    assert sum(s.requests > 0 for s in stubs) == 4  # and the items are spread over the endpoints


def test_rendezvous_moves_only_a_dead_endpoints_keys():
    async def main():
        c = Client([f"http://127.0.0.1:{p}/v1" for p in (1, 2, 3, 4)], None)
        before = {k: c.pick(k) for k in range(2000)}
        dead = c.endpoints[2]
        c._set_state(dead, "open")
        after = {k: c.pick(k) for k in range(2000)}
        moved = [k for k in before if before[k] is not after[k]]
        assert moved and all(before[k] is dead for k in moved)
        assert 350 < sum(e is dead for e in before.values()) < 650  # a fair share
    asyncio.run(main())


def test_data_parallel_rank_header_pins_an_item_to_one_engine():
    seen: dict[str, set[str]] = defaultdict(set)

    async def chat(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        seen[body["item"]].add(request.headers.get(RANK_HEADER, "none"))
        return web.json_response({"choices": []})

    async def main():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with Client([f"http://127.0.0.1:{port}/v1#dp=4"], None) as c:
                for item in range(50):
                    for _ in range(4):
                        await c.send("/chat/completions", {"item": str(item)}, key=f"img{item}.jpg")
                await c.send("/chat/completions", {"item": "nokey"})
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert seen.pop("nokey") == {"none"}  # no key: vLLM balances by load
    assert all(len(v) == 1 for v in seen.values())
    assert {next(iter(v)) for v in seen.values()} == {"0", "1", "2", "3"}
    assert redact_url("http://u:p@h:8000/v1#dp=4") == "http://h:8000/v1#dp=4"
