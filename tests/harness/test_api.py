"""The Python API: `harness.run(RunSpec)` is what the CLI runs - same result lines, and the spec
recorded in run.json reproduces the run."""

from __future__ import annotations

import orjson
import pytest

import harness
from harness.runs.folder import ExitCode
from tests.support.engine_helpers import CUB_SIMILAR, image_items, run_cli
from tests.support.stub_server import Stub, StubThread

TIMING = ("latency",)


def _lines(folder) -> dict[str, dict]:
    out = {}
    for line in (folder / "results.jsonl").read_bytes().splitlines():
        rec = orjson.loads(line)
        for k in TIMING:
            rec.pop(k, None)
        out[rec["qid"]] = rec
    return out


@pytest.mark.parametrize("mode", ["text", "image", "binary"])
def test_api_and_cli_write_identical_result_lines(tmp_path, capsys, mode):
    data = CUB_SIMILAR if mode == "text" else image_items(tmp_path, 12)
    with StubThread(Stub()) as s:
        rc, _, err = run_cli(capsys, "run", "--endpoint", s.url, "--model", "stub-model", "--data", data,
                             "--out", tmp_path / "cli", "--mode", mode, "--limit", "12", "--quiet")
        assert rc == 0, err
        spec = harness.RunSpec(out=str(tmp_path / "api"), data=str(data), model="stub-model",
                               backend={"endpoints": [s.url]}, task={"mode": mode}, limit=12)
        result = harness.run(spec)
    assert result.exit_code == ExitCode.OK and result.status == "done"
    cli, api = _lines(tmp_path / "cli"), _lines(tmp_path / "api")
    assert len(cli) == {"text": 48, "image": 48, "binary": 4 * 48}[mode]
    assert cli == api
    # the summary returned equals the one written, and harness.report reads the same numbers
    written = orjson.loads((tmp_path / "api" / "summary.json").read_bytes())
    assert result.summary == written
    reported = harness.report([tmp_path / "api"])[0]
    assert reported["kind"] == "hierarchy" and reported["n_items"] == 12 and reported["hca"] == written["hca"]


def test_run_json_spec_reproduces_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_API_TEST_KEY", "sk-never-recorded-77")
    with StubThread(Stub(api_key="sk-never-recorded-77")) as s:
        spec = harness.RunSpec(out=str(tmp_path / "a"), data=str(CUB_SIMILAR),
                               backend={"endpoints": [s.url], "api_key_env": "HARNESS_API_TEST_KEY"},
                               task={"mode": "text", "protocol": "reference"}, limit=20)
        assert harness.run(spec).exit_code == ExitCode.OK
        manifest = orjson.loads((tmp_path / "a" / "run.json").read_bytes())
        assert b"sk-never-recorded-77" not in (tmp_path / "a" / "run.json").read_bytes()
        again = harness.RunSpec.model_validate(manifest["spec"]).model_copy(update={"out": str(tmp_path / "b")})
        assert again.model == "stub-model"  # the served model is recorded, not left to be guessed again
        assert harness.run(again).exit_code == ExitCode.OK
    assert _lines(tmp_path / "a") == _lines(tmp_path / "b")
    assert manifest["kind"] == "hierarchy" and manifest["status"] == "done"
    assert manifest["spec"]["backend"]["api_key_env"] == "HARNESS_API_TEST_KEY"


def test_rerunning_a_spec_resumes_and_a_larger_limit_extends(tmp_path):
    with StubThread(Stub()) as s:
        spec = harness.RunSpec(out=str(tmp_path / "r"), data=str(CUB_SIMILAR), backend={"endpoints": [s.url]},
                               task={"mode": "text"}, limit=5)
        first = harness.run(spec)
        again = harness.run(spec)
        bigger = harness.run(spec.model_copy(update={"limit": 9}))
    assert first.stats["answered"] == 15 and first.stats["auto"] == 5  # 3 asked levels + the leaf, per item
    assert again.stats["answered"] == 0 and again.stats["groups"] == 0
    assert bigger.stats["answered"] == 12 and bigger.summary["n_items"] == 9


def test_a_settings_change_is_refused_naming_the_field(tmp_path):
    with StubThread(Stub()) as s:
        spec = harness.RunSpec(out=str(tmp_path / "r"), data=str(CUB_SIMILAR), backend={"endpoints": [s.url]},
                               task={"mode": "text"}, limit=3)
        harness.run(spec)
        with pytest.raises(ValueError, match=r"other settings \(max_tokens: 10 -> 7\)"):
            harness.run(spec.model_copy(update={"max_tokens": 7}))
        # transport settings do not change answers
        faster = spec.model_copy(update={"backend": spec.backend.model_copy(update={"concurrency": 3})})
        assert harness.run(faster).exit_code == ExitCode.OK


def test_run_accepts_a_plain_dict_and_reports_a_dead_endpoint_as_fatal(tmp_path):
    result = harness.run({"out": str(tmp_path / "r"), "data": str(CUB_SIMILAR), "task": {"mode": "text"},
                          "backend": {"endpoints": ["http://127.0.0.1:9"]}, "limit": 2})
    assert result.exit_code == ExitCode.FATAL and "cannot reach" in (result.message or "")
    assert not (tmp_path / "r" / "results.jsonl").exists()
