"""OpenAI Batch API path against the loopback stub's /v1/files and /v1/batches."""

from __future__ import annotations

import orjson
import pytest

from harness.cli import main
from harness.paths import data_dir
from tests.support.stub_server import Stub, StubThread

CUB = str(data_dir("hierarchy") / "CUB200_with_similar_choice.jsonl")


def _lines(out):
    return [orjson.loads(x) for x in (out / "results.jsonl").read_bytes().splitlines()]


def _submit(url, out, *extra):
    return main(["batch", "submit", "--endpoint", url, "--model", "stub-model", "--data", CUB, "--out", str(out),
                 "--mode", "text", "--limit", "50", "--api-key-env", "HARNESS_BATCH_KEY", *extra])


def test_submit_collect_equals_online_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_BATCH_KEY", "sk-batch-secret-42")
    with StubThread(Stub(api_key="sk-batch-secret-42")) as s:
        assert _submit(s.url, tmp_path / "b") == 0
        batches = orjson.loads((tmp_path / "b" / "batches.json").read_bytes())
        assert len(batches) == 1 and batches[0]["n"] == 150  # 50 items x 3 asked levels (leaf auto-filled)
        assert main(["batch", "collect", str(tmp_path / "b")]) == 0
        # the same run online gives the same letter for every question
        assert main(["run", "--endpoint", s.url, "--model", "stub-model", "--data", CUB, "--out", str(tmp_path / "o"),
                     "--mode", "text", "--limit", "50", "--api-key-env", "HARNESS_BATCH_KEY", "--quiet"]) == 0
    batch = {x["qid"]: x for x in _lines(tmp_path / "b")}
    online = {x["qid"]: x for x in _lines(tmp_path / "o")}
    assert len(batch) == 200 and batch.keys() == online.keys()
    assert all(batch[q]["letter"] == online[q]["letter"] for q in batch)
    assert sum(1 for x in batch.values() if x.get("batch")) == 150
    summary = orjson.loads((tmp_path / "b" / "summary.json").read_bytes())
    assert summary["n_items"] == 50
    for f in (tmp_path / "b").rglob("*"):
        if f.is_file():
            assert b"sk-batch-secret-42" not in f.read_bytes(), f


def test_failed_lines_are_recorded_and_resubmitted(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_BATCH_KEY", "k")
    stub = Stub(faults={"500": 0.2}, fault_attempts=1)
    with StubThread(stub) as s:
        out = tmp_path / "b"
        assert _submit(s.url, out) == 0
        assert main(["batch", "collect", str(out)]) == 0
        failed = [x for x in _lines(out) if x["error"]]
        assert 10 < len(failed) < 60 and all(x["error"].startswith("batch:") for x in failed)
        # a second submit with --retry-errors sends only the failed questions
        assert _submit(s.url, out, "--retry-errors") == 0
        batches = orjson.loads((out / "batches.json").read_bytes())
        assert batches[-1]["n"] == len(failed)
        assert main(["batch", "collect", str(out)]) == 0
    latest = {x["qid"]: x for x in _lines(out)}
    assert all(x["error"] is None for x in latest.values())


def test_pending_batch_is_not_resubmitted(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_BATCH_KEY", "k")
    stub = Stub()
    stub.batch_status = "in_progress"
    with StubThread(stub) as s:
        out = tmp_path / "b"
        assert _submit(s.url, out) == 0
        assert main(["batch", "collect", str(out)]) == 3  # still running
        assert _submit(s.url, out) == 0  # nothing new to send
        assert len(orjson.loads((out / "batches.json").read_bytes())) == 1


def test_dry_run_uploads_nothing(tmp_path, capsys):
    stub = Stub()
    with StubThread(stub) as s:
        assert _submit(s.url, tmp_path / "b", "--dry-run") == 0
        assert stub.files == {}
    assert "150 requests" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["--endpoint", "--model"])
def test_submit_needs_endpoint_and_model(tmp_path, missing):
    argv = ["batch", "submit", "--endpoint", "http://x", "--model", "m", "--data", CUB, "--out", str(tmp_path)]
    i = argv.index(missing)
    del argv[i:i + 2]
    assert main(argv) == 2


def test_batch_submit_refuses_a_folder_another_writer_holds(tmp_path, capsys):
    from harness.runs.folder import ExitCode, RunFolder

    folder = RunFolder(tmp_path / "b")
    folder.prepare()
    with folder.lock():  # a `harness run` writing this folder
        rc = main(["batch", "submit", "--endpoint", "http://127.0.0.1:9", "--model", "m", "--data", CUB,
                   "--out", str(tmp_path / "b"), "--mode", "text", "--limit", "3"])
    assert rc == ExitCode.LOCKED and "is being written by another run" in capsys.readouterr().out
