"""Issue 12, metric half: scoring under `--protocol reference` reproduces the authors' `utils/metric.py`
and `utils/metric_binary.py`; robust keeps per-level scoring; full precision in machine-readable output;
the reference result format written by `harness report RUN --reference-format OUT.json`.

The reference metric logic below is written from its documented behaviour (hierarchy-protocol.md
sections 4 and 5), not imported from the harness, so the harness is checked against it."""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import orjson
import pytest

from harness.metrics.readers import reference_export, summarize_results
from harness.runs.results import write_jsonl

ROOT = Path(__file__).resolve().parents[3]
CUB = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
LETTERS = "ABCD"


# ------------------------------------------------------------------ the reference metric, from the doc

def ref_extract(records: list[dict], start: int) -> tuple[list[list], list[list]]:
    """metric.py extract_hierarchies_from_results: truth and prediction lists collected independently
    from `start` while the key exists, None values skipped; empty lists leave the record out."""
    ys, ps = [], []
    for r in records:
        t, p = [], []
        lv = start
        while f"ground_truth_level{lv}" in r:
            if r[f"ground_truth_level{lv}"] is not None:
                t.append(r[f"ground_truth_level{lv}"])
            lv += 1
        lv = start
        while f"predicted_level{lv}" in r:
            if r[f"predicted_level{lv}"] is not None:
                p.append(r[f"predicted_level{lv}"])
            lv += 1
        if t and p:
            ys.append(t)
            ps.append(p)
    return ys, ps


def ref_extract_binary(records: list[dict]) -> tuple[list[list], list[list]]:
    """metric_binary.py: from level 1; per level the first option (letter order) whose lower-cased
    text is a record key holding 1, else None (kept)."""
    ys, ps = [], []
    for r in records:
        t, p = [], []
        lv = 1
        while f"ground_truth_level{lv}" in r:
            if r[f"ground_truth_level{lv}"] is not None:
                t.append(r[f"ground_truth_level{lv}"])
            lv += 1
        lv = 1
        while f"ground_truth_level{lv}" in r and f"choices_level{lv}" in r:
            pred = None
            for c in r[f"choices_level{lv}"].values():
                if c.lower() in r and r[c.lower()] == 1:
                    pred = c
                    break
            p.append(pred)
            lv += 1
        if t and p:
            ys.append(t)
            ps.append(p)
    return ys, ps


def _low(xs):
    return [x.lower() if x is not None else None for x in xs]


def ref_metrics(ys: list[list], ps: list[list]) -> dict:
    """The reference metric functions (section 5), x100, in the reference's arithmetic order."""
    n = len(ys)
    hca = leaf = por = spor = tor = 0.0
    depth = max(max(len(y) for y in ys), max(len(p) for p in ps))
    lc = {i: 0 for i in range(1, depth + 1)}
    lt = {i: 0 for i in range(1, depth + 1)}
    for y, p in zip(ys, ps):
        y, p = _low(y), _low(p)
        hca += p == y
        leaf += (p[-1] or "") == (y[-1] or "")
        por += sum(a == b for a, b in zip(p, y)) / len(y)
        k = 0
        for a, b in zip(p, y):
            if a != b:
                break
            k += 1
        spor += k / len(y)
        if len(y) > 1:
            tor += sum(1 for j in range(len(y) - 1) if j + 1 < len(p) and p[j] == y[j] and p[j + 1] == y[j + 1]) / (len(y) - 1)
        for j in range(depth):
            if j < len(y):
                lt[j + 1] += 1
                lc[j + 1] += j < len(p) and p[j] == y[j]
    return {"n_items": n, "hca": hca / n * 100, "leaf_acc": leaf / n * 100, "por": por / n * 100,
            "strict_por": spor / n * 100, "tor": tor / n * 100,
            "per_level": {i: lc[i] / lt[i] * 100 for i in lt if lt[i]}}


def assert_same(harness_json: dict, ref: dict, start: int = 1) -> None:
    assert harness_json["n_items"] == ref["n_items"]
    for k in ("hca", "leaf_acc", "por", "strict_por", "tor"):
        assert harness_json[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-12), k
    assert {int(k): v for k, v in harness_json["per_level"].items()} == pytest.approx(
        {start - 1 + i: v for i, v in ref["per_level"].items()}, rel=1e-12)


# ------------------------------------------------------------------ runs built from real CUB items

def cub_items() -> list[dict]:
    return [json.loads(line) for line in CUB.read_text().splitlines()]


def reference_shuffle(items: list[dict]) -> list[dict[int, list[str]]]:
    """random.seed(42) once, random.shuffle of every level's choices in file order (section 2)."""
    rng = random.Random(42)
    out = []
    for r in items:
        lv = {}
        for n in range(1, 5):
            c = list(r[f"choices_level{n}"])
            rng.shuffle(c)
            lv[n] = c
        out.append(lv)
    return out


def write_run(folder: Path, lines: list[dict], protocol: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "results.jsonl", lines)
    (folder / "run.json").write_bytes(orjson.dumps({"kind": "hierarchy", "settings": {"protocol": protocol}}))
    return folder


