"""Cross-run analyses on constructed runs whose per-item outcomes (hence HCA, leaf accuracy,
per-level accuracy and the correlations between runs) are known in advance; figures written."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from harness.study import analysis as an

CUB_FILE = "CUB200_with_similar_choice.jsonl"


def make_run(folder: Path, *, model: str, outcomes: list[tuple[bool, ...]], taxonomy: str = "cub", mode: str = "image",
             variant: int | str = 0, data: str = CUB_FILE, answer: str = "generate", protocol: str = "robust",
             cell: dict | None = None) -> Path:
    """A run folder: results.jsonl with one line per (item, level) right or wrong as `outcomes` says
    (text mode: the last level auto-filled, as `harness run --mode text` writes it), and run.json."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(outcomes):
        for lv, ok in enumerate(item, start=1):
            truth = f"t{lv}-{i % 3}"
            auto = mode == "text" and lv == len(item)
            rec = {"qid": f"{i}-{lv}", "item": f"img{i}", "level": lv, "truth": truth,
                   "choices": {"A": truth, "B": "wrong"}, "letter": None if auto else ("A" if ok else "B"),
                   "prediction": truth if (ok or auto) else "wrong", "raw": "A", "error": None, "scored": True}
            if auto:
                rec["auto"] = True
            lines.append(orjson.dumps(rec))
    (folder / "results.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    settings = {"model": model, "data": f"/somewhere/{data}", "answer": answer, "protocol": protocol,
                "prompt": {"taxonomy": taxonomy, "mode": mode, "variant": variant}}
    (folder / "run.json").write_bytes(orjson.dumps({"status": "done", "settings": settings}))
    if cell is not None:
        (folder / "plan-cell.json").write_bytes(orjson.dumps(cell))
    return folder


def outcomes(n: int, hca: int, leaf_only: int = 0, levels: int = 4) -> list[tuple[bool, ...]]:
    """n items: `hca` fully right, `leaf_only` with the leaf right but level 1 wrong, the rest all wrong."""
    full = [(True,) * levels] * hca
    lo = [(False,) + (True,) * (levels - 1)] * leaf_only
    return full + lo + [(False,) * levels] * (n - hca - leaf_only)


def text_outcomes(n: int, hca: int, levels: int = 4) -> list[tuple[bool, ...]]:
    """Text mode: HCA = all non-leaf levels right (the leaf is filled in)."""
    return [(True,) * levels] * hca + [(False,) * (levels - 1) + (True,)] * (n - hca)


def test_table_gap_and_levels_of_a_known_run(tmp_path):
    make_run(tmp_path / "r", model="m", outcomes=outcomes(10, hca=3, leaf_only=5))
    (r,) = an.load_runs([tmp_path])
    assert (r.label, r.model, r.taxonomy, r.mode, r.variant, r.data) == ("r", "m", "cub", "image", "0", CUB_FILE)
    assert r.hca == pytest.approx(30.0) and r.leaf == pytest.approx(80.0)
    (gap,) = an.leaf_gap([r])
    assert gap["gap"] == pytest.approx(50.0) and gap["leaf_right_ancestor_wrong"] == pytest.approx(50.0)
    levels = an.per_level_rows([r])
    assert [(x["level_name"], round(x["accuracy"], 6)) for x in levels] == [
        ("order", 30.0), ("family", 80.0), ("genus", 80.0), ("species", 80.0)]
    rows = an.table_rows([r])
    csv_text = an.to_csv(rows, an.TABLE_COLUMNS)
    assert csv_text.splitlines()[0].startswith("run,model,taxonomy,mode,variant")
    assert ",30.0," in csv_text.splitlines()[1] and ",80.0," in csv_text.splitlines()[1]
    md = an.to_markdown(rows, an.SHORT_COLUMNS)
    assert "| r | m | cub | image | 0 | 10 | 30.00 | 80.00 | 50.00 | 0 |" in md


