"""The first hour of a new user, as tests: each trap gives one line naming the flag or file, a distinct
exit code, and loses nothing; reports never show a partial run as a result."""

from __future__ import annotations

import sys

import orjson
import pytest

import harness
from harness.runs.folder import ExitCode
from tests.support.engine_helpers import CUB_SIMILAR, image_items, run_cli
from tests.support.stub_server import Stub, StubThread


def _run(capsys, url, *argv):
    return run_cli(capsys, "run", "--endpoint", url, "--model", "stub-model", *argv)


def test_forgotten_image_root_map_stops_before_anything(tmp_path, capsys):
    stub = Stub()
    with StubThread(stub) as s:
        rc, out, err = _run(capsys, s.url, "--data", CUB_SIMILAR, "--out", tmp_path / "o", "--limit", "50")
    assert rc == ExitCode.INPUT and stub.requests == 0
    assert "add --image-root-map /projectnb/ivc-ml/yuwentan/dataset=" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing left behind


@pytest.mark.parametrize("make, flag, message", [
    (lambda p: p.mkdir(), "--data", "not a file"),
    (lambda p: None, "--data", "no such file"),
])
def test_bad_data_paths_name_the_flag(tmp_path, capsys, make, flag, message):
    bad = tmp_path / "d"
    make(bad)
    rc, _, err = run_cli(capsys, "run", "--endpoint", "http://127.0.0.1:9", "--data", bad, "--out", tmp_path / "o")
    assert rc == ExitCode.INPUT and f"{flag} {bad}: {message}" in err and "Traceback" not in err


