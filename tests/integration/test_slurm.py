"""`harness plan run --executor slurm` on a REAL single-node SLURM cluster (started by the fixture from
Debian's packages, see tests/support/slurm_cluster.py), with loopback stub servers standing in for the
models (`--endpoint MODEL=URL`): the same results as the local executor, a preempted job requeued by
submitit resumes with every question answered exactly once, `plan status` shows the job ids."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.support import slurm_cluster
from tests.support.engine_helpers import read_results, stub_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="session")
def slurm():
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.cluster():
        print(f"\nslurm test cluster up in {slurm_cluster.TIMINGS['up']:.1f} s", file=sys.stderr)
        yield
    print("\nslurm tests: " + ", ".join(f"{k} {v:.1f} s" for k, v in slurm_cluster.TIMINGS.items()), file=sys.stderr)


def _plan(tmp_path: Path, *, models=("m1", "m2"), variants="[0, 1]", limit=5) -> Path:
    ms = "".join(f'[[models]]\nname = "{m}"\nmodel = "stub-model"\n' for m in models)
    p = tmp_path / "plan.toml"
    p.write_text(f'''
name = "grid"
out = "{tmp_path / 'out'}"
modes = "text"
variants = {variants}
limit = {limit}
{ms}
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl" }}

[slurm]
time = 60                 # >= 50 min: submitit counts a signal as a time-out below that
''')
    return p


KEEP = ("qid", "item", "level", "truth", "choices", "letter", "prediction", "raw", "error")


def _results(folder: Path) -> dict[str, dict]:
    out = {}
    for d in sorted(p for p in folder.glob("m*/*") if p.is_dir()):
        recs = read_results(d / "results.jsonl")
        qids = [r["qid"] for r in recs]
        assert len(qids) == len(set(qids)), f"{d}: a question recorded twice"
        out[f"{d.parent.name}/{d.name}"] = {r["qid"]: {k: r.get(k) for k in KEEP} for r in recs}
    return out


def test_slurm_executor_gives_the_local_results_and_status_shows_the_jobs(slurm, tmp_path, cli):
    plan = _plan(tmp_path)
    with stub_process() as u1, stub_process() as u2:
        eps = ["--endpoint", f"m1={u1}", "--endpoint", f"m2={u2}"]
        rc, out, err = cli("plan", "run", plan, *eps, "--out", tmp_path / "local")
        assert rc == 0, out + err
        t0 = time.monotonic()
        rc, out, err = cli("plan", "run", plan, *eps, "--executor", "slurm", "--wait", "--out", tmp_path / "slurm")
        took = time.monotonic() - t0
        assert rc == 0, out + err
    slurm_cluster.TIMINGS["plan"] = took
    assert "4/4 cells done" in out
    assert sum("harness plan: submitted job" in line for line in err.splitlines()) == 2  # one job per model
    local, remote = _results(tmp_path / "local"), _results(tmp_path / "slurm")
    assert len(local) == 4 and all(len(v) == 20 for v in local.values())
    assert remote == local  # same questions, same answers, each once
    recs = {r["group"]: r for r in (orjson.loads(p.read_bytes()) for p in (tmp_path / "slurm/_jobs").glob("m?.json"))}
    assert set(recs) == {"m1", "m2"} and recs["m1"]["job_id"] != recs["m2"]["job_id"]
    rc, out, _ = cli("plan", "status", plan, "--out", tmp_path / "slurm", "--json")
    assert rc == 0
    rows = orjson.loads(out)
    assert {r["key"].split("/")[0]: r["job"]["job_id"] for r in rows} == {m: recs[m]["job_id"] for m in ("m1", "m2")}
    assert {r["job"]["state"] for r in rows} == {"COMPLETED"}
    cell = orjson.loads((tmp_path / "slurm" / rows[0]["key"] / "plan-cell.json").read_bytes())
    assert cell["job"]["job_id"] == recs["m1"]["job_id"] and cell["job"]["executor"] == "slurm"
    rc, out, _ = cli("plan", "status", plan, "--out", tmp_path / "slurm")
    assert f"{recs['m1']['job_id']} COMPLETED" in out and f"{recs['m2']['job_id']} COMPLETED" in out
    # all done: nothing is submitted again
    rc, out, err = cli("plan", "run", plan, "--endpoint", "m1=http://127.0.0.1:9/v1", "--endpoint",
                       "m2=http://127.0.0.1:9/v1", "--executor", "slurm", "--out", tmp_path / "slurm")
    assert rc == 0 and "submitted job" not in err and "4/4 cells done" in out


def test_a_preempted_job_is_requeued_and_resumes_answering_each_question_once(slurm, tmp_path, cli):
    import submitit

    from harness.study.slurm import wait_for_jobs

    plan = _plan(tmp_path, models=("m1",), limit=8)
    with stub_process(latency=0.15) as url:  # one request at a time: ~5 s a cell
        rc, out, err = cli("plan", "run", plan, "--endpoint", f"m1={url}", "--executor", "slurm",
                           "--run-args", "--concurrency 1")
        assert rc == 0 and "2 in SLURM jobs" in out, out + err
        rec = orjson.loads((tmp_path / "out/_jobs/m1.json").read_bytes())
        jid = rec["job_id"]
        first = tmp_path / "out/m1/cub.similar.text.v0.generate.robust.n8/results.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (first.exists() and len(first.read_bytes().splitlines()) >= 5):
            time.sleep(0.1)
        assert first.exists(), "the job did not start answering"
        t0 = time.monotonic()
        # preemption as submitit simulates it: SIGTERM, then USR2 -> checkpoint -> scontrol requeue
        submitit.SlurmJob(folder=tmp_path / "out/_slurm/%j", job_id=jid)._interrupt()
        states = wait_for_jobs([jid], timeout=180)
        took = time.monotonic() - t0
    slurm_cluster.TIMINGS["requeue"] = took
    assert states.get(jid) == "COMPLETED", states
    run = orjson.loads((tmp_path / "out/_jobs/m1.run.json").read_bytes())
    assert run["restart"] >= 1 and run["state"] == "finished" and run["requeued"]
    got = _results(tmp_path / "out")
    assert len(got) == 2 and all(len(v) == 32 for v in got.values())  # every question, each once
    for k in got:
        assert orjson.loads((tmp_path / "out" / k / "run.json").read_bytes())["status"] == "done"
    rc, out, _ = cli("plan", "status", plan, "--json")
    rows = orjson.loads(out)
    assert {(r["state"], r["job"]["job_id"], r["job"]["restarts"] >= 1) for r in rows} == {("done", jid, True)}