def _five_models(root: Path, text: list[int], visual: list[int], *, llm_names: list[str] | None = None) -> None:
    for k, (t, v) in enumerate(zip(text, visual)):
        vlm = f"vlm{k}"
        make_run(root / vlm / "image", model=vlm, outcomes=outcomes(10, hca=v))
        make_run(root / vlm / "text", model=llm_names[k] if llm_names else vlm, mode="text", variant=1,
                 outcomes=text_outcomes(10, hca=t))


def test_text_vs_visual_correlation_known_value(tmp_path):
    # text HCA 10..50, visual 20,10,40,30,50: Pearson = Spearman = 0.8 exactly
    _five_models(tmp_path, [1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    runs = an.load_runs([tmp_path])
    pts = an.text_visual_points(runs)
    assert [(p.model, p.text_hca, p.visual_hca) for p in pts] == [
        ("vlm0", 10.0, 20.0), ("vlm1", 20.0, 10.0), ("vlm2", 30.0, 40.0), ("vlm3", 40.0, 30.0), ("vlm4", 50.0, 50.0)]
    (c,) = an.correlations(pts, draws=500)
    assert c.n == 5 and c.n_models == 5
    assert c.pearson == pytest.approx(0.8) and c.spearman == pytest.approx(0.8)
    assert c.slope == pytest.approx(0.8) and c.intercept == pytest.approx(6.0)
    lo, hi = c.pearson_ci
    assert -1.0 <= lo < 0.8 < hi <= 1.0 + 1e-9
    assert c.spearman_ci[0] < 0.8 < c.spearman_ci[1] + 1e-9


def test_perfect_and_reversed_and_degenerate_correlations():
    c = an.correlate([10, 20, 30, 40], [5, 10, 15, 20], draws=300)
    assert c.pearson == pytest.approx(1.0) and c.spearman == pytest.approx(1.0)
    assert c.pearson_ci == pytest.approx((1.0, 1.0)) and c.slope == pytest.approx(0.5)
    r = an.correlate([1, 2, 3, 4, 5], [9, 8, 7, 2, 1], draws=300)
    assert r.spearman == pytest.approx(-1.0) and r.pearson < -0.9
    assert math.isnan(an.correlate([1, 2], [3, 4]).pearson)  # two points: nothing to say
    assert math.isnan(an.correlate([1, 2, 3], [4, 4, 4]).pearson)  # constant side


def test_bootstrap_resamples_models_not_points():
    # two models, three taxonomies each: only two groups -> no interval, although n = 6
    c = an.correlate([1, 2, 3, 4, 5, 6], [1, 3, 2, 5, 4, 6], ["a", "a", "a", "b", "b", "b"], draws=200)
    assert c.n == 6 and c.n_models == 2 and not math.isnan(c.pearson)
    assert all(math.isnan(x) for x in c.pearson_ci)


def test_pair_text_uses_another_models_text_runs(tmp_path):
    # the VLMs' own text runs are absent; the OG LLMs llm0..llm4 ran text mode
    _five_models(tmp_path, [1, 2, 3, 4, 5], [1, 2, 3, 4, 5], llm_names=[f"llm{k}" for k in range(5)])
    runs = an.load_runs([tmp_path])
    assert an.text_visual_points(runs) == []
    pts = an.text_visual_points(runs, {f"vlm{k}": f"llm{k}" for k in range(5)})
    assert [(p.model, p.text_model) for p in pts] == [(f"vlm{k}", f"llm{k}") for k in range(5)]
    assert an.correlations(pts, draws=100)[0].pearson == pytest.approx(1.0)


def test_profile_variant_is_preferred_over_other_variants(tmp_path):
    cell = {"model": "q", "profile": "qwen2.5-vl-7b", "profile_variant": 1}
    make_run(tmp_path / "v0", model="Q/served", variant=0, outcomes=outcomes(10, 1), cell=cell | {"variant": 0})
    make_run(tmp_path / "v1", model="Q/served", variant=1, outcomes=outcomes(10, 5), cell=cell | {"variant": 1})
    make_run(tmp_path / "t", model="Q/served", mode="text", variant=1, outcomes=text_outcomes(10, 7), cell=cell)
    runs = an.load_runs([tmp_path])
    assert {r.model for r in runs} == {"q"} and all("Q/served" in r.names for r in runs)
    (p,) = an.text_visual_points(runs)
    assert (p.visual_hca, p.text_hca, p.n_visual_runs) == (50.0, 70.0, 1)


def test_variant_spread_and_finetune_deltas(tmp_path):
    for v, h in enumerate([1, 2, 3, 4, 5]):
        make_run(tmp_path / "base" / f"img-v{v}", model="base", variant=v, outcomes=outcomes(10, h))
    make_run(tmp_path / "base" / "text", model="base", mode="text", variant=1, outcomes=text_outcomes(10, 2))
    make_run(tmp_path / "ft" / "img-v1", model="base", variant=1, outcomes=outcomes(10, 3))  # served under the same name
    make_run(tmp_path / "ft" / "text", model="base", mode="text", variant=1, outcomes=text_outcomes(10, 6))
    runs = an.load_runs([tmp_path / "base"])
    (s,) = an.variant_spread(runs)
    assert s.variants == ("0", "1", "2", "3", "4") and s.hca == (10.0, 20.0, 30.0, 40.0, 50.0)
    assert (s.mean, s.min, s.max) == (30.0, 10.0, 50.0) and s.std == pytest.approx(math.sqrt(200))
    runs = an.load_runs([tmp_path])
    deltas = an.finetune_deltas(runs, [(str(tmp_path / "base"), str(tmp_path / "ft"))])
    got = {(d.mode, d.variant): (d.hca_before, d.hca_after, d.hca_delta) for d in deltas}
    assert got == {("image", "1"): (20.0, 30.0, 10.0), ("text", "1"): (20.0, 60.0, 40.0)}
    with pytest.raises(ValueError, match="no runs match 'nothing'"):
        an.finetune_deltas(runs, [("nothing", str(tmp_path / "ft"))])


def _png_ok(p: Path) -> bool:
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_analyze_writes_tables_figures_and_report(tmp_path):
    _five_models(tmp_path / "runs", [1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    for v, h in enumerate([2, 4, 3]):
        make_run(tmp_path / "runs" / "vlm0" / f"image-v{v + 1}", model="vlm0", variant=v + 1, outcomes=outcomes(10, h, 3))
    from harness.cli import main

    rc = main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--draws", "200",
               "--compare", "vlm0=vlm1"])
    assert rc == 0
    out = tmp_path / "out"
    for name in ("text_vs_visual", "per_level", "hca_vs_leaf", "variant_spread", "finetune_deltas"):
        assert _png_ok(out / f"{name}.png"), name
    report = (out / "report.md").read_text()
    for name in ("text_vs_visual.png", "per_level.png", "hca_vs_leaf.png", "variant_spread.png"):
        assert f"]({name})" in report
    data = orjson.loads((out / "analysis.json").read_bytes())
    assert len(data["runs"]) == 13
    # vlm0 now has 4 image variants (own variant unknown): its point averages them
    p0 = next(p for p in data["text_vs_visual"] if p["model"] == "vlm0")
    assert p0["n_visual_runs"] == 4 and p0["visual_hca"] == pytest.approx((20 + 20 + 40 + 30) / 4)
    (spread,) = data["variant_spread"]
    assert spread["variants"] == "0,1,2,3" and spread["min"] == 20.0 and spread["max"] == 40.0
    assert (out / "runs.csv").read_text().count("\n") == 14
    deltas = {(d["mode"], d["variant"]): d["hca_delta"] for d in data["finetune_deltas"]}
    assert deltas == {("image", "0"): -10.0, ("text", "1"): 10.0}
    assert "Mean HCA change: image -10.00, text +10.00" in report
