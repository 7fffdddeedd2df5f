"""Runs that split and cannot collide (issue 15 part 2), with real `harness run` processes against a
stub server process: the folder lock (a second writer refuses naming the holder; a lock left by SIGKILL
is stale), `--shard I/N` (concurrent shards equal one run line for line, and `harness report` reads the
folder as one run), SIGTERM / SIGINT (a clean stop, `interrupted`, the same command resumes: every
question exactly once)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest

import harness
from harness.data.items import read_items
from harness.engine.core import Group, Unit
from harness.runs.execute import item_key, shard_of, shard_units
from harness.runs.folder import ExitCode, RunFolder, RunLocked
from tests.support.engine_helpers import by_qid, cli_env, harness_cmd, image_items, read_results, run_cli, stub_process
from tests.support.stub_server import Stub, StubThread

N_ITEMS = 24  # image mode: 4 questions an item


def _lines(folder: Path) -> dict[str, dict]:
    """Every result line of every results file of a folder, by qid (a qid twice fails), timing dropped."""
    out: dict[str, dict] = {}
    for f in sorted(folder.glob("results*.jsonl")):
        for qid, r in by_qid(read_results(f)).items():
            assert qid not in out, f"{qid} in two results files"
            r.pop("latency", None)
            out[qid] = r
    return out


def _wait_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path}: fewer than {n} lines while the run was alive (rc {proc.poll()})")


def _cmd(url: str, data: Path, out: Path, *extra) -> list[str]:
    return harness_cmd("run", "--endpoint", url, "--data", data, "--out", out, "--quiet", "--concurrency", "4",
                       "--max-retries", "0", *extra)


@pytest.fixture()
def data(tmp_path):
    return image_items(tmp_path, N_ITEMS)


# ------------------------------------------------------------------ locks


def test_second_writer_refuses_naming_the_holder_and_a_sigkilled_lock_is_stale(tmp_path, data):
    out = tmp_path / "o"
    with stub_process(latency=0.25) as url:
        first = subprocess.Popen(_cmd(url, data, out), env=cli_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
        _wait_lines(out / "results.jsonl", 4, first)
        t0 = time.monotonic()
        second = subprocess.run(_cmd(url, data, out), env=cli_env(), capture_output=True, timeout=60)
        err = second.stderr.decode()
        assert second.returncode == ExitCode.LOCKED == 6, err
        assert time.monotonic() - t0 < 15  # at once, not after the other run
        assert f"pid {first.pid} on " in err and "started 20" in err and "--out" in err, err
        assert first.poll() is None  # the holder runs on
        before = read_results(out / "results.jsonl")
        # SIGKILL: no clean-up at all; the kernel drops the flock, the lock file still names the holder
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert str(first.pid).encode() in (out / ".lock").read_bytes()
        third = subprocess.run(_cmd(url, data, out), env=cli_env(), capture_output=True, timeout=120)
        err = third.stderr.decode()
        assert third.returncode == 0, err
        assert f"pid {first.pid}" in err and "without releasing its lock" in err, err
    assert (out / ".lock").read_bytes() == b""  # released cleanly this time
    lines = _lines(out)
    assert len(lines) == 4 * N_ITEMS and all(r["error"] is None for r in lines.values())
    assert all(lines[r["qid"]]["letter"] == r["letter"] for r in before)  # kept, not asked again
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_lock_layouts_in_process(tmp_path):
    """One writer per results file; shards of one N coexist; other layouts refuse."""
    (tmp_path / "f").mkdir()
    with RunFolder(tmp_path / "f").lock():
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}"):
            RunFolder(tmp_path / "f").lock().acquire()  # another open file description: refused
        with pytest.raises(RunLocked, match="an unsharded run is writing"):
            RunFolder(tmp_path / "f", "0/2").lock().acquire()
    with RunFolder(tmp_path / "f", "0/2").lock(), RunFolder(tmp_path / "f", "1/2").lock():
        with pytest.raises(RunLocked, match="shard 0/2 of this run folder"):
            RunFolder(tmp_path / "f", "0/2").lock().acquire()
        with pytest.raises(RunLocked, match=r"shard [01]/2 is writing"):
            RunFolder(tmp_path / "f").lock().acquire()
        with pytest.raises(RunLocked, match="same --shard N"):
            RunFolder(tmp_path / "f", "2/3").lock().acquire()
    with RunFolder(tmp_path / "f").lock() as lk:  # all released
        assert lk.stale is None


# ------------------------------------------------------------------ shards


def test_shard_flag_is_validated(tmp_path, capsys, data):
    for bad in ("3/3", "1", "a/2", "-1/2"):
        rc, _out, err = run_cli(capsys, "run", "--endpoint", "http://127.0.0.1:9/v1", "--data", data,
                                "--out", tmp_path / "o", f"--shard={bad}")
        assert rc == 2 and "--shard" in err and "0 <= I < N" in err, err
    assert not (tmp_path / "o").exists()


def test_an_item_keeps_its_shard_when_the_file_grows(tmp_path):
    lines = (Path(image_items(tmp_path, 40)).read_bytes()).splitlines(keepends=True)
    grown = tmp_path / "grown.jsonl"
    grown.write_bytes(b"".join(lines[20:]) + b"".join(lines[:20]))  # other line numbers, more items

    def shards(path):
        units = (Unit(it.image, [Group(f"q{it.id}", 1, type("Q", (), {"item_id": it.id})())]) for it in read_items(path))
        return {item_key(u): shard_of(item_key(u), 3) for u in units}

    a, b = shards(tmp_path / "items.jsonl"), shards(grown)
    assert a == b and set(a.values()) == {0, 1, 2}
    units = [Unit(None, [Group(k, 1, type("Q", (), {"item_id": k})())]) for k in a]
    parts = [list(shard_units(units, (i, 3))) for i in range(3)]
    assert sorted(item_key(u) for p in parts for u in p) == sorted(a)  # a partition


def test_concurrent_shards_equal_one_run_and_report_reads_them_as_one(tmp_path, data, capsys):
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    with stub_process(latency=0.05) as url:
        r = subprocess.run(_cmd(url, data, one), env=cli_env(), capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        procs = [subprocess.Popen(_cmd(url, data, sharded, "--shard", f"{i}/3"), env=cli_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(3)]
        errs = [p.communicate(timeout=120)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errs
    files = sorted(f.name for f in sharded.glob("results*.jsonl"))
    assert files == [f"results.shard-{i}-of-3.jsonl" for i in range(3)]
    items_per_shard = [{r["item"] for r in read_results(sharded / f)} for f in files]
    assert all(items_per_shard) and sum(map(len, items_per_shard)) == N_ITEMS  # each item in one shard only
    assert _lines(sharded) == _lines(one)  # line for line, timing aside
    # the report of the folder is the report of the unsharded run
    reports = []
    for folder in (one, sharded):
        rc, out, err = run_cli(capsys, "report", folder, "--json")
        assert rc == 0, err
        reports.append({k: v for k, v in json.loads(out).items() if k != "run"})
    assert reports[0] == reports[1] and reports[0]["n_items"] == N_ITEMS
    api = [{k: v for k, v in x.items() if k != "run"} for x in harness.report([one, sharded])]
    assert api[0] == api[1] and api[0]["hca"] == reports[0]["hca"]
    assert json.loads((sharded / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
    # run.json: the whole run (spec without shard, every shard's status); one manifest per shard
    m = json.loads((sharded / "run.json").read_text())
    assert m["status"] == "done" and m["spec"]["shard"] is None and sorted(m["shards"]) == ["0/3", "1/3", "2/3"]
    assert all(s["status"] == "done" for s in m["shards"].values())
    for i in range(3):
        sm = json.loads((sharded / f"run.shard-{i}-of-3.json").read_text())
        assert sm["shard"] == f"{i}/3" and sm["spec"]["shard"] == f"{i}/3" and sm["status"] == "done"
    assert m["settings"] == json.loads((one / "run.json").read_text())["settings"]


def test_shards_check_settings_and_continue_an_unsharded_run(tmp_path, capsys):
    """The fingerprint check applies across shards; a shard skips what any results file holds."""
    data = image_items(tmp_path, 12)
    out = tmp_path / "o"
    with StubThread(Stub()) as st:
        base = ["run", "--endpoint", st.url, "--data", data, "--out", out, "--quiet"]
        assert run_cli(capsys, *base, "--limit", "6")[0] == 0  # half the items, unsharded
        rc, _o, err = run_cli(capsys, *base, "--shard", "0/2", "--max-tokens", "3")
        assert rc == 2 and "max_tokens" in err, err
        for i in range(2):
            rc, _o, err = run_cli(capsys, *base, "--shard", f"{i}/2")
            assert rc == 0, err
        rc, _o, err = run_cli(capsys, "run", "--endpoint", st.url, "--data", data, "--out", tmp_path / "clean",
                              "--quiet")
        assert rc == 0, err
    assert _lines(out) == _lines(tmp_path / "clean")  # nothing asked twice, nothing missing
    assert harness.report(out)[0]["n_items"] == 12


def test_classification_and_wikiqa_shards_report_as_one_run(tmp_path):
    from PIL import Image

    classes = ["bird", "cat", "dog", "fish"]
    (tmp_path / "img").mkdir()
    with (tmp_path / "items.jsonl").open("w") as f:
        for i in range(12):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": str(tmp_path / "img" / f"{i}.png"), "label": classes[i % 4],
                                "split": "test"}) + "\n")
    (tmp_path / "classes.json").write_text(json.dumps(classes))
    tasks = {"classify": {"kind": "classify", "classes": str(tmp_path / "classes.json"), "task": "closed", "k": 3},
             "wikiqa": {"kind": "wikiqa", "control": "classname"}}  # text only
    with StubThread(Stub()) as st:
        for name, task in tasks.items():
            base = {"backend": {"endpoints": [st.url], "api_key_env": "HARNESS_TEST_NO_KEY", "concurrency": 4},
                    "task": task} | ({"data": str(tmp_path / "items.jsonl")} if name == "classify" else {"limit": 12})
            assert harness.run(base | {"out": str(tmp_path / name)}).exit_code == 0
            for i in range(2):
                r = harness.run(base | {"out": str(tmp_path / f"{name}-sh"), "shard": f"{i}/2"})
                assert r.exit_code == 0, r.message
            assert _lines(tmp_path / f"{name}-sh") == _lines(tmp_path / name)
            assert len(list((tmp_path / f"{name}-sh").glob("results.shard-*"))) == 2
            a, b = harness.report([tmp_path / name, tmp_path / f"{name}-sh"])
            a.pop("run"), b.pop("run")
            assert a == b and a["kind"] == name
            assert json.loads((tmp_path / f"{name}-sh" / "summary.json").read_text()) == \
                json.loads((tmp_path / name / "summary.json").read_text())


# ------------------------------------------------------------------ SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_cleanly_and_the_same_command_resumes(tmp_path, data, sig):
    out = tmp_path / "o"
    with stub_process(latency=0.25) as url:
        cmd = _cmd(url, data, out)
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_lines(out / "results.jsonl", 8, proc)
        proc.send_signal(sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        err = err.decode()
        assert proc.returncode == ExitCode.INTERRUPTED == 7, err
        assert time.monotonic() - t0 < 10, "in-flight answers only, not the rest of the run"
        assert f"interrupted by {sig.name}" in err and "same command" in err, err
        m = json.loads((out / "run.json").read_text())
        assert m["status"] == "interrupted" and m["stats"]["stopped"] == f"interrupted by {sig.name}"
        kept = read_results(out / "results.jsonl")  # every line complete (no torn tail)
        assert 8 <= len(kept) < 4 * N_ITEMS and all(r["error"] is None for r in kept)
        assert m["stats"]["answered"] == len(kept)  # every answer given was written, none dropped
        assert (out / ".lock").read_bytes() == b""  # released
        again = subprocess.run(cmd, env=cli_env(), capture_output=True, timeout=120)
        assert again.returncode == 0, again.stderr.decode()
    final = read_results(out / "results.jsonl")
    assert final[: len(kept)] == kept  # appended to, never rewritten
    assert len(by_qid(final)) == len(final) == 4 * N_ITEMS  # every question exactly once
    assert json.loads((out / "run.json").read_text())["status"] == "done"


def test_signal_in_a_sharded_run_marks_the_shard_interrupted(tmp_path, data):
    out = tmp_path / "o"
    with stub_process(latency=0.25) as url:
        cmd = _cmd(url, data, out, "--shard", "1/2")
        proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _wait_lines(out / "results.shard-1-of-2.jsonl", 4, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 7, err.decode()
        m = json.loads((out / "run.json").read_text())
        assert m["shards"]["1/2"]["status"] == "interrupted" and m["status"] == "pending"  # shard 0 not run
        assert json.loads((out / "run.shard-1-of-2.json").read_text())["status"] == "interrupted"
        for c in (cmd, _cmd(url, data, out, "--shard", "0/2")):
            r = subprocess.run(c, env=cli_env(), capture_output=True, timeout=120)
            assert r.returncode == 0, r.stderr.decode()
    lines = _lines(out)
    assert len(lines) == 4 * N_ITEMS
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "done" and {s["status"] for s in m["shards"].values()} == {"done"}
    assert orjson.loads((out / "summary.json").read_bytes())["n_items"] == N_ITEMS


def test_clip_shards_report_as_one_run(tmp_path):
    pytest.importorskip("torch")
    from tests.support.clip import CUB_SIMILAR, cub_images, one_thread
    from tests.support.tiny_contrastive import build_tiny_hf

    model = str(build_tiny_hf(tmp_path / "siglip", "siglip"))
    root_map = cub_images(tmp_path / "img", 10)
    # batch size 1: the encoders see the same inputs in every run (batch composition moves decimals)
    base = {"data": str(CUB_SIMILAR), "model": model, "limit": 10, "image_root_map": [root_map],
            "backend": {"kind": "clip", "device": "cpu", "batch_size": 1, "workers": 1}}
    with one_thread():
        assert harness.run(base | {"out": str(tmp_path / "one")}).exit_code == 0
        for i in range(2):
            r = harness.run(base | {"out": str(tmp_path / "sh"), "shard": f"{i}/2"})
            assert r.exit_code == 0, r.message
    assert len(list((tmp_path / "sh").glob("results.shard-*"))) == 2
    assert _lines(tmp_path / "sh") == _lines(tmp_path / "one")
    a, b = harness.report([tmp_path / "one", tmp_path / "sh"])
    a.pop("run"), b.pop("run")
    assert a == b and a["n_items"] == 10


def test_analyze_and_plan_cells_see_a_folder_of_shards_only(tmp_path):
    """A run written only by shards (results.shard-I-of-N.jsonl, no results.jsonl) is a run for
    `harness analyze` and for a plan's cell state."""
    from harness.study.analysis import find_runs
    from tests.support.engine_helpers import CUB_SIMILAR
    from tests.support.stub_server import Stub, StubThread

    with StubThread(Stub()) as s:
        for i in range(2):
            spec = harness.RunSpec(out=str(tmp_path / "runs" / "sharded"), data=str(CUB_SIMILAR), limit=6,
                                   task={"mode": "text"}, backend={"endpoints": [s.url]}, shard=f"{i}/2")
            assert harness.run(spec).exit_code == 0
    assert not (tmp_path / "runs" / "sharded" / "results.jsonl").exists()
    assert [label for _, label in find_runs([tmp_path / "runs"])] == ["sharded"]
    assert [label for _, label in find_runs([tmp_path / "runs" / "sharded"])] == ["sharded"]
