"""The serving engine end to end against the loopback stub: answer modes, images, dedupe and cache,
several endpoints, --max-cost and --dry-run."""

from __future__ import annotations

import base64
import io
import re
from collections import defaultdict

import orjson
import pytest

from harness.engine.core import Group
from harness.tasks.hierarchy import ChatTask, Decoding
from harness.prompts.hierarchy import PromptConfig, Question
from tests.support.engine_helpers import (
    CUB_SIMILAR,
    by_qid,
    cub_lines,
    cub_text_questions,
    image_items,
    make_png,
    port_is_closed,
    read_results,
    run_cli,
    run_engine,
)
from tests.support.stub_server import Stub, StubThread, user_text


def _run(capsys, url, data, out, *extra):
    return run_cli(capsys, "run", "--endpoint", url, "--data", data, "--out", out, "--quiet", *extra)


def _manifest(out) -> dict:
    return orjson.loads((out / "run.json").read_bytes())


def _image_part(body: dict) -> dict:
    return next(p for p in body["messages"][-1]["content"] if p["type"] == "image_url")


# ------------------------------------------------------------------ answer modes

def _three_choice_items(tmp_path, n=20):
    """CUB items whose level-2 question offers 3 options (so `choice` must send A, B, C only)."""
    recs = cub_lines(n)
    for r in recs:
        truth = r["level2"]
        r["choices_level2"] = [truth] + [c for c in r["choices_level2"] if c != truth][:2]
    f = tmp_path / "three.jsonl"
    f.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    return f


def test_choice_sends_the_offered_letters(tmp_path, capsys):
    data = _three_choice_items(tmp_path)
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o", "--mode", "text", "--answer", "choice")
    assert rc == 0, err
    assert len(stub.bodies) == len(stub.by_text) > 40  # identical texts are asked once
    for b in stub.bodies:
        text = user_text(b)
        offered = ["A", "B", "C"] if "family" in text else ["A", "B", "C", "D"]
        assert b["structured_outputs"] == {"choice": offered}, (text, b["structured_outputs"])
        assert "logprobs" not in b
    recs = [r for r in read_results(tmp_path / "o" / "results.jsonl") if not r.get("auto")]
    assert len(recs) == 60 and all(r["error"] is None and r["letter"] in r["choices"] for r in recs)
    assert {len(r["choices"]) for r in recs if r["level"] == 2} == {3}


def test_logprobs_mode_sends_one_token_and_keeps_the_distribution(tmp_path, capsys):
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", "--mode", "text", "--answer", "logprobs",
                            "--limit", "30")
    assert rc == 0, err
    assert len(stub.bodies) == len({q.text for q in cub_text_questions(CUB_SIMILAR, limit=30)}) > 50
    for b in stub.bodies:
        assert b["max_tokens"] == 1 and b["logprobs"] is True and b["top_logprobs"] == 20
        assert "structured_outputs" not in b
    for r in read_results(tmp_path / "o" / "results.jsonl"):
        if r.get("auto"):
            continue
        lp = r["letter_logprobs"]
        assert set(lp) == set(r["choices"]) and "The" not in lp  # offered letters only
        assert r["letter"] == max(lp, key=lp.get) and lp[r["letter"]] == -0.1
        assert r["prediction"] == r["choices"][r["letter"]]


