"""The viewer's index and server without a browser: rebuilt when results grow, every results*.jsonl of a
folder read, last line of a qid wins, image paths confined to the roots, loopback by default."""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from harness.view import images
from harness.view.index import Filters, RunIndex, results_files
from harness.view.server import ServerThread, Viewer


def _lines(p: Path) -> list[dict]:
    return [orjson.loads(x) for x in p.read_bytes().splitlines()]


def test_index_is_kept_and_rebuilt_when_results_grow(runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(runs["image"], folder)
    for p in folder.glob("view-index*"):
        p.unlink()
    idx = RunIndex(folder)
    assert (folder / "view-index.sqlite").is_file()
    n = idx.count(Filters())
    assert not idx.ensure()  # unchanged: not rebuilt
    assert RunIndex(folder).ensure() is False  # a second viewer reuses the file
    rec = _lines(folder / "results.jsonl")[0]
    rec.update(letter=None, prediction=None, raw="I cannot tell", error=None)
    with (folder / "results.jsonl").open("ab") as f:  # a later answer of a qid (last line wins)
        f.write(orjson.dumps(rec) + b"\n")
    assert idx.ensure()
    assert idx.count(Filters()) == n
    assert [r["qid"] for r in idx.page(Filters(status="unparsed"), 0, 10)] == [rec["qid"]]


def test_every_results_file_of_a_sharded_folder_is_read(runs, tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(runs["image"] / "run.json", folder)
    lines = (runs["image"] / "results.jsonl").read_bytes().splitlines(keepends=True)
    (folder / "results.shard-0-of-2.jsonl").write_bytes(b"".join(lines[::2]))
    (folder / "results.shard-1-of-2.jsonl").write_bytes(b"".join(lines[1::2]))
    assert len(results_files(folder)) == 2
    idx = RunIndex(folder)
    assert idx.count(Filters()) == len({orjson.loads(x)["qid"] for x in lines})
    assert idx.meta["files"] == ["results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl"]


def test_image_resolution_is_confined_to_the_roots(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"\x89PNG")
    (tmp_path / "out.png").write_bytes(b"secret")
    (root / "a" / "link.png").symlink_to(tmp_path / "out.png")
    (root / "a" / "notes.txt").write_text("text")
    roots = [root.resolve()]
    assert images.resolve(roots, 0, "a/x.png") == (root / "a" / "x.png").resolve()
    for bad in ("../out.png", "a/../../out.png", str(tmp_path / "out.png"), "/etc/passwd", "a/link.png",
                "a/notes.txt", "", "a\\..\\..\\out.png", "C:\\x.png"):
        with pytest.raises(images.Refused):
            images.resolve(roots, 0, bad)
    with pytest.raises(images.Refused):
        images.resolve(roots, 1, "a/x.png")
    assert images.locate(str(root / "a" / "x.png"), roots) == (0, "a/x.png")
    assert images.locate(str(tmp_path / "out.png"), roots) is None


def test_server_refuses_foreign_host_names_and_sets_a_strict_csp(runs):
    with ServerThread(Viewer([runs["image"]])) as s:
        with urllib.request.urlopen(s.url + "api/runs") as r:
            assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        req = urllib.request.Request(s.url + "api/runs", headers={"Host": "evil.example:80"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 403


def test_harness_view_binds_loopback_and_prints_the_url(runs):
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "view", str(runs["image"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("harness view: http://127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        url = line.split()[2]
        with urllib.request.urlopen(url) as r:
            assert b"harness view" in r.read()
    finally:
        proc.terminate()
        proc.wait(10)
