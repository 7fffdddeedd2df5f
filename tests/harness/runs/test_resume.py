"""Append-only results and resume: torn lines, SIGKILL at random moments, --retry-errors."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

from harness.runs.results import ResultStore, repair_tail
from harness.metrics.readers import summarize_results
from tests.support.engine_helpers import (
    CUB_RANDOM,
    CUB_SIMILAR,
    by_qid,
    cli_env,
    cub_text_questions,
    harness_cmd,
    read_results,
    run_cli,
    run_engine,
    stub_process,
)
from tests.support.stub_server import Stub, StubThread

# ------------------------------------------------------------------ repair_tail and scan


def _lines(*recs: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in recs)


def test_repair_tail_cuts_a_torn_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    good = _lines({"qid": "a", "error": None}, {"qid": "b", "error": None})
    p.write_bytes(good + b'{"qid": "c", "err')
    assert repair_tail(p) == len(b'{"qid": "c", "err')
    assert p.read_bytes() == good
    assert repair_tail(p) == 0 and p.read_bytes() == good  # idempotent


def test_repair_tail_edge_cases(tmp_path):
    p = tmp_path / "r.jsonl"
    assert repair_tail(p) == 0 and not p.exists()  # no file
    p.write_bytes(b"")
    assert repair_tail(p) == 0
    p.write_bytes(b'{"qid": "only-a-torn-line"')
    assert repair_tail(p) == len(b'{"qid": "only-a-torn-line"') and p.read_bytes() == b""
    # a torn line longer than the 64 KiB scan block
    good = _lines({"qid": "a"})
    torn = b'{"qid": "b", "raw": "' + b"x" * 200_000
    p.write_bytes(good + torn)
    assert repair_tail(p) == len(torn) and p.read_bytes() == good
    # a complete last line is kept even if it happens to be a bad record
    p.write_bytes(good + b"not json\n")
    assert repair_tail(p) == 0


def test_scan_skips_finished_and_optionally_failed(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_bytes(_lines({"qid": "a", "error": None}, {"qid": "b", "error": "gave up"},
                         {"qid": "c", "error": "image: missing"}, {"qid": "c", "error": None},
                         {"qid": "d", "error": None}) + b'{"qid": "e", "er')
    store = ResultStore(p)
    assert store.scan() == {"a", "b", "c", "d"}
    assert store.scan(retry_errors=True) == {"a", "c", "d"}  # c succeeded later
    assert p.read_bytes().endswith(b"\n")  # the torn line was cut


def test_store_appends_and_never_rewrites(tmp_path):
    p = tmp_path / "results.jsonl"
    p.write_bytes(_lines({"qid": "old"}))
    ino = p.stat().st_ino
    with ResultStore(p, flush_every=2) as s:
        for k in range(5):
            s.append({"qid": f"n{k}"})
    assert p.stat().st_ino == ino
    assert [r["qid"] for r in read_results(p)] == ["old", "n0", "n1", "n2", "n3", "n4"]


# ------------------------------------------------------------------ resume in-process


def test_resume_after_a_torn_line_asks_only_what_is_missing(tmp_path):
    stub = Stub()
    with StubThread(stub) as st:
        full = run_engine(st.url, CUB_SIMILAR, tmp_path / "full", limit=300)
        n_full = stub.requests
        p = tmp_path / "part" / "results.jsonl"
        p.parent.mkdir()
        data = (tmp_path / "full" / "results.jsonl").read_bytes()
        cut = data.index(b"\n", len(data) // 2) + 1
        p.write_bytes(data[:cut] + data[cut:cut + 40])  # half the lines, then a torn one
        kept = read_results_prefix(p)
        stub.requests = 0
        eng = run_engine(st.url, CUB_SIMILAR, tmp_path / "part", limit=300)
    assert full.stats.answered == 900 and 0 < stub.requests < n_full
    assert eng.stats.answered + eng.stats.auto + len(kept) == 1200
    a = by_qid(read_results(tmp_path / "full" / "results.jsonl"))
    b = by_qid(read_results(p))
    assert a.keys() == b.keys()
    assert all(a[k]["letter"] == b[k]["letter"] and a[k]["prediction"] == b[k]["prediction"] for k in a)
    assert p.read_bytes().startswith(data[:cut])  # appended after the cut, nothing rewritten


def read_results_prefix(p: Path) -> list[dict]:
    data = p.read_bytes()
    return [orjson.loads(x) for x in data[: data.rfind(b"\n") + 1].splitlines()]


# ------------------------------------------------------------------ SIGKILL at random moments


def _combined_items(tmp_path: Path) -> Path:
    """All 5,794 similar-choice CUB items and the first 1,000 random-choice ones: text mode asks
    3 x 6,794 = 20,382 questions (and auto-fills 6,794 leaves)."""
    f = tmp_path / "items.jsonl"
    rand = CUB_RANDOM.read_bytes().splitlines(keepends=True)[:1000]
    f.write_bytes(CUB_SIMILAR.read_bytes() + b"".join(rand))
    return f


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_results(tmp_path):
    data = _combined_items(tmp_path)
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    crash, clean = tmp_path / "crash", tmp_path / "clean"
    results = crash / "results.jsonl"
    with stub_process(latency=0.002) as url:
        cmd = lambda out: harness_cmd("run", "--endpoint", url, "--data", data, "--out", out,
                                      "--mode", "text", "--quiet", "--concurrency", "64")
        kills, torn, sizes = 0, 0, []
        for attempt in range(5):
            before = results.read_bytes() if results.exists() else b""
            if before:  # what a resume must keep: every complete line (the torn tail is cut)
                before = before[: before.rfind(b"\n") + 1]
            proc = subprocess.Popen(cmd(crash), env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if attempt < 4:  # kill at a random moment once this attempt has written something
                deadline = time.monotonic() + 60
                # wait for a new complete line: a torn tail left by the last kill makes the file
                # longer than `before` before this process has written anything
                while proc.poll() is None and time.monotonic() < deadline and \
                        (results.read_bytes().count(b"\n") if results.exists() else 0) <= before.count(b"\n"):
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 0.9))
            if attempt < 4 and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
            else:  # the last attempt runs to the end
                _, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err.decode()[-2000:]
            now = results.read_bytes() if results.exists() else b""
            assert now.startswith(before), f"seed {seed}: resume rewrote the file"
            torn += bool(now) and not now.endswith(b"\n")
            sizes.append(now.count(b"\n"))
            for line in now[: now.rfind(b"\n") + 1].splitlines():  # complete lines all parse
                orjson.loads(line)
            if proc.returncode == 0:
                break
        assert kills >= 3, f"seed {seed}: only {kills} kills landed (sizes {sizes})"
        # progress between kills (a kill may land after the last line: nothing is left for the next attempt)
        assert all(a < b or a == 4 * 6794 for a, b in itertools.pairwise(sizes)) and sizes[0] > 0, sizes
        r = subprocess.run(cmd(clean), check=False, env=cli_env(), capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()[-2000:]
    a = read_results(results)  # every line parses (the torn tails were cut on resume)
    b = read_results(clean / "results.jsonl")
    ra, rb = by_qid(a), by_qid(b)  # no qid twice
    assert len(ra) == len(rb) == 4 * 6794
    assert ra.keys() == rb.keys()
    assert sum(not r.get("auto") for r in a) == 20_382
    diff = [k for k in ra if (ra[k]["letter"], ra[k]["prediction"], ra[k]["error"])
            != (rb[k]["letter"], rb[k]["prediction"], rb[k]["error"])]
    assert not diff, f"seed {seed}: {len(diff)} answers differ, e.g. {ra[diff[0]]} vs {rb[diff[0]]}"
    assert all(r["error"] is None for r in a)
    sa, sb = summarize_results(results), summarize_results(clean / "results.jsonl")
    assert (sa.hca, sa.leaf_acc, sa.per_level, sa.n_questions) == (sb.hca, sb.leaf_acc, sb.per_level, sb.n_questions)
    m = json.loads((crash / "run.json").read_text())
    assert m["status"] == "done"
    print(f"seed {seed}: {kills} kills, {torn} torn tails, lines after each attempt {sizes}")


# ------------------------------------------------------------------ --retry-errors


def test_retry_errors_asks_only_the_failed_ones(tmp_path, capsys):
    faults = {"429": 0.1, "500": 0.1, "503": 0.05, "drop": 0.05, "malformed": 0.05}
    stub = Stub(faults=faults, fault_attempts=1)  # faults on the first attempt of a text only
    n = 400
    with StubThread(stub) as st:
        args = ["run", "--endpoint", st.url, "--data", CUB_SIMILAR, "--out", tmp_path / "o", "--mode", "text",
                "--limit", str(n), "--quiet", "--max-retries", "0"]
        rc, out, err = run_cli(capsys, *args)
        assert rc == 3, err  # questions failed: non-zero
        assert "--retry-errors" in err
        first = read_results(tmp_path / "o" / "results.jsonl")
        failed = {r["qid"] for r in first if r["error"]}
        assert len(failed) > 0.2 * 3 * n
        assert all(r["error"].startswith("gave up after retries") for r in first if r["error"])
        questions = {q.qid: q for q in cub_text_questions(CUB_SIMILAR, limit=n)}
        want_texts = {questions[q].text for q in failed}
        # the same command without --retry-errors asks nothing
        before = stub.requests
        rc, out, err = run_cli(capsys, *args)
        assert rc == 3 and stub.requests == before
        assert len(read_results(tmp_path / "o" / "results.jsonl")) == len(first)
        stub.by_text.clear()
        rc, out, err = run_cli(capsys, *args, "--retry-errors")
        assert rc == 0, err
        assert stub.requests - before == len(want_texts)  # only the failed ones, each text once
        assert set(stub.by_text) == want_texts
        clean = tmp_path / "clean"
        assert run_cli(capsys, "run", "--endpoint", st.url, "--data", CUB_SIMILAR, "--out", clean, "--mode", "text",
                       "--limit", str(n), "--quiet")[0] == 0
    recs = read_results(tmp_path / "o" / "results.jsonl")
    assert len(recs) == len(first) + len(failed)  # appended, not rewritten
    assert recs[: len(first)] == first
    latest = by_qid(recs, unique=False)
    assert all(latest[q]["error"] is None and latest[q]["letter"] == stub.answer(questions[q].text) for q in failed)
    s = summarize_results(tmp_path / "o" / "results.jsonl")
    c = summarize_results(clean / "results.jsonl")
    assert s.n_errors == 0 and s.n_questions == 3 * n == c.n_questions
    assert (s.hca, s.leaf_acc, s.per_level) == (c.hca, c.leaf_acc, c.per_level)
    rc, out, err = run_cli(capsys, "report", tmp_path / "o", "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["n_items"] == n and rep["hca"] == pytest.approx(c.hca)
    m = json.loads((tmp_path / "o" / "run.json").read_text())
    assert m["status"] == "done"


def test_resume_refuses_other_settings(tmp_path, capsys):
    with StubThread(Stub()) as st:
        base = ["run", "--endpoint", st.url, "--data", CUB_SIMILAR, "--out", tmp_path / "o", "--mode", "text",
                "--limit", "20", "--quiet"]
        assert run_cli(capsys, *base)[0] == 0
        rc, _out, err = run_cli(capsys, *base, "--max-tokens", "3")
        assert rc == 2 and "max_tokens" in err and "--force" in err
        h = hashlib.sha256((tmp_path / "o" / "results.jsonl").read_bytes()).hexdigest()
        assert run_cli(capsys, *base, "--concurrency", "3")[0] == 0  # transport settings may change
        assert hashlib.sha256((tmp_path / "o" / "results.jsonl").read_bytes()).hexdigest() == h