def binary_model(item: dict, level: int, option: str, letter_index: int) -> int:
    """A level-dependent fake yes/no model: right about order, family and genus (Yes to the truth
    only); at species it says Yes to the statement of letter A only."""
    if level < 4:
        return int(option == item[f"level{level}"])
    return int(letter_index == 0)


def binary_lines(items, orders) -> list[dict]:
    lines = []
    for k, (it, order) in enumerate(zip(items, orders)):
        for lv in range(1, 5):
            choices = dict(zip(LETTERS, order[lv]))
            for i, opt in enumerate(order[lv]):
                yes = binary_model(it, lv, opt, i)
                lines.append({"qid": f"{k}:{lv}:{i}", "item": f"item{k}", "level": lv, "truth": it[f"level{lv}"],
                              "choices": choices, "letter": None, "prediction": None, "raw": "Yes" if yes else "No",
                              "error": None, "scored": True, "option": LETTERS[i], "yes": yes})
    return lines


@pytest.fixture(scope="module")
def collision_items():
    """The 83 CUB items (similar choices) whose genus and species options share a name, with their
    reference-shuffled options (the shuffle replays the whole file)."""
    items = cub_items()
    orders = reference_shuffle(items)
    pick = [(it, o) for it, o in zip(items, orders) if set(it["choices_level3"]) & set(it["choices_level4"])]
    assert len(pick) == 83
    return [it for it, _ in pick], [o for _, o in pick]


def test_binary_repeated_names_reference_overwrites_robust_per_level(tmp_path, collision_items, cli):
    items, orders = collision_items
    lines = binary_lines(items, orders)
    ref_run = write_run(tmp_path / "ref", lines, "reference")
    rob_run = write_run(tmp_path / "rob", lines, "robust")

    # reference side, as metric_binary.py: answers stored by option text in level order (the species
    # answer overwrites the genus answer of the same text), then the first Yes in letter order
    records = []
    for it, order in zip(items, orders):
        rec: dict = {}
        for lv in range(1, 5):
            for i, opt in enumerate(order[lv]):
                rec[opt] = binary_model(it, lv, opt, i)
            rec[f"ground_truth_level{lv}"] = it[f"level{lv}"]
            rec[f"choices_level{lv}"] = dict(zip(LETTERS, order[lv]))
        records.append(rec)
    ref = ref_metrics(*ref_extract_binary(records))

    # robust side: per level, the first option (letter order) answered Yes
    ys, ps = [], []
    for it, order in zip(items, orders):
        ys.append([it[f"level{lv}"] for lv in range(1, 5)])
        ps.append([next((o for i, o in enumerate(order[lv]) if binary_model(it, lv, o, i)), None) for lv in range(1, 5)])
    rob = ref_metrics(ys, ps)

    rc, out, err = cli("report", "--json", ref_run)
    assert rc == 0, err
    assert_same(json.loads(out), ref)
    rc, out, err = cli("report", "--json", rob_run)
    assert rc == 0, err
    assert_same(json.loads(out), rob)
    # the model is always right at genus; the reference reads the species answers there
    assert rob["per_level"][3] == 100.0
    assert ref["per_level"][3] < rob["per_level"][3] and ref["por"] < rob["por"]
    assert ref["per_level"][3] == pytest.approx(sum(
        next((o for o in order[3] if (o == it["level3"] if o not in order[4] else order[4].index(o) == 0)), None)
        == it["level3"] for it, order in zip(items, orders)) / 83 * 100)

    # the export is what metric_binary.py reads, and `harness report` of the export agrees
    out_json = tmp_path / "ref.json"
    rc, _, err = cli("report", ref_run, "--reference-format", out_json)
    assert rc == 0, err
    assert "metric_binary.py" in err
    exported = json.loads(out_json.read_text())
    assert_same(json.loads(cli("report", "--json", ref_run)[1]), ref_metrics(*ref_extract_binary(exported)))
    rc, out, _ = cli("report", "--json", out_json)
    assert_same(json.loads(out), ref)


def _mc_lines(items, preds, *, none_truth_level: int | None = None, ask_none: bool = True) -> list[dict]:
    """Multiple-choice result lines (file option order) with given predictions per item and level."""
    lines = []
    for k, (it, pr) in enumerate(zip(items, preds)):
        for lv in range(1, 5):
            truth = it[f"level{lv}"]
            if lv == none_truth_level:
                truth = None
                if not ask_none:
                    continue
            choices = dict(zip(LETTERS, it[f"choices_level{lv}"]))
            pred = pr[lv - 1]
            letter = next((L for L, o in choices.items() if o == pred), None)
            lines.append({"qid": f"{k}:{lv}", "item": f"item{k}", "level": lv, "truth": truth, "choices": choices,
                          "letter": letter, "prediction": pred, "raw": letter or "I am not sure",
                          "error": None, "scored": True})
    return lines


