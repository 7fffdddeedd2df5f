"""The annotation reader: the shipped CUB files, validation errors, image-root mapping, roots."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from harness.data.items import ItemError, ReadReport, detect_taxonomy, parse_root_map, read_items, remap
from harness.paths import data_dir

REPO_CUB = data_dir("hierarchy") / "CUB200_with_similar_choice.jsonl"
from harness.data.stats import stats

AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


# ------------------------------------------------------------------ the shipped CUB files

def test_cub_file_reads_5794_items_with_4_levels(cub_items):
    assert len(cub_items) == 5794
    assert {len(it.levels) for it in cub_items} == {4}
    assert len({it.id for it in cub_items}) == 5794
    for it in cub_items:
        assert [lv.n for lv in it.levels] == [1, 2, 3, 4]
        assert it.label.lower() == it.leaf.truth
        for lv in it.levels:
            assert len(lv.choices) == 4 and lv.truth in lv.choices and not lv.root
    first = cub_items[0]
    assert first.label == "Black-footed Albatross" and first.split == "test" and first.line == 1
    assert first.levels[0].truth == "procellariiformes"
    assert first.levels[2].choices == ("stercorarius", "phoebastria", "fregata", "hydroprogne")
    assert first.image.startswith(AUTHORS_PREFIX + "/CUB_200_2011/images/001.Black_footed_Albatross/")


def test_cub_distinct_truths_per_level(cub_items):
    assert [len({it.levels[k].truth for it in cub_items}) for k in range(4)] == [13, 37, 124, 200]


def test_truth_position_about_uniform_in_file(cub_items):
    pos = Counter(lv.choices.index(lv.truth) for it in cub_items for lv in it.levels)
    assert sum(pos.values()) == 23176
    assert all(abs(c - 23176 / 4) < 0.05 * 23176 for c in pos.values()), pos


def test_similar_and_random_files_share_images_labels_truths(cub_random, cub_items):
    rnd = list(read_items(cub_random))
    assert [(i.image, i.label, [lv.truth for lv in i.levels]) for i in rnd] == \
        [(i.image, i.label, [lv.truth for lv in i.levels]) for i in cub_items]
    assert any(a.levels[3].choices != b.levels[3].choices for a, b in zip(rnd, cub_items))


def test_data_stats_on_cub(cub_similar):
    s = stats(cub_similar)
    assert s["items"] == 5794 and s["questions"] == 23176 and s["scored_questions"] == 23176
    assert s["depths"] == {4: 5794}
    assert [lv["distinct_truths"] for lv in s["levels"].values()] == [13, 37, 124, 200]
    assert all(lv["options"] == {4: 5794} and not lv["root"] for lv in s["levels"].values())
    assert s["skipped_lines"] == []


# ------------------------------------------------------------------ validation errors

def _good(i: int = 0) -> dict:
    return {"image": f"/img/{i}.jpg", "label": "Cat", "split": "test",
            "level1": "mammal", "choices_level1": ["mammal", "bird", "fish", "reptile"],
            "level2": "cat", "choices_level2": ["dog", "cat", "cow", "pig"]}


def _bad_cases() -> dict[str, tuple[str, str | None, str]]:
    """name -> (raw line, field named in the error, words in the message)."""
    def rec(**kw) -> str:
        r = _good(1)
        for k, v in kw.items():
            if v is _DROP:
                r.pop(k)
            else:
                r[k] = v
        return json.dumps(r)

    names27 = [f"n{k}" for k in range(27)]
    return {
        "invalid-json": ('{"image": "/img/1.jpg", "label": ', None, "invalid JSON"),
        "not-an-object": ("[1, 2, 3]", None, "expected a JSON object"),
        "missing-image": (rec(image=_DROP), "image", "missing field"),
        "missing-label": (rec(label=_DROP), "label", "missing field"),
        "empty-label": (rec(label=""), "label", "non-empty string"),
        "level-without-choices": (rec(choices_level2=_DROP), "choices_level2", "missing field"),
        "choices-without-level": (rec(level2=_DROP), "level2", "missing field"),
        "truth-not-among-choices": (rec(level2="horse"), "choices_level2", "not among the choices"),
        "duplicate-choices": (rec(choices_level2=["cat", "dog", "Cat", "cow"]), "choices_level2", "duplicate"),
        "one-choice-non-root": (rec(choices_level2=["cat"]), "choices_level2", "at least 2"),
        "27-choices": (rec(level2="n0", choices_level2=names27), "choices_level2", "27 choices"),
        "non-contiguous": (rec(level2=_DROP, choices_level2=_DROP, level3="cat",
                               choices_level3=["cat", "dog"]), "level2", "contiguous"),
        "choices-not-a-list": (rec(choices_level2="cat"), "choices_level2", "list of strings"),
        "truth-not-a-string": (rec(level2=3), "level2", "string or null"),
        "no-levels": (json.dumps({"image": "/i.jpg", "label": "x"}), "level1", "no levelN"),
    }


_DROP = object()
BAD = _bad_cases()


def _write(tmp_path, lines: list[str], name: str = "items.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.mark.parametrize("case", sorted(BAD))
def test_error_names_file_line_and_field(tmp_path, case):
    raw, field, words = BAD[case]
    f = _write(tmp_path, [json.dumps(_good(0)), raw, json.dumps(_good(2))])
    got = []
    with pytest.raises(ItemError) as ei:
        for it in read_items(f):  # strict by default
            got.append(it)  # noqa: PERF402 (keep what was yielded before the error)
    e = ei.value
    # the item before the bad line was already yielded; nothing after it
    assert [it.id for it in got] == ["/img/0.jpg"]
    assert e.file == str(f) and e.line == 2 and e.field == field
    msg = str(e)
    assert msg.startswith(f"{f}:2")
    assert words in msg
    if field is not None:
        assert repr(field) in msg


def test_non_strict_skips_and_records(tmp_path):
    lines = [json.dumps(_good(0))] + [BAD[c][0] for c in sorted(BAD)] + [json.dumps(_good(99))]
    f = _write(tmp_path, lines)
    report = ReadReport()
    items = list(read_items(f, strict=False, report=report))
    assert [it.id for it in items] == ["/img/0.jpg", "/img/99.jpg"]
    assert report.n_read == 2 and bool(report)
    assert [e.line for e in report.errors] == list(range(2, 2 + len(BAD)))
    assert [e.field for e in report.errors] == [BAD[c][1] for c in sorted(BAD)]
    assert all(e.file == str(f) for e in report.errors)
    s = stats(f)
    assert s["items"] == 2 and len(s["skipped_lines"]) == len(BAD)
    assert s["skipped_lines"][0].startswith(f"{f}:2")


def test_blank_lines_skipped_but_counted(tmp_path):
    f = tmp_path / "blank.jsonl"
    f.write_text(json.dumps(_good(0)) + "\n\n   \n" + json.dumps(_good(1)) + "\n" + BAD["missing-label"][0] + "\n")
    with pytest.raises(ItemError) as ei:
        list(read_items(f))
    assert ei.value.line == 5
    assert [it.line for it in read_items(f, strict=False)] == [1, 4]


def test_levels_sorted_numerically_and_none_truth(tmp_path):
    r = {"image": "/x.jpg", "label": "leaf"}
    for n in range(1, 12):
        r[f"level{n}"] = f"t{n}"
        r[f"choices_level{n}"] = [f"t{n}", f"u{n}"]
    r["level5"] = None
    f = _write(tmp_path, [json.dumps(r)])
    (it,) = read_items(f)
    assert [lv.n for lv in it.levels] == list(range(1, 12))  # 10 and 11 after 9, not after 1
    assert it.levels[4].truth is None
    assert it.levels[10].truth == "t11"


def test_single_choice_root_level_accepted_and_marked(tmp_path):
    r = {"image": "/a.jpg", "label": "tabby", "level1": "animal", "choices_level1": ["animal"],
         "level2": "vertebrate", "choices_level2": ["invertebrate", "vertebrate"],
         "level3": "cat", "choices_level3": ["cat", "dog", "cow", "pig"]}
    r2 = dict(r, image="/b.jpg", level1="Animalia", choices_level1=["Animalia", "Plantae", "Fungi", "x"])
    f = _write(tmp_path, [json.dumps(r), json.dumps(r2)])
    a, b = read_items(f)
    assert a.levels[0].root and a.levels[0].choices == ("animal",)
    assert not a.levels[1].root and len(a.levels[1].choices) == 2
    assert b.levels[0].root  # a root name at level 1 with several options is still the root
    s = stats(f)
    assert s["questions"] == 6 and s["scored_questions"] == 4 and s["levels"]["1"]["root"]


def test_root_name_below_level_1_is_not_root(tmp_path):
    r = _good(0) | {"level2": "animal", "choices_level2": ["animal", "plant"]}
    (it,) = read_items(_write(tmp_path, [json.dumps(r)]))
    assert not it.levels[1].root


def test_duplicate_images_get_distinct_ids(tmp_path):
    f = _write(tmp_path, [json.dumps(_good(0))] * 3)
    assert [it.id for it in read_items(f)] == ["/img/0.jpg", "/img/0.jpg#2", "/img/0.jpg#3"]


def test_explicit_id_and_taxonomy(tmp_path):
    f = _write(tmp_path, [json.dumps(_good(0) | {"id": 17, "taxonomy": "cub"})])
    (it,) = read_items(f)
    assert it.id == "17" and it.taxonomy == "cub"


# ------------------------------------------------------------------ image root mapping

def test_image_root_map_rewrites_authors_prefix(cub_similar):
    items = list(read_items(cub_similar, root_map=[f"{AUTHORS_PREFIX}=/data/sets"]))
    assert len(items) == 5794
    assert all(it.image.startswith("/data/sets/CUB_200_2011/images/") for it in items)
    assert items[0].image == ("/data/sets/CUB_200_2011/images/001.Black_footed_Albatross/"
                              "Black_Footed_Albatross_0001_796111.jpg")
    # the id stays the original path: results do not depend on where the images live
    assert items[0].id.startswith(AUTHORS_PREFIX)


def test_longest_prefix_wins(tmp_path):
    f = _write(tmp_path, [json.dumps(_good(0) | {"image": AUTHORS_PREFIX + "/CUB/x.jpg"})])
    specs = ["/projectnb=/short", f"{AUTHORS_PREFIX}=/long", "/projectnb/ivc-ml=/mid"]
    (it,) = read_items(f, root_map=specs)
    assert it.image == "/long/CUB/x.jpg"
    (it,) = read_items(f, root_map=list(reversed(specs)))
    assert it.image == "/long/CUB/x.jpg"
    # pairs given directly, shortest first: the longest still wins
    (it,) = read_items(f, root_map=[("/projectnb", "/short"), (AUTHORS_PREFIX, "/long")])
    assert it.image == "/long/CUB/x.jpg"
    (it,) = read_items(f, root_map=["/elsewhere=/nothing"])
    assert it.image == AUTHORS_PREFIX + "/CUB/x.jpg"


def test_parse_root_map():
    assert parse_root_map(["/a=/b", "/a/b/c=/x=y"]) == [("/a/b/c", "/x=y"), ("/a", "/b")]
    assert remap("/a/b/c/d.jpg", parse_root_map(["/a=/b", "/a/b/c=/z"])) == "/z/d.jpg"
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_root_map(["/no/equals/sign"])


def test_a_byte_order_mark_does_not_lose_the_first_item(tmp_path):
    lines = (REPO_CUB.read_bytes().splitlines())[:3]
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    report = ReadReport()
    assert len(list(read_items(p, strict=False, report=report))) == 3 and not report.errors


def test_duplicate_items_are_counted_and_named(tmp_path):
    lines = (REPO_CUB.read_bytes().splitlines())[:2]
    p = tmp_path / "dup.jsonl"
    p.write_bytes(b"\n".join(lines + lines[:1]) + b"\n")
    report = ReadReport()
    items = list(read_items(p, report=report))
    assert [i.id.endswith("#2") for i in items] == [False, False, True]
    assert report.duplicates == 1 and report.first_duplicate.startswith(f"{p}:3: ")


def test_an_empty_file_says_so(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"\n\n")
    with pytest.raises(ValueError, match="no items \\(the file is empty\\)"):
        detect_taxonomy(tmp_path / "e.jsonl")
    (tmp_path / "bad.jsonl").write_bytes(b'{"image": 1}\n')
    with pytest.raises(ValueError, match="no valid item among the first lines; first error: .*bad.jsonl:1"):
        detect_taxonomy(tmp_path / "bad.jsonl")