def test_out_that_is_a_file_names_the_flag(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    rc, _, err = run_cli(capsys, "run", "--endpoint", "http://127.0.0.1:9", "--data", CUB_SIMILAR, "--out",
                         tmp_path / "f")
    assert rc == ExitCode.INPUT and f"--out {tmp_path / 'f'}: exists and is not a folder" in err


def test_resume_says_what_is_done_and_what_is_left_and_stats_add_up(tmp_path, capsys):
    with StubThread(Stub()) as s:
        args = ("--data", CUB_SIMILAR, "--out", tmp_path / "o", "--mode", "text")
        rc, _, err = _run(capsys, s.url, *args, "--limit", "4")
        assert rc == 0 and "12 question(s) to ask for 4 items" in err
        rc, _, err = _run(capsys, s.url, *args, "--limit", "6")
        assert rc == 0 and "16 already done, 6 question(s) to ask for 2 items" in err
    m = orjson.loads((tmp_path / "o" / "run.json").read_bytes())
    assert m["stats"]["answered"] == 6 and m["stats_total"]["answered"] == 18
    assert m["stats_total"]["invocations"] == 2
    assert m["command"] == sys.argv  # the real command line (here: pytest's), not a placeholder


def test_dry_run_starts_nothing_and_shows_a_request(tmp_path, capsys):
    data = image_items(tmp_path, 3)
    rc, out, err = run_cli(capsys, "run", "--model", "/no/such/local/model", "--data", data, "--out",
                           tmp_path / "o", "--dry-run")
    assert rc == 0, err
    assert "12 questions to ask" in out and "first request (" in out and "POST /chat/completions" in out
    assert f"<image {tmp_path / 'img' / '0000.png'}>" in out
    assert not (tmp_path / "o").exists()


def test_report_says_a_partial_run_is_incomplete(tmp_path, capsys):
    with StubThread(Stub()) as s:
        spec = harness.RunSpec(out=str(tmp_path / "o"), data=str(CUB_SIMILAR), backend={"endpoints": [s.url]},
                               task={"mode": "text"}, limit=10)
        assert harness.run(spec).exit_code == 0
        full = harness.report([tmp_path / "o"])[0]
        assert full["complete"] is True and full["n_not_asked"] == 0 and full["n_failed"] == 0
        # a run cut short: a larger limit recorded, half of it answered (as if killed mid-way)
        m = orjson.loads((tmp_path / "o" / "run.json").read_bytes())
        m["status"], m["spec"]["limit"] = "interrupted", 20
        (tmp_path / "o" / "run.json").write_bytes(orjson.dumps(m))
    part = harness.report([tmp_path / "o"])[0]
    assert part["complete"] is False and part["n_not_asked"] == 30 and part["status"] == "interrupted"
    rc, out, _ = run_cli(capsys, "report", tmp_path / "o", "--json")
    assert rc == 0 and orjson.loads(out)["complete"] is False


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage \x13\n\x01\x02\n"])
def test_report_refuses_an_empty_or_garbage_file(tmp_path, capsys, content):
    (tmp_path / "results.jsonl").write_bytes(content)
    rc, _, err = run_cli(capsys, "report", tmp_path / "results.jsonl", "--json")
    assert rc == ExitCode.INPUT and "no result lines" in err


def test_report_table_warns_about_incomplete_and_unanswered_runs(tmp_path, capsys):
    with StubThread(Stub(faults={"500": 1.0}, fault_attempts=99)) as s:
        spec = harness.RunSpec(out=str(tmp_path / "o"), data=str(CUB_SIMILAR), task={"mode": "text"}, limit=3,
                               backend={"endpoints": [s.url], "max_retries": 0})
        assert harness.run(spec).exit_code == ExitCode.UNANSWERED
    rc, _, err = run_cli(capsys, "report", tmp_path / "o")
    assert rc == 0 and "no question was answered; its numbers are not a result" in err


def test_image_errors_name_the_file_and_huge_images_need_max_side(tmp_path):
    from PIL import Image

    from harness.backends.images import encode_image

    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'bad.jpg'}: not a readable image"):
        encode_image(str(tmp_path / "bad.jpg"))
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        Image.new("RGB", (11000, 11000), (1, 2, 3)).save(tmp_path / "big.png")
    finally:
        Image.MAX_IMAGE_PIXELS = old
    with pytest.raises(ValueError, match="121 Mpixels, over the 100 Mpixel limit; send it resized with --max-side"):
        encode_image(str(tmp_path / "big.png"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw PIL warning reaches the user
        assert encode_image(str(tmp_path / "big.png"), max_side=1680).size == (1680, 1680)


@pytest.mark.parametrize("extra, message", [
    (("--profile", "nope"), "--profile nope: unknown server profile 'nope'"),
    (("--mode", "image"), "none of the first 20 images exists"),
])
def test_input_errors_come_before_any_server_is_asked_or_started(tmp_path, capsys, extra, message):
    """No endpoint is contacted (a dead one would say 'cannot reach') and no local server is started
    (--model without --endpoint) before the inputs are known good."""
    for how in (("--endpoint", "http://127.0.0.1:9"), ("--model", "/no/such/model")):
        rc, _, err = run_cli(capsys, "run", *how, "--data", CUB_SIMILAR, "--out", tmp_path / "o", *extra)
        assert rc == ExitCode.INPUT and message in err and "cannot reach" not in err, err
        assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_items_is_named_before_anything_starts(tmp_path, capsys):
    (tmp_path / "x.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    rc, _, err = run_cli(capsys, "run", "--endpoint", "http://127.0.0.1:9", "--data", tmp_path / "x.jsonl",
                         "--out", tmp_path / "o")
    assert rc == ExitCode.INPUT and f"{tmp_path / 'x.jsonl'}: no valid item among the first lines" in err


def test_spec_files_and_union_fields_name_the_flag_the_file_and_the_field(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "classify", "run", "--endpoint", "http://127.0.0.1:9", "--dataset", "flowers",
                         "--task", "closed", "--k", "nine", "--out", tmp_path / "c")
    assert rc == ExitCode.INPUT and "--k: Input should be a valid integer" in err and "Traceback" not in err
    (tmp_path / "bad.toml").write_text(f'out = "o"\ndata = "{CUB_SIMILAR}"\n[backend]\nconcurrency = 0\n')
    (tmp_path / "bad.json").write_text('{"out": 1')
    for spec, message in ((tmp_path / "none.toml", "no such file"),
                          (tmp_path / "bad.toml", "backend.concurrency: Input should be greater than or equal to 1"),
                          (tmp_path / "bad.json", "not valid JSON"),
                          (tmp_path / "x.yaml", "expected a .toml or .json RunSpec file")):
        rc, _, err = run_cli(capsys, "run", "--spec", spec)
        assert rc == ExitCode.INPUT and f"--spec {spec}: {message}" in err and "Traceback" not in err, err


def test_a_shipped_dataset_without_its_images_names_the_dataset(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "classify", "run", "--endpoint", "http://127.0.0.1:9", "--dataset", "flowers",
                         "--out", tmp_path / "c")
    assert rc == ExitCode.INPUT and "--dataset flowers: none of the first 20 images exists" in err
    assert not (tmp_path / "c").exists()
