"""results.jsonl: record format, append-only store, resume scan, and the metric readers."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data.items import Item, Level
from harness.metrics.hierarchy import summarize
from harness.prompts.hierarchy import PromptConfig, Renderer
from harness.runs.results import ResultStore, repair_tail, write_jsonl
from harness.tasks.hierarchy import record
from harness.metrics.readers import iter_records
from harness.metrics.readers import summarize_reference, summarize_results

CONTRACT_FIELDS = {"qid", "item", "level", "truth", "choices", "letter", "prediction", "raw", "error"}


def _item(label="Black-footed Albatross"):
    return Item("img-1", "/i/1.jpg", label, (
        Level(1, "procellariiformes", ("procellariiformes", "apodiformes", "podicipediformes", "pelecaniformes")),
        Level(2, "diomedeidae", ("diomedeidae", "stercorariidae", "alcidae", "podicipedidae")),
        Level(3, "phoebastria", ("stercorarius", "phoebastria", "fregata", "hydroprogne")),
        Level(4, "black-footed albatross", ("black-footed albatross", "sooty albatross", "pomarine jaeger",
                                            "laysan albatross")),
    ))


def _approx(a, b):
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


# ------------------------------------------------------------------ record

def test_record_has_contract_fields():
    q = Renderer(PromptConfig(taxonomy="cub", option_order="file")).render(_item())[2]
    rec = record(q, letter="B", raw="B", error=None)
    assert CONTRACT_FIELDS <= set(rec)
    assert rec["item"] == "img-1" and rec["level"] == 3 and rec["truth"] == "phoebastria"
    assert rec["choices"] == {"A": "stercorarius", "B": "phoebastria", "C": "fregata", "D": "hydroprogne"}
    assert rec["prediction"] == "phoebastria" and rec["scored"] is True and rec["error"] is None
    bad = record(q, letter=None, raw=None, error="timeout", latency=1.5)
    assert bad["prediction"] is None and bad["error"] == "timeout" and bad["latency"] == 1.5
    assert orjson.loads(orjson.dumps(rec)) == rec


def test_record_text_leaf_auto_and_binary_option():
    qs = Renderer(PromptConfig(taxonomy="cub", mode="text", option_order="file")).render(_item())
    leaf = record(qs[3], letter=None, raw=None, error=None)
    assert leaf["auto"] is True and leaf["prediction"] == "Black-footed Albatross" and leaf["level"] == 4
    b = Renderer(PromptConfig(taxonomy="cub", mode="binary", option_order="file")).render(_item())[5]
    rb = record(b, letter=None, raw="Yes", error=None, yes=1)
    assert rb["option"] == "B" and rb["yes"] == 1 and rb["level"] == 2


# ------------------------------------------------------------------ store, resume

def _rec(qid, item="i", level=1, truth="a", pred="a", error=None, **kw):
    return {"qid": qid, "item": item, "level": level, "truth": truth, "choices": {"A": truth, "B": "zz"},
            "letter": "A" if pred == truth else None, "prediction": pred, "raw": pred, "error": error,
            "scored": True, **kw}


def test_store_round_trip_and_batched_flush(tmp_path):
    path = tmp_path / "run" / "results.jsonl"
    store = ResultStore(path, flush_every=3, flush_seconds=3600)
    store.open()
    store.append(_rec("q1"))
    store.append(_rec("q2"))
    assert path.read_bytes() == b""  # buffered
    store.append(_rec("q3"))  # third: flushed as one write
    assert len(path.read_bytes().splitlines()) == 3
    store.append(_rec("q4"))
    store.close()  # close flushes the rest
    recs = list(iter_records(path))
    assert [r["qid"] for r in recs] == ["q1", "q2", "q3", "q4"]
    assert recs[0] == _rec("q1")
    assert path.read_bytes().endswith(b"\n")
    with ResultStore(path) as s2:  # reopening appends
        s2.append(_rec("q5"))
    done = ResultStore(path).scan()
    assert done == {"q1", "q2", "q3", "q4", "q5"}


def test_store_time_based_flush(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultStore(path, flush_every=10**6, flush_seconds=0.0) as s:
        s.append(_rec("q1"))
        assert len(path.read_bytes().splitlines()) == 1


def test_scan_repairs_torn_last_line(tmp_path):
    path = tmp_path / "results.jsonl"
    good = b"".join(orjson.dumps(_rec(f"q{i}")) + b"\n" for i in range(3))
    path.write_bytes(good + b'{"qid": "q3", "item": "i", "lev')
    done = ResultStore(path).scan()
    assert done == {"q0", "q1", "q2"}
    assert path.read_bytes() == good  # cut back to the last whole line
    with ResultStore(path) as s:  # the next append starts on a fresh line
        s.append(_rec("q3"))
    assert [r["qid"] for r in iter_records(path)] == ["q0", "q1", "q2", "q3"]


def test_repair_tail_cases(tmp_path):
    p = tmp_path / "r.jsonl"
    assert repair_tail(p) == 0  # missing file
    p.write_bytes(b"")
    assert repair_tail(p) == 0
    p.write_bytes(b'{"qid": "torn')
    assert repair_tail(p) == 13 and p.read_bytes() == b""
    p.write_bytes(b'{"a": 1}\n')
    assert repair_tail(p) == 0 and p.read_bytes() == b'{"a": 1}\n'
    big = b"x" * 200_000  # longer than one scan block
    p.write_bytes(b'{"a": 1}\n' + big)
    assert repair_tail(p) == len(big) and p.read_bytes() == b'{"a": 1}\n'


def test_iter_records_skips_corrupt_lines(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_bytes(b'{"qid": "a"}\nnot json\n{"qid": "b"}\n{"qid": "c"')
    assert [r["qid"] for r in iter_records(p)] == ["a", "b"]


def test_scan_retry_errors_semantics(tmp_path):
    path = tmp_path / "results.jsonl"
    write_jsonl(path, [
        _rec("ok"),
        _rec("err", pred=None, error="timeout"),
        _rec("fixed", pred=None, error="http 500"), _rec("fixed"),  # error, then success appended
        _rec("broke"), _rec("broke", pred=None, error="timeout"),  # success, then a later error line
        {"no": "qid"},
    ])
    done = ResultStore(path).scan()
    assert done == {"ok", "err", "fixed", "broke"}  # resume: everything present is finished
    done = ResultStore(path).scan(retry_errors=True)
    assert done == {"ok", "fixed"}  # the last line of a qid decides
    assert ResultStore(tmp_path / "none.jsonl").scan() == set()


# ------------------------------------------------------------------ summarize_results

def _constructed_file(path):
    """Known metrics (see test below). X and Y: ImageNet-like with a root level; T: a text-mode run
    with the leaf auto-filled; B: binary statements (written out of letter order)."""
    lines = [
        _rec("x1", "X", 1, "animal", None, error="timeout", scored=False),  # root, unanswered: not scored
        _rec("x2", "X", 2, "vertebrate", "vertebrate"),
        _rec("x3", "X", 3, "mammal", "Mammal"),
        _rec("y1", "Y", 1, "animal", "animal", scored=False),
        _rec("y2", "Y", 2, "vertebrate", "invertebrate"),
        _rec("y3", "Y", 3, "bird", None, error="http 503"),  # retried below: the last line wins
    ]
    qs = Renderer(PromptConfig(taxonomy="cub", mode="text", option_order="file")).render(_item())
    by_level = {q.level: q for q in qs}
    lines += [
        record(by_level[1], letter="A", raw="A", error=None),
        record(by_level[2], letter="C", raw="C", error=None),  # alcidae: wrong
        record(by_level[3], letter="B", raw="B", error=None),
        record(by_level[4], letter=None, raw=None, error=None),  # auto leaf
    ]

    def stmt(qid, level, truth, letter, yes, options):
        return {"qid": qid, "item": "B", "level": level, "truth": truth,
                "choices": dict(zip("ABCD", options)), "letter": None, "prediction": None,
                "raw": {1: "Yes", 0: "No", -1: "Maybe"}[yes], "error": None, "scored": True,
                "option": letter, "yes": yes}

    o, p = ["o1", "o2", "o3", "o4"], ["p1", "p2", "p3", "p4"]
    lines += [stmt("b1D", 1, "o2", "D", 0, o), stmt("b1A", 1, "o2", "A", 0, o),
              stmt("b1C", 1, "o2", "C", 1, o), stmt("b1B", 1, "o2", "B", 1, o),  # first Yes: B = truth
              stmt("b2C", 2, "p3", "C", 1, p), stmt("b2A", 2, "p3", "A", -1, p),
              stmt("b2B", 2, "p3", "B", 1, p), stmt("b2D", 2, "p3", "D", 0, p)]  # first Yes: B = wrong
    lines.append(_rec("y3", "Y", 3, "bird", "bird"))
    write_jsonl(path, lines)
    with path.open("ab") as f:
        f.write(b'{"qid": "y2", "item": "Y", "level": 2, "truth": "vertebrate", "prediction": "verteb')


def test_summarize_results_constructed(tmp_path):
    path = tmp_path / "results.jsonl"
    _constructed_file(path)
    s = summarize_results(path)
    # scored paths: X [vertebrate, mammal] all right; Y [vertebrate, bird] -> [invertebrate, bird];
    # T [order, family, genus, leaf] -> [right, wrong, right, auto right]; B [o2, p3] -> [o2, p2]
    assert s.n_items == 4
    assert _approx(s.hca, 25.0)
    assert _approx(s.leaf_acc, 75.0)
    assert _approx(s.por, (1 + 0.5 + 0.75 + 0.5) / 4 * 100)
    assert _approx(s.strict_por, (1 + 0 + 0.25 + 0.5) / 4 * 100)
    assert _approx(s.tor, (1 + 0 + 1 / 3 + 0) / 4 * 100)
    assert s.per_level == pytest.approx({"1": 100.0, "2": 25.0, "3": 100.0, "4": 100.0})
    assert s.per_level_n == {"1": 2, "2": 4, "3": 3, "4": 1}
    # questions: X 3 + Y 3 + T 3 asked (the auto leaf is not a question) + 8 statements
    assert s.n_questions == 17
    assert s.n_unanswered == 2  # x1 (root, timeout) and the "Maybe" statement
    assert s.n_errors == 1  # x1; y3's error was retried successfully


def test_summarize_results_last_line_wins(tmp_path):
    path = tmp_path / "results.jsonl"
    write_jsonl(path, [_rec("q", "I", 1, "a", "b"), _rec("q", "I", 1, "a", "a")])
    assert summarize_results(path).hca == 100.0
    write_jsonl(path, [_rec("q", "I", 1, "a", "a"), _rec("q", "I", 1, "a", None, error="x")])
    s = summarize_results(path)
    assert s.hca == 0.0 and s.n_errors == 1 and s.n_unanswered == 1 and s.n_questions == 1


def test_summarize_results_unanswered_counts_wrong_and_levels_sorted(tmp_path):
    path = tmp_path / "results.jsonl"
    # levels written out of order; level 2 unanswered
    write_jsonl(path, [_rec("q3", "I", 3, "c", "c"), _rec("q1", "I", 1, "a", "a"),
                       _rec("q2", "I", 2, "b", None, error="timeout")])
    s = summarize_results(path)
    assert s.n_items == 1 and s.hca == 0.0 and s.leaf_acc == 100.0
    assert _approx(s.strict_por, 100 / 3) and _approx(s.por, 200 / 3)
    assert s.per_level == {"1": 100.0, "2": 0.0, "3": 100.0}


def test_summarize_results_empty_file(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(b"")
    s = summarize_results(path)
    assert s.n_items == 0 and s.n_questions == 0


# ------------------------------------------------------------------ reference-format files

def _ref_record(truths, preds, start=1):
    r = {"image": "/x.jpg", "label": "x"}
    for k, t in enumerate(truths):
        r[f"ground_truth_level{start + k}"] = t
    for k, p in enumerate(preds):
        r[f"prediction_level{start + k}"] = p
        r[f"predicted_level{start + k}_letter"] = "A"
        r[f"predicted_level{start + k}"] = p
    return r


def test_summarize_reference_cub_from_level_1(tmp_path):
    data = [
        _ref_record(["procellariiformes", "diomedeidae", "phoebastria", "black-footed albatross"],
                    ["Procellariiformes", "diomedeidae", "phoebastria", "Black-footed Albatross"]),
        _ref_record(["passeriformes", "corvidae", "corvus", "common raven"],
                    ["passeriformes", "Unknown", "corvus", "common raven"]),
        _ref_record(["passeriformes", "corvidae", "corvus", "common raven"],
                    ["Error", "Error", "Error", "Error"]),
    ]
    f = tmp_path / "ref.json"
    f.write_text(json.dumps(data, indent=4))
    s = summarize_reference(f)
    assert s.n_items == 3
    assert _approx(s.hca, 100 / 3) and _approx(s.leaf_acc, 200 / 3)
    assert _approx(s.por, (1 + 0.75 + 0) / 3 * 100)
    assert s.per_level == pytest.approx({"1": 200 / 3, "2": 100 / 3, "3": 200 / 3, "4": 200 / 3})
    assert s.n_questions == 12


def test_summarize_reference_root_level_dropped(tmp_path):
    data = [
        _ref_record(["Animalia", "Chordata", "Aves"], ["Plantae", "Chordata", "Aves"]),
        _ref_record(["Animalia", "Arthropoda", "Insecta"], ["Animalia", "Chordata", "Insecta"]),
    ]
    f = tmp_path / "ref.json"
    f.write_text(json.dumps(data))
    s = summarize_reference(f)  # level 1 is the root "Animalia": scored from level 2
    assert s.n_items == 2 and list(s.per_level) == ["2", "3"]
    assert _approx(s.hca, 50.0) and s.per_level == {"2": 50.0, "3": 100.0}
    s1 = summarize_reference(f, score_from=1)
    assert list(s1.per_level) == ["1", "2", "3"] and s1.hca == 0.0


def test_summarize_reference_none_values_skipped_independently(tmp_path):
    data = [
        # truth None at level 3 but a prediction there: lists of 3 and 4 -> HCA fails (reference)
        _ref_record(["a", "b", None, "d"], ["a", "b", "c", "d"]),
        # every prediction None: excluded from N
        _ref_record(["a", "b"], [None, None]),
        # a None prediction is skipped, shifting the rest left (reference extraction)
        _ref_record(["a", "b", "c"], [None, "a", "b"]),
        # no truths at all: excluded
        _ref_record([None, None], ["a", "b"]),
    ]
    f = tmp_path / "ref.json"
    f.write_text(json.dumps(data))
    s = summarize_reference(f)
    assert s.n_items == 2
    # item 1: truth [a,b,d] pred [a,b,c,d]: hca 0, leaf 1, por 2/3; item 3: truth [a,b,c] pred [a,b]
    assert s.hca == 0.0 and _approx(s.leaf_acc, 50.0)
    assert _approx(s.por, (2 / 3 + 2 / 3) / 2 * 100)
    assert s.per_level == pytest.approx({"1": 100.0, "2": 100.0, "3": 0.0})  # d vs c; no prediction


def test_summarize_reference_rejects_non_list(tmp_path):
    f = tmp_path / "ref.json"
    f.write_text('{"ground_truth_level1": "a"}')
    with pytest.raises(ValueError, match="JSON list"):
        summarize_reference(f)


def _independent_extraction(data, start):
    """The reference's extract_hierarchies_from_results, written from the protocol text."""
    out = []
    for r in data:
        ts, ps = [], []
        lv = start
        while f"ground_truth_level{lv}" in r:
            if r[f"ground_truth_level{lv}"] is not None:
                ts.append(r[f"ground_truth_level{lv}"])
            lv += 1
        lv = start
        while f"predicted_level{lv}" in r:
            if r[f"predicted_level{lv}"] is not None:
                ps.append(r[f"predicted_level{lv}"])
            lv += 1
        if ts and ps:
            out.append((range(start, start + len(ts)), ts, ps))
    return out


_VALUE = st.one_of(st.none(), st.sampled_from(["a", "B", "c", "Unknown", "Error", "d"]))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(_VALUE, min_size=0, max_size=8), st.lists(_VALUE, min_size=0, max_size=8)),
                max_size=20),
       st.booleans())
def test_summarize_reference_matches_independent_extraction(tmp_path_factory, recs, rooted):
    data = []
    for truths, preds in recs:
        if rooted:
            truths, preds = ["animal", *truths], ["animal", *preds]
        data.append(_ref_record(truths, preds))
    f = tmp_path_factory.mktemp("ref") / "ref.json"
    f.write_text(json.dumps(data))
    start = 2 if rooted and data else 1
    s = summarize_reference(f)
    want = summarize(_independent_extraction(data, start))
    assert s.n_items == want.n_items
    for k in ("hca", "leaf_acc", "por", "strict_por", "tor", "por_f1"):
        assert _approx(getattr(s, k), getattr(want, k)), k
    assert s.per_level == pytest.approx(want.per_level)