def _fake_preds(items, seed=7) -> list[list[str | None]]:
    """Deterministic answers: right with level-dependent odds, a distractor or unparsed otherwise."""
    rng = random.Random(seed)
    odds = {1: 0.9, 2: 0.7, 3: 0.5, 4: 0.4}
    out = []
    for it in items:
        row = []
        for lv in range(1, 5):
            u = rng.random()
            if u < odds[lv]:
                row.append(it[f"level{lv}"])
            elif u < 0.95:
                row.append(next(o for o in it[f"choices_level{lv}"] if o != it[f"level{lv}"]))
            else:
                row.append(None)  # unparsed: "Unknown" in the reference
        out.append(row)
    return out


def test_none_truth_level_reference_fails_hca_robust_skips(tmp_path, cli):
    items = cub_items()[:40]
    preds = [[it[f"level{lv}"] for lv in range(1, 5)] for it in items]  # every answer right
    # half the items have no family truth (as in the non-public files); the level is asked anyway
    lines = []
    for k in range(40):
        lines += [ln | {"qid": f"{k}:{ln['level']}", "item": f"item{k}"}
                  for ln in _mc_lines([items[k]], [preds[k]], none_truth_level=2 if k % 2 else None)]
    ref_run = write_run(tmp_path / "ref", lines, "reference")
    rob_run = write_run(tmp_path / "rob", [ln for ln in lines if ln["truth"] is not None], "robust")
    ref = json.loads(cli("report", "--json", ref_run)[1])
    rob = json.loads(cli("report", "--json", rob_run)[1])
    # metric.py: the None truth is skipped but the prediction stays, so the lists differ: HCA fails
    records, start, _ = reference_export(ref_run)
    assert start == 1
    want = ref_metrics(*ref_extract(records, 1))
    assert_same(ref, want)
    assert ref["hca"] == 50.0 and want["hca"] == 50.0
    assert rob["hca"] == 100.0 and rob["n_items"] == 40


def test_export_read_back_by_reference_metric_matches_report(tmp_path, cli):
    items = cub_items()[:300]
    lines = _mc_lines(items, _fake_preds(items))
    lines[5] |= {"prediction": None, "letter": None, "raw": None, "error": "HTTP 500"}  # a failed request
    for proto in ("robust", "reference"):
        run = write_run(tmp_path / proto, lines, proto)
        out_json = tmp_path / f"{proto}.json"
        rc, _, err = cli("report", run, "--reference-format", out_json)
        assert rc == 0, err
        assert "metric.py --cub" in err
        exported = json.loads(out_json.read_text())
        assert len(exported) == 300
        assert exported[1]["predicted_level2"] == lines[5]["prediction"] or exported[1]["predicted_level2"] == "Error"
        assert {k for k in exported[0] if k.endswith("level1")} == {
            "ground_truth_level1", "predicted_level1", "prediction_level1", "choices_level1"}
        report = json.loads(cli("report", "--json", run)[1])
        assert_same(report, ref_metrics(*ref_extract(exported, 1)))
        again = json.loads(cli("report", "--json", out_json)[1])
        for k in ("n_items", "hca", "leaf_acc", "por", "strict_por", "tor", "per_level"):
            assert again[k] == pytest.approx(report[k], rel=1e-12), k
    assert exported[1]["predicted_level2"] == "Error"


def test_report_json_full_precision_exact_fractions(tmp_path, cli):
    """Three CUB items: HCA 1/3, leaf 2/3 -> 100/3 and 200/3 unrounded (the reference's arithmetic)."""
    items = cub_items()[:3]
    preds = [[it[f"level{lv}"] for lv in range(1, 5)] for it in items]
    preds[1][1] = items[1]["choices_level2"][1] if items[1]["choices_level2"][1] != items[1]["level2"] else items[1]["choices_level2"][0]
    preds[2][3] = None
    preds[2][2] = None
    run = write_run(tmp_path / "r", _mc_lines(items, preds), "robust")
    j = json.loads(cli("report", "--json", run)[1])
    F = Fraction
    exact = {"hca": F(1, 3), "leaf_acc": F(2, 3), "por": (1 + F(3, 4) + F(2, 4)) / 3,
             "strict_por": (1 + F(1, 4) + F(2, 4)) / 3, "tor": (1 + F(1, 3) + F(1, 3)) / 3}
    for k, v in exact.items():
        assert j[k] == pytest.approx(float(v * 100), rel=1e-15, abs=0), k
        assert j[k] != round(j[k], 4) or float(v * 100) == round(float(v * 100), 4), k  # not rounded
    assert j["hca"] == 1 / 3 * 100 and j["leaf_acc"] == 2 / 3 * 100  # bit for bit as metric.py prints
    assert j["per_level"]["2"] == 2 / 3 * 100 and j["per_level"]["3"] == 2 / 3 * 100
    # summary.json / harness.report() carry the same dict
    import harness

    got = harness.report(run)[0]
    assert got["hca"] == j["hca"] and got["por"] == j["por"]
    assert summarize_results(run / "results.jsonl").to_json()["tor"] == j["tor"]