def test_logprobs_best_offered_letter_wins():
    task = ChatTask(PromptConfig(taxonomy="cub"), Decoding(model="m", answer="logprobs"))
    q = Question("q", "i", 1, 0, ("a", "b", "c"), "a", None, "t", None, True)
    top = [{"token": " E", "logprob": -0.01}, {"token": "The", "logprob": -0.2}, {"token": "(B", "logprob": -0.7},
           {"token": " A.", "logprob": -1.5}, {"token": "B", "logprob": -3.0}, {"token": "D", "logprob": -0.5}]
    resp = {"choices": [{"message": {"content": "E"}, "logprobs": {"content": [{"token": " E", "top_logprobs": top}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    ans = task.interpret(Group(q.qid, 1, q), 0, resp)
    assert ans["letter"] == "B" and ans["letter_logprobs"] == {"B": -0.7, "A": -1.5}  # D is not offered
    resp["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = top[:2]
    assert task.interpret(Group(q.qid, 1, q), 0, resp)["letter"] is None  # no offered letter among the top tokens: unanswered


def test_binary_mode_writes_one_line_per_option(tmp_path, capsys):
    data = image_items(tmp_path, 5)
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o", "--mode", "binary")
    assert rc == 0, err
    recs = read_results(tmp_path / "o" / "results.jsonl")
    by_qid(recs)
    assert len(recs) == 5 * 4 * 4 == len(stub.bodies)
    per_level = defaultdict(list)
    for r in recs:
        per_level[(r["item"], r["level"])].append(r["option"])
        assert r["yes"] in (0, 1) and r["error"] is None
    assert all(sorted(v) == ["A", "B", "C", "D"] for v in per_level.values())
    texts = {user_text(b) for b in stub.bodies}
    for r in recs:  # the statement of the option, answered as the stub answers it
        t = next(t for t in texts if f" {r['choices'][r['option']]}.\n" in t)
        assert r["yes"] == (stub.answer(t) == "Yes")


# ------------------------------------------------------------------ images

def test_images_encoded_once_per_item_and_sent_with_uuid(tmp_path, capsys):
    data = image_items(tmp_path, 30)
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        eng = run_engine(st.url, data, tmp_path / "e", mode="image", concurrency=8)
        assert eng.stats.images_encoded == 30 and eng.stats.items == 30 and eng.stats.answered == 120
        engine_bodies = list(stub.bodies)
        stub.bodies.clear()
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o", "--concurrency", "8")
    assert rc == 0, err
    assert _manifest(tmp_path / "o")["stats"]["images_encoded"] == 30
    assert "120 answered" in err and "30 images encoded for 30 items" in err
    for bodies in (engine_bodies, stub.bodies):
        assert len(bodies) == 120
        uuids = defaultdict(set)
        urls = defaultdict(set)
        pos = defaultdict(list)
        for k, b in enumerate(bodies):
            content = b["messages"][-1]["content"]
            assert [p["type"] for p in content] == ["image_url", "text"]  # image first
            part = content[0]
            assert part["image_url"]["url"].startswith("data:image/png;base64,")
            assert "detail" not in part["image_url"]
            item = part["image_url"]["url"]
            uuids[item].add(part["uuid"])
            urls[part["uuid"]].add(item)
            pos[part["uuid"]].append(k)
        assert len(uuids) == 30 and all(len(u) == 1 for u in uuids.values())  # one uuid an image, all levels
        assert all(len(u) == 1 for u in urls.values()) and len(urls) == 30
        assert all(len(p) == 4 for p in pos.values())
        # an item's questions are dispatched together: its 4 requests arrive within a short window
        assert max(max(p) - min(p) for p in pos.values()) <= 8 + 4, sorted(pos.values())
    recs = read_results(tmp_path / "o" / "results.jsonl")
    assert all(r["error"] is None and r["letter"] for r in recs)


def test_media_file_sends_file_urls(tmp_path, capsys):
    data = image_items(tmp_path, 4)
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o", "--media", "file")
    assert rc == 0, err
    assert len(stub.bodies) == 16
    for b in stub.bodies:
        part = _image_part(b)
        url = part["image_url"]["url"]
        assert url.startswith("file:///") and url.endswith(".png") and str(tmp_path) in url
        assert re.fullmatch(r"[0-9a-f]{24}", part["uuid"])
    assert _manifest(tmp_path / "o")["settings"]["media"] == "file"


def test_max_side_resizes(tmp_path, capsys):
    from PIL import Image

    data = image_items(tmp_path, 2, size=(100, 60))
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o", "--max-side", "32")
    assert rc == 0, err
    for b in stub.bodies:
        url = _image_part(b)["image_url"]["url"]
        head, b64 = url.split(",", 1)
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.size == (32, 19)
        assert head == "data:image/jpeg;base64"


@pytest.mark.parametrize("flags", [["--gpt-order"], ["--preset", "gpt-4o"]])
def test_gpt_order_puts_text_first_with_low_detail(tmp_path, capsys, flags):
    data = image_items(tmp_path, 3)
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o", *flags)
    assert rc == 0, err
    assert len(stub.bodies) == 12
    for b in stub.bodies:
        content = b["messages"][-1]["content"]
        assert [p["type"] for p in content] == ["text", "image_url"]
        assert content[1]["image_url"]["detail"] == "low"
        if flags[0] == "--preset":  # the reference GPT-4o decoding
            assert b["temperature"] == 0.2 and b["seed"] == 42 and b["max_tokens"] == 5
            assert b["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}


def test_missing_image_records_errors_and_the_run_goes_on(tmp_path, capsys):
    data = image_items(tmp_path, 6, missing=[2])
    stub = Stub()
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, data, tmp_path / "o")
    assert rc == 3, err  # questions left unanswered
    recs = read_results(tmp_path / "o" / "results.jsonl")
    assert len(recs) == 24 and stub.requests == 20
    bad = [r for r in recs if r["error"]]
    assert len(bad) == 4 and {r["item"] for r in bad} == {str(tmp_path / "img" / "0002.png")}
    assert all(r["error"].startswith("image: ") and "0002.png" in r["error"] for r in bad)
    assert all(r["letter"] for r in recs if not r["error"])
    assert _manifest(tmp_path / "o")["status"] == "incomplete"


def test_corrupt_image_records_errors(tmp_path):
    data = image_items(tmp_path, 3)
    (tmp_path / "img" / "0001.png").write_bytes(b"not a png")
    with StubThread(Stub()) as st:
        eng = run_engine(st.url, data, tmp_path / "e", mode="image")
    assert eng.stats.failed == 4 and eng.stats.answered == 8
    bad = [r for r in read_results(tmp_path / "e" / "results.jsonl") if r["error"]]
    assert all(r["error"].startswith("image: ") for r in bad) and len(bad) == 4


# ------------------------------------------------------------------ dedupe and cache

def test_text_mode_asks_identical_questions_once_and_the_cache_replays_them(tmp_path, capsys):
    n = 2000
    questions = cub_text_questions(CUB_SIMILAR, limit=n)
    distinct = {q.text for q in questions}
    assert len(distinct) < len(questions)  # the data has repeated prompts
    stub = Stub()
    with StubThread(stub) as st:
        args = ["--mode", "text", "--limit", str(n), "--cache", tmp_path / "cache"]
        rc, _out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o1", *args)
        assert rc == 0, err
        assert stub.requests == len(distinct) and set(stub.by_text) == distinct
        assert max(stub.by_text.values()) == 1
        rc, _out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o2", *args)
        assert rc == 0, err
        assert stub.requests == len(distinct)  # the second run sent nothing
    a = by_qid(read_results(tmp_path / "o1" / "results.jsonl"))
    b = by_qid(read_results(tmp_path / "o2" / "results.jsonl"))
    assert a.keys() == b.keys() and len(a) == 4 * n
    assert all(a[k]["letter"] == b[k]["letter"] and a[k]["prediction"] == b[k]["prediction"] for k in a)
    assert all(b[k].get("cached") for k in b if not b[k].get("auto"))
    assert _manifest(tmp_path / "o2")["stats"]["cached"] == len(questions)
    for k, q in ((q.qid, q) for q in questions):
        assert a[k]["letter"] == stub.answer(q.text)


def test_cache_key_ignores_endpoint_and_key_but_not_decoding(tmp_path, capsys, monkeypatch):
    stub = Stub()
    monkeypatch.setenv("K1", "key-one")
    with StubThread(stub) as st:
        base = ["--mode", "text", "--limit", "50", "--cache", tmp_path / "cache"]
        assert _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o1", *base)[0] == 0
        n1 = stub.requests
        url2 = st.url.replace("127.0.0.1", "localhost")
        assert _run(capsys, url2, CUB_SIMILAR, tmp_path / "o2", *base, "--api-key-env", "K1")[0] == 0
        assert stub.requests == n1
        assert _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o3", *base, "--max-tokens", "7")[0] == 0
        assert stub.requests == 2 * n1  # another decoding: another request


# ------------------------------------------------------------------ several endpoints, model resolution

def test_two_endpoints_share_the_load_and_the_model_is_resolved(tmp_path, capsys):
    s1, s2 = Stub(latency=0.002), Stub(latency=0.002)
    with StubThread(s1) as a, StubThread(s2) as b:
        rc, _out, err = _run(capsys, a.url, CUB_SIMILAR, tmp_path / "o", "--endpoint", b.url, "--mode", "text",
                            "--limit", "400")
    assert rc == 0, err
    total = s1.requests + s2.requests
    assert total == len({q.text for q in cub_text_questions(CUB_SIMILAR, limit=400)})
    assert min(s1.requests, s2.requests) >= 0.25 * total, (s1.requests, s2.requests)
    m = _manifest(tmp_path / "o")
    assert m["settings"]["model"] == "stub-model"  # --model omitted: the one served model
    assert m["endpoints"] == [a.url, b.url]
    recs = read_results(tmp_path / "o" / "results.jsonl")
    assert len(recs) == 1600 and all(r["error"] is None for r in recs)


def test_low_concurrency_still_uses_every_endpoint(tmp_path, capsys):
    s1, s2 = Stub(), Stub()
    with StubThread(s1) as a, StubThread(s2) as b:
        rc, _out, err = _run(capsys, a.url, CUB_SIMILAR, tmp_path / "o", "--endpoint", b.url, "--mode", "text",
                            "--limit", "50", "--concurrency", "1")
    assert rc == 0, err
    assert s1.requests > 30 and s2.requests > 30, (s1.requests, s2.requests)


def test_health_check_names_an_unreachable_endpoint(tmp_path, capsys):
    # issue 15: an unreachable endpoint among several is taken out (the run goes on with the others);
    # when none is reachable the run does not start and the message names them
    dead = f"http://127.0.0.1:{port_is_closed()}/v1"
    dead2 = f"http://127.0.0.1:{port_is_closed()}/v1"
    stub = Stub()
    with StubThread(stub) as a:
        rc, _out, err = _run(capsys, a.url, CUB_SIMILAR, tmp_path / "o", "--endpoint", dead, "--mode", "text",
                             "--limit", "20")
    assert rc == 0, err
    assert stub.requests > 0
    rc, _out, err = _run(capsys, dead2, CUB_SIMILAR, tmp_path / "o2", "--endpoint", dead, "--mode", "text")
    assert rc == 4 and "cannot reach" in err and dead in err and dead2 in err, err


def test_model_required_when_several_are_served(tmp_path, capsys, monkeypatch):
    from aiohttp import web

    stub = Stub()

    async def models(request):
        return web.json_response({"data": [{"id": "m-a"}, {"id": "m-b"}]})

    orig = stub.app

    def app():
        a = web.Application()
        a.router.add_get("/v1/models", models)
        a.router.add_get("/health", stub.health)
        a.router.add_post("/v1/chat/completions", stub.chat)
        return a

    monkeypatch.setattr(stub, "app", app)
    assert orig is not None
    with StubThread(stub) as st:
        rc, _out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", "--mode", "text")
    assert rc == 4 and "--model is required" in err and "m-a" in err and "m-b" in err, err


# ------------------------------------------------------------------ --max-cost and --dry-run

def test_max_cost_stops_cleanly(tmp_path, capsys):
    stub = Stub()
    with StubThread(stub) as st:
        args = ["--mode", "text", "--price-in", "1000000", "--price-out", "0", "--max-cost", "1000",
                "--concurrency", "4"]
        rc, _out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", *args)
        assert rc == 3, err
        assert "--max-cost" in err
        m = _manifest(tmp_path / "o")
        assert m["status"] == "stopped" and m["stats"]["cost"] >= 1000
        assert stub.requests < 100  # each answer costs ~$60 here
        recs = read_results(tmp_path / "o" / "results.jsonl")
        answered = [r for r in recs if not r.get("auto")]
        assert answered and all(r["error"] is None for r in answered)
        # the same command continues where it stopped (and stops again at the budget)
        n = len(answered)
        rc, _out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", *args)
        assert rc == 3
        recs2 = read_results(tmp_path / "o" / "results.jsonl")
        by_qid(recs2)
        assert len([r for r in recs2 if not r.get("auto")]) > n


def test_dry_run_sends_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    stub = Stub()
    with StubThread(stub) as st:
        rc, out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", "--mode", "text", "--dry-run",
                            "--model", "gpt-4o")
        assert rc == 0, err
        assert stub.requests == 0
        assert "17,382 questions" in out and "5,794 auto-filled" in out
        cost = float(re.search(r"estimated cost: \$([\d,.]+)", out).group(1).replace(",", ""))
        assert cost > 0
        assert not (tmp_path / "o" / "results.jsonl").exists()
        # without --model the health check resolves it; still no chat request
        rc, out, err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", "--mode", "text", "--dry-run")
        assert rc == 0 and stub.requests == 0 and "17,382 questions" in out and "stub-model" in out


def test_dry_run_after_a_partial_run_counts_what_is_left(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    with StubThread(Stub()) as st:
        assert _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", "--mode", "text", "--limit", "100")[0] == 0
        rc, out, _err = _run(capsys, st.url, CUB_SIMILAR, tmp_path / "o", "--mode", "text", "--limit", "100",
                            "--dry-run")
    assert rc == 0 and "0 questions to ask" in out and "400 already done" in out, out


def test_image_dry_run_counts_image_tokens(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    data = image_items(tmp_path, 5, size=(1024, 768))
    make_png(tmp_path / "img" / "0000.png", (1024, 768), 0)
    with StubThread(Stub()) as st:
        rc, out, err = _run(capsys, st.url, data, tmp_path / "o", "--dry-run", "--model", "gpt-4o")
    assert rc == 0, err
    m = re.search(r"images ([\d,]+)\)", out)
    assert m and int(m.group(1).replace(",", "")) == 20 * (85 + 170 * 4), out


def test_identical_requests_in_flight_are_asked_once(tmp_path):
    """Text-mode dedupe: questions with the same request body asked at the same time share one request
    (the second waits for the first's answer), and a failure reaches every waiter."""
    import asyncio

    from harness.engine.core import Engine, Group, Unit

    class Slow:
        def __init__(self, fail: bool):
            self.sent, self.fail = 0, fail

        async def send(self, path, body, key=None):
            self.sent += 1
            await asyncio.sleep(0.05)
            if self.fail:
                from harness.backends.http import FatalError

                raise FatalError("boom")
            return {"answer": body}

    class Echo:
        def request(self, group, i, image):
            return "/x", group.data

        def cache_key(self, group, i, image, body):
            return body

        def interpret(self, group, i, resp, head):
            return {"raw": resp["answer"]}

        def record(self, group, answers):
            return {"qid": group.qid, **answers[0]}

        def error_record(self, group, error):
            return {"qid": group.qid, "error": error}

    for fail in (False, True):
        backend, lines = Slow(fail), []
        eng = Engine(backend, Echo(), lines.append, concurrency=8, dedupe=True)
        units = [Unit(None, [Group(f"q{k}", 1, "same" if k < 5 else f"other{k}")]) for k in range(7)]
        stats = asyncio.run(eng.run(units))
        if not fail:
            assert backend.sent == 3 and stats.cached == 4 and len(lines) == 7
            assert sum(1 for x in lines if x.get("cached")) == 4
        else:
            assert stats.fatal == "boom" and backend.sent >= 1 and not lines
