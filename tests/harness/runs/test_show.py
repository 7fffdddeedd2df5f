"""`harness show RUN_DIR QID` rebuilds the request the engine sent, byte for byte in meaning."""

from __future__ import annotations

import orjson
import pytest

import harness
from tests.support.engine_helpers import CUB_SIMILAR, image_items, run_cli
from tests.support.stub_server import Stub, StubThread


def _key(body: dict) -> tuple:
    """A request's identity: its user text and its image's cache id."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content, None
    text = next(p["text"] for p in content if p["type"] == "text")
    return text, next((p.get("uuid") for p in content if p["type"] == "image_url"), None)


def _sent(stub: Stub) -> dict[tuple, dict]:
    """The bodies the stub received, by their identity."""
    return {_key(b): b for b in stub.bodies}


@pytest.mark.parametrize("mode, protocol", [("text", "robust"), ("image", "reference"), ("binary", "robust")])
def test_show_rebuilds_the_request_the_stub_received(tmp_path, capsys, mode, protocol):
    data = CUB_SIMILAR if mode == "text" else image_items(tmp_path, 6)
    stub = Stub()
    stub.keep_bodies = True
    with StubThread(stub) as s:
        spec = harness.RunSpec(out=str(tmp_path / "r"), data=str(data), backend={"endpoints": [s.url]},
                               task={"mode": mode, "protocol": protocol}, limit=6)
        assert harness.run(spec).exit_code == 0
    sent = _sent(stub)
    lines = [orjson.loads(x) for x in (tmp_path / "r" / "results.jsonl").read_bytes().splitlines()]
    asked = [x for x in lines if not x.get("auto")]
    for rec in asked[:: max(1, len(asked) // 5)]:
        rc, out, err = run_cli(capsys, "show", tmp_path / "r", rec["qid"], "--json")
        assert rc == 0, err
        d = orjson.loads(out)
        (req,) = d["requests"]
        body = req["body"]
        got = sent[_key(body)]
        if mode != "text":  # the image travels as a reference in `show`, as a data URL to the server
            for b in (body, got):
                for part in b["messages"][-1]["content"]:
                    if part["type"] == "image_url":
                        part["image_url"]["url"] = "IMAGE"
            assert d["image"] and d["image"].endswith(".png")
        assert body == got
        assert d["answer"]["qid"] == rec["qid"] and d["answer"]["raw"] == rec["raw"]
    rc, out, _ = run_cli(capsys, "show", tmp_path / "r", asked[0]["qid"])
    assert rc == 0 and "--- answer: raw" in out and "POST /chat/completions" in out


def test_show_names_what_is_missing(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "show", tmp_path, "abc")
    assert rc == 2 and "no run.json" in err
    with StubThread(Stub()) as s:
        harness.run(harness.RunSpec(out=str(tmp_path / "r"), data=str(CUB_SIMILAR), limit=1,
                                    backend={"endpoints": [s.url]}, task={"mode": "text"}))
    rc, _, err = run_cli(capsys, "show", tmp_path / "r", "nope")
    assert rc == 2 and "no question 'nope' in this run" in err
