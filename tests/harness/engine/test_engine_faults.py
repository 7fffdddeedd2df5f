"""The engine under injected faults (429 + Retry-After, 5xx, dropped connections, timeouts,
malformed and empty responses) and fatal errors (bad key, unknown model, unsupported field)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from aiohttp import web

from harness.backends.http import Client, FatalError, RetryableError, RetryPolicy, _retry_after, classify
from tests.support.engine_helpers import (
    CUB_SIMILAR,
    by_qid,
    cub_text_questions,
    expected_outcome,
    read_results,
    run_cli,
    run_engine,
)
from tests.support.stub_server import Stub, StubThread

FAULTS = {"429": 0.08, "500": 0.05, "503": 0.05, "drop": 0.05, "slow": 0.02, "malformed": 0.05, "empty": 0.05}
N_ITEMS = 700  # CUB text mode: 3 asked questions an item -> 2,100 questions
FAST = RetryPolicy(max_retries=8, base=0.005, cap=0.05)

REASONS = {"429": "HTTP 429", "500": "HTTP 500", "503": "HTTP 503", "drop": "connection error",
           "slow": "timeout", "malformed": "malformed"}


def _check_outcomes(stub: Stub, recs: list[dict], questions, max_retries: int) -> dict[str, int]:
    got = by_qid(recs)  # no qid twice
    kinds = {"answer": 0, "empty": 0, "failed": 0}
    n_text = Counter(q.text for q in questions)
    for q in questions:
        r = got[q.qid]
        kind, value = expected_outcome(stub, q.text, max_retries)
        if n_text[q.text] > 1 and max_retries == 0:
            # a failure is not memoised: a later question with the same text asks again and meets the
            # stub's next scheduled fault (or none), so only the two possible outcomes are checked
            assert r["error"] is None and r["letter"] == stub.answer(q.text) or r["error"].startswith("gave up"), r
            continue
        kinds[kind] += 1
        if kind == "answer":
            assert r["error"] is None and r["letter"] == value, (r, value)
            assert r["prediction"] == q.choices[value]
        elif kind == "empty":  # empty twice: the engine asks once more, then keeps the empty answer
            assert r["error"] is None and r["raw"] == "" and r["letter"] is None, r
        else:
            assert r["letter"] is None and r["prediction"] is None, r
            assert r["error"].startswith("gave up after retries: ") and REASONS[value] in r["error"], (r, value)
    return kinds


def test_every_fault_kind_is_survived(tmp_path):
    stub = Stub(faults=FAULTS, fault_attempts=2, slow_seconds=4.0)
    with StubThread(stub) as st:
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=N_ITEMS, concurrency=48, timeout=1.5, retry=FAST)
    questions = cub_text_questions(CUB_SIMILAR, limit=N_ITEMS)
    assert len(questions) == 3 * N_ITEMS
    recs = read_results(tmp_path / "results.jsonl")  # every line parses
    assert len(recs) == 4 * N_ITEMS  # + the auto-filled leaves
    kinds = _check_outcomes(stub, recs, questions, max_retries=8)
    assert kinds["failed"] == 0 and kinds["answer"] > 0.99 * len(questions)
    assert set(stub.faults_sent) == set(FAULTS), stub.faults_sent  # the stub saw each fault kind
    assert min(stub.faults_sent.values()) >= 5, stub.faults_sent
    s = eng.stats
    assert s.answered == len(questions) and s.failed == 0 and s.fatal is None
    assert s.retried >= sum(stub.faults_sent.values()) - stub.faults_sent["empty"]
    # each distinct text was sent once plus once per injected fault (identical texts are asked once);
    # on a loaded machine a healthy reply can also miss the timeout and be retried, so only ">=" holds
    assert set(stub.by_text) == {q.text for q in questions}
    expected = {t: expected_outcome(stub, t, 8, attempts=True)[2] for t in stub.by_text}
    assert all(stub.by_text[t] >= n for t, n in expected.items())
    assert sum(stub.by_text.values()) - sum(expected.values()) <= 0.02 * len(expected)


def test_retries_exhausted_are_recorded_with_a_reason(tmp_path):
    stub = Stub(faults=FAULTS, fault_attempts=2, slow_seconds=4.0)
    with StubThread(stub) as st:
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=N_ITEMS, concurrency=48, timeout=1.5,
                         retry=RetryPolicy(max_retries=0, base=0.005, cap=0.05))
    questions = cub_text_questions(CUB_SIMILAR, limit=N_ITEMS)
    recs = read_results(tmp_path / "results.jsonl")
    kinds = _check_outcomes(stub, recs, questions, max_retries=0)
    assert kinds["failed"] > 0.2 * len(questions)  # ~30% of first attempts fail
    n_err = sum(r["error"] is not None for r in recs)
    assert n_err >= kinds["failed"] and eng.stats.failed == n_err and eng.stats.fatal is None
    assert eng.stats.answered + eng.stats.failed == len(questions)
    reasons = {r["error"].split(": ", 1)[1].split(":")[0] for r in recs if r["error"]}
    assert {"HTTP 429", "HTTP 500", "HTTP 503", "timeout", "malformed JSON response"} <= reasons | {
        x for x in reasons if x.startswith("connection")}, reasons
    assert any(x.startswith("connection error") for x in reasons), reasons


# ------------------------------------------------------------------ retry policy and classification

def test_retry_after_is_honoured_and_backoff_is_jittered():
    p = RetryPolicy(max_retries=5, base=0.5, cap=60)
    assert all(p.delay(0, 7.0) >= 7.0 for _ in range(50))  # Retry-After is a floor
    ds = [p.delay(3, None) for _ in range(200)]
    assert all(0 <= d <= 4.0 for d in ds) and len(set(ds)) > 150  # full jitter up to base * 2**3
    assert max(p.delay(20, None) for _ in range(50)) <= 60  # capped
    assert _retry_after({"Retry-After": "2.5"}) == 2.5
    assert _retry_after({"retry-after-ms": "250"}) == 0.25
    assert 50 < _retry_after({"Retry-After": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                          time.gmtime(time.time() + 60))}) <= 61
    assert _retry_after({}) is None


@pytest.mark.parametrize("status,message,kind,needle", [
    (429, "rate limited", RetryableError, "429"),
    (500, "boom", RetryableError, "500"),
    (503, "busy", RetryableError, "503"),
    (408, "request timeout", RetryableError, "408"),
    (401, "invalid api key", FatalError, "API key"),
    (403, "forbidden", FatalError, "API key"),
    (404, "The model `x` does not exist.", FatalError, "/v1/models"),
    (400, "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens", FatalError, "--max-side"),
    (400, "Unrecognized request argument supplied: structured_outputs", FatalError, "--answer logprobs"),
    (400, "Extra inputs are not permitted", FatalError, "--answer logprobs"),
    (400, "max_logprobs exceeded: requested 20 logprobs", FatalError, "--max-logprobs"),
])
def test_classify(status, message, kind, needle):
    import orjson

    e = classify(status, orjson.dumps({"error": {"message": message}}), {})
    assert isinstance(e, kind) and needle in str(e), str(e)


def test_retry_after_header_delays_the_retry(tmp_path):
    """A 429 with Retry-After: 0.4 is retried no sooner than 0.4 s later, even with a tiny base."""
    arrivals: list[float] = []

    async def chat(request):
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0.4"})
        return web.json_response({"choices": [{"message": {"content": "A"}}], "usage": {}})

    async def main():
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with Client([f"http://127.0.0.1:{port}"], None, timeout=5) as c:
                from harness.engine.core import Engine, Group

                class Raw:  # the reply itself is the answer
                    def request(self, group, i, image):
                        return "/chat/completions", b"{}"

                    def interpret(self, group, i, resp, head):
                        return resp

                eng = Engine(c, Raw(), lambda rec: None, retry=RetryPolicy(max_retries=3, base=0.001, cap=1.0))
                return await eng.ask(Group("q"), 0, None)
        finally:
            await runner.cleanup()

    import asyncio

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    resp = asyncio.run(main())
    assert resp["choices"][0]["message"]["content"] == "A"
    assert len(arrivals) == 2 and arrivals[1] - arrivals[0] >= 0.39


# ------------------------------------------------------------------ fatal errors stop the run early

def _cub_text_args(url, out, *extra):
    return ["run", "--endpoint", url, "--data", CUB_SIMILAR, "--out", out, "--mode", "text", "--quiet",
            "--max-retries", "1", *extra]


def test_wrong_api_key_exits_4_naming_the_variable_not_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_TEST_KEY", "sk-test-WRONG-000111222333")
    stub = Stub(api_key="sk-test-RIGHT-999888777")
    t0 = time.monotonic()
    with StubThread(stub) as st:
        rc, out, err = run_cli(capsys, *_cub_text_args(st.url, tmp_path / "o", "--api-key-env", "HARNESS_TEST_KEY"))
    assert rc == 4, (out, err)
    assert time.monotonic() - t0 < 10
    assert "HARNESS_TEST_KEY" in err and "401" in err, err
    assert "WRONG-000111222333" not in out + err and "RIGHT" not in out + err
    assert stub.requests == 0  # the health check stopped it before any question


def test_unset_api_key_variable_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HARNESS_TEST_KEY", raising=False)
    with StubThread(Stub(api_key="sk-test-RIGHT-999888777")) as st:
        rc, _out, err = run_cli(capsys, *_cub_text_args(st.url, tmp_path / "o", "--api-key-env", "HARNESS_TEST_KEY"))
    assert rc == 4 and "HARNESS_TEST_KEY" in err and "not set" in err, err


def test_401_mid_run_stops_the_engine(tmp_path):
    """The key is rejected at /chat/completions (no health check in between): fatal, few requests."""
    stub = Stub(api_key="sk-test-RIGHT-999888777")
    with StubThread(stub) as st:
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, api_key="sk-test-WRONG-000111222333", concurrency=16)
    assert eng.stats.fatal and "401" in eng.stats.fatal and "WRONG" not in eng.stats.fatal
    assert eng.stats.answered == 0 and eng.stats.failed == 0
    recs = read_results(tmp_path / "results.jsonl")
    assert all(r.get("auto") for r in recs)  # nothing was recorded as a failed question
    assert len(recs) < 200  # the producer stopped too


def test_unknown_model_lists_served_models(tmp_path, capsys):
    stub = Stub(model="served-model-7b")
    with StubThread(stub) as st:
        rc, _out, err = run_cli(capsys, *_cub_text_args(st.url, tmp_path / "o", "--model", "no-such-model"))
    assert rc == 4, err
    assert "no-such-model" in err and "served-model-7b" in err
    assert stub.requests == 0


def test_404_model_mid_run_is_fatal(tmp_path):
    stub = Stub(model="served-model-7b")
    with StubThread(stub) as st:
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, model="no-such-model", concurrency=16)
    assert eng.stats.fatal and "404" in eng.stats.fatal and "/v1/models" in eng.stats.fatal
    assert stub.requests <= 64


def test_choice_without_structured_outputs_suggests_logprobs(tmp_path, capsys):
    stub = Stub(capabilities=("logprobs",))  # e.g. the OpenAI API
    t0 = time.monotonic()
    with StubThread(stub) as st:
        rc, out, err = run_cli(capsys, *_cub_text_args(st.url, tmp_path / "o", "--answer", "choice",
                                                       "--concurrency", "32"))
    assert rc == 4, (out, err)
    assert "--answer logprobs" in err and "structured_outputs" in err, err
    assert stub.requests <= 100, stub.requests  # stopped early: not 17,382
    assert time.monotonic() - t0 < 15
    import orjson

    m = orjson.loads((tmp_path / "o" / "run.json").read_bytes())
    assert m["status"] == "fatal" and "structured_outputs" in m["stats"]["fatal"]


@pytest.mark.parametrize("answer", ["choice", "logprobs"])
def test_constrained_answer_modes_survive_faults(tmp_path, answer):
    """An empty completion is a transient fault in every mode, not proof that the endpoint ignores
    structured_outputs (it used to stop a `--answer choice` run)."""
    stub = Stub(faults=FAULTS, fault_attempts=2, slow_seconds=4.0)
    with StubThread(stub) as st:
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=200, answer=answer, concurrency=48, timeout=1.5,
                         retry=FAST)
    assert eng.stats.fatal is None and eng.stats.failed == 0
    assert stub.faults_sent["empty"] > 0
    questions = cub_text_questions(CUB_SIMILAR, limit=200, answer=answer)
    got = by_qid(read_results(tmp_path / "results.jsonl"))
    for q in questions:
        r = got[q.qid]
        kind, value = expected_outcome(stub, q.text, 8)
        if answer == "logprobs":  # one token and its distribution: an empty text still has log-probs
            assert r["letter"] == stub.answer(q.text) and r["letter_logprobs"], r
        elif kind == "answer":
            assert r["letter"] == value, r
        else:
            assert kind == "empty" and r["letter"] is None and r["raw"] == "", r


def test_cli_timeout_is_per_request(tmp_path, capsys):
    """`--timeout 0.3` cuts a 6 s reply; with --max-retries 0 the questions are recorded as timeouts."""
    stub = Stub(faults={"slow": 1.0}, fault_attempts=1, slow_seconds=6.0)
    t0 = time.monotonic()
    with StubThread(stub) as st:
        rc, _out, err = run_cli(capsys, "run", "--endpoint", st.url, "--data", CUB_SIMILAR, "--out", tmp_path / "o",
                               "--mode", "text", "--limit", "4", "--quiet", "--timeout", "0.3", "--max-retries", "0")
        assert time.monotonic() - t0 < 5.0  # did not wait for the 6 s replies
    assert rc == 3, err
    recs = [r for r in read_results(tmp_path / "o" / "results.jsonl") if not r.get("auto")]
    assert len(recs) == 12 and all(r["error"] == "gave up after retries: timeout" for r in recs)


def test_reply_without_choices_is_retried(tmp_path):
    """Valid JSON without `choices` is a malformed reply: retried like a 503, then answered."""
    from aiohttp import web

    calls = {"n": 0}
    stub = Stub()
    real_chat = stub.chat

    async def chat(request):
        calls["n"] += 1
        if calls["n"] == 1:
            await request.read()
            return web.json_response({"id": "x", "object": "chat.completion"})
        return await real_chat(request)

    stub.chat = chat
    with StubThread(stub) as st:
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path, limit=1, concurrency=1, timeout=5, retry=FAST)
    assert eng.stats.failed == 0 and eng.stats.retried >= 1
    recs = [r for r in read_results(tmp_path / "results.jsonl") if not r.get("auto")]
    assert len(recs) == 3 and all(r["error"] is None and r["letter"] for r in recs)
