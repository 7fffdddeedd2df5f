"""Generated run folders for the viewer tests: real `harness.run` runs against the loopback stub over
generated images (image, binary and text modes), one with a raw answer holding HTML and script."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import orjson
import pytest

import harness
from tests.support.engine_helpers import CUB_SIMILAR, make_png
from tests.support.stub_server import Stub, StubThread

N_ITEMS = 30
SCRIPT_RAW = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">B'


def items_file(base: Path, n: int) -> Path:
    """n CUB items spread over the whole file (many orders, families, genera), each with a generated PNG."""
    lines = CUB_SIMILAR.read_bytes().splitlines()
    step = max(1, len(lines) // n)
    out = base / "items.jsonl"
    with out.open("wb") as f:
        for k in range(n):
            rec = orjson.loads(lines[k * step])
            img = base / "img" / f"{k:04d}.png"
            make_png(img, (64, 48), k)
            rec["image"] = str(img)
            f.write(orjson.dumps(rec) + b"\n")
    return out


def _run(out: Path, data: Path, url: str, mode: str, model: str, **task) -> Path:
    spec = harness.RunSpec(out=str(out), data=str(data), model=model, backend={"endpoints": [url]},
                           task={"mode": mode, **task}, limit=N_ITEMS)
    res = harness.run(spec)
    assert res.exit_code == 0, res
    return out


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, Path]:
    """{image, image_b, binary, text, incomplete}: run folders over N_ITEMS generated CUB items."""
    base = tmp_path_factory.mktemp("view-runs")
    (base / "data").mkdir()
    data = items_file(base / "data", N_ITEMS)  # the image root of these runs: base/data
    out: dict[str, Path] = {}
    with StubThread(Stub()) as s:
        out["image"] = _run(base / "run-image", data, s.url, "image", "stub-model")
        # a second model: answers differ (the stub hashes the text; another prompt variant changes it)
        out["image_b"] = _run(base / "run-image-b", data, s.url, "image", "stub-model", prompt_variant=1)
        out["binary"] = _run(base / "run-binary", data, s.url, "binary", "stub-model")
        out["text"] = _run(base / "run-text", data, s.url, "text", "stub-model")
    # a raw answer with HTML and script: appended as a later line of an existing qid (last line wins)
    lines = (out["image"] / "results.jsonl").read_bytes().splitlines()
    rec = orjson.loads(lines[1])
    rec["raw"] = SCRIPT_RAW
    with (out["image"] / "results.jsonl").open("ab") as f:
        f.write(orjson.dumps(rec) + b"\n")
    # an incomplete run: a copy with failed lines and the manifest saying so
    inc = base / "run-incomplete"
    shutil.copytree(out["image"], inc)
    recs = [orjson.loads(x) for x in (inc / "results.jsonl").read_bytes().splitlines()]
    for r in recs[:7]:
        r.update(letter=None, prediction=None, raw=None, error="HTTP 503")
    (inc / "results.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    m = orjson.loads((inc / "run.json").read_bytes())
    m["status"] = "incomplete"
    (inc / "run.json").write_bytes(orjson.dumps(m))
    for p in inc.glob("view-index*"):
        p.unlink()
    out["incomplete"] = inc
    # a secret outside the image root, and a symlink inside the image folder that points at it
    (base / "secret.png").write_bytes(b"not for the viewer")
    os.symlink(base / "secret.png", base / "data" / "img" / "link-out.png")
    out["base"] = base
    return out
