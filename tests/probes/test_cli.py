"""`harness probe extract / text / train / info` end to end on a tiny random LLaVA."""

from __future__ import annotations

import json

import orjson
import pytest

PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


@pytest.fixture
def harness_cli(monkeypatch, capsys):
    import harness.cli

    monkeypatch.setenv("COLUMNS", "300")

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = harness.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def _cub_subset(tmp_path, write_images):
    """15 lines of the shipped CUB probing file (9 train, 6 test; two orders), with stand-in images."""
    from probes.data import shipped_probing_file

    lines = shipped_probing_file("CUB200_all.jsonl").read_text().splitlines()
    picked = lines[0:3] + lines[60:63] + lines[5994 - 3:5994] + lines[5994:5997] + lines[-3:]
    data = tmp_path / "cub.jsonl"
    data.write_text("\n".join(picked) + "\n")
    root = tmp_path / "images"
    for i, line in enumerate(picked):
        dest = root / json.loads(line)["image"][len(PREFIX) + 1:]
        src = write_images(tmp_path / "src", [(40 + i, 30)], seed=i)[0]
        dest.parent.mkdir(parents=True, exist_ok=True)
        src.replace(dest)
    return data, root


def test_extract_train_report(harness_cli, tiny_llava, tmp_path, make_images):
    data, root = _cub_subset(tmp_path, make_images)
    feats = tmp_path / "feats"
    rc, out, err = harness_cli("probe", "extract", "--model", tiny_llava, "--data", data, "--taxonomy", "cub",
                               "--out", feats, "--image-root-map", f"{PREFIX}={root}", "--batch-size", "2",
                               "--shard-size", "4", "--sites", "vision,projector,llm.-1", "--quiet")
    assert rc == 0, err
    assert "15 rows, 0 unreadable inputs" in out and "complete" in out
    man = orjson.loads((feats / "manifest.json").read_bytes())
    assert man["level_names"] == ["order", "family", "genus", "species"] and man["complete"]
    assert man["settings"]["features"] == ["vision.last", "vision.mean", "projector.last", "projector.mean",
                                           "llm.2.last", "llm.2.mean"]
    assert man["settings"]["recipe"]["user"] == "Describe this image." and man["n_shards"] == 4

    rc, out, _ = harness_cli("probe", "info", feats)
    assert rc == 0 and "15 rows in 4 shards" in out and "projector.mean: 64-d float16" in out

    res = tmp_path / "res"
    rc, out, err = harness_cli("probe", "train", feats, "--out", res, "--feature", "projector.*", "--epochs", "3",
                               "--select", "last", "--no-plots")
    assert rc == 0, err
    assert "projector.last" in out and "projector.mean" in out
    sweep = orjson.loads((res / "sweep.json").read_bytes())
    assert [r["feature"] for r in sweep["rows"]] == ["projector.last", "projector.mean"]
    assert sweep["rows"][0]["n_items"] == 6  # the test images
    rc, out, _ = harness_cli("probe", "train", feats, "--out", res, "--feature", "llm.2.mean", "--epochs", "2",
                             "--select", "last", "--no-plots", "--json")
    assert rc == 0 and json.loads(out)["feature"] == "llm.2.mean"
    # the probe's results.jsonl is a harness result file
    rc, out, _ = harness_cli("report", res / "projector.mean", "--json")
    assert rc == 0 and json.loads(out)["n_items"] == 6

    # resuming a complete store adds nothing; other settings are refused with exit 2
    rc, out, _ = harness_cli("probe", "extract", "--model", tiny_llava, "--data", data, "--taxonomy", "cub",
                             "--out", feats, "--image-root-map", f"{PREFIX}={root}", "--batch-size", "2",
                             "--shard-size", "4", "--sites", "vision,projector,llm.-1", "--quiet")
    assert rc == 0, _
    assert "0 new" in out and "resumed after 15 inputs" in out
    rc, _, err = harness_cli("probe", "extract", "--model", tiny_llava, "--data", data, "--taxonomy", "cub",
                             "--out", feats, "--image-root-map", f"{PREFIX}={root}", "--quiet")
    assert rc == 2 and "other settings" in err and "batch_size: 2 -> 1" in err


def test_text_probing_command(harness_cli, tiny_llava, tmp_path):
    train = {"Sooty Albatross": ["Procellariiformes", "Diomedeidae", "Phoebetria", "Sooty Albatross"],
             "Groove-billed Ani": ["Cuculiformes", "Cuculidae", "Crotophaga", "Groove-billed Ani"],
             "Laysan Albatross": ["Procellariiformes", "Diomedeidae", "Phoebastria", "Laysan Albatross"]}
    test = {"Black-footed Albatross": ["Procellariiformes", "Diomedeidae", "Phoebastria", "Black-footed Albatross"]}
    (tmp_path / "tr.json").write_text(json.dumps(train))
    (tmp_path / "te.json").write_text(json.dumps(test))
    feats = tmp_path / "text"
    rc, out, err = harness_cli("probe", "text", "--model", tiny_llava, "--taxonomy", "cub", "--out", feats,
                               "--split", f"train={tmp_path / 'tr.json'}", "--split", f"test={tmp_path / 'te.json'}",
                               "--batch-size", "4", "--shard-size", "8", "--quiet")
    assert rc == 0, err
    assert "16 rows" in out
    from probes.store import FeatureStore

    st = FeatureStore(feats)
    assert st.keys == ["llm.0.mean", "llm.1.mean", "llm.2.mean"]
    rows = list(st.rows())
    assert [r["level"] for r in rows[:4]] == [1, 2, 3, 4] and rows[-1]["group"] == "Black-footed Albatross"
    res = tmp_path / "res"
    rc, out, err = harness_cli("probe", "train", feats, "--out", res, "--feature", "llm.*.mean", "--epochs", "2",
                               "--select", "last", "--no-plots")
    assert rc == 0, err
    assert "level 4 not probed: no test class occurs in training" in out
    assert [line.split(",")[0] for line in (res / "sweep.csv").read_text().splitlines()] == [
        "feature", "llm.0.mean", "llm.1.mean", "llm.2.mean"]


def test_errors_name_file_line_field(harness_cli, tiny_llava, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "label": "Sooty Albatross", "split": "train"}\n{"image": "b.jpg", "label": "Dodo", "split": "test"}\n')
    rc, _, err = harness_cli("probe", "extract", "--model", tiny_llava, "--data", bad, "--taxonomy", "cub",
                             "--out", tmp_path / "f")
    assert rc == 2 and f"{bad}:2: field 'label'" in err and "Dodo" in err
    rc, _, err = harness_cli("probe", "extract", "--model", tiny_llava, "--data", tmp_path / "none.jsonl",
                             "--out", tmp_path / "f")
    assert rc == 2 and "no such file" in err
    rc, _, err = harness_cli("probe", "train", tmp_path, "--out", tmp_path / "r")
    assert rc == 2 and "not a feature store" in err
    rc, _, err = harness_cli("probe", "text", "--model", tiny_llava, "--taxonomy", "food", "--out", tmp_path / "t")
    assert rc == 2 and "--split NAME=FILE is required" in err
