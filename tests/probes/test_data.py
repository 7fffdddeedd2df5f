"""Probing inputs: the shipped CUB probing file, label matching, errors naming file/line/field, the
text-probing sentences (reference level-naming bugs fixed), image-size rules, recipes."""

from __future__ import annotations

import pytest
from PIL import Image

from harness.data.imagelists import normalize_label
from harness.data.items import ItemError
from harness.data.taxonomy import load_taxonomy
from probes.data import level_names, read_image_items, shipped_probing_file, text_items
from probes.imaging import SizeRule, smart_resize
from probes.recipes import load_recipe, recipes

SENTENCE = load_recipe("text").sentence


def test_shipped_cub_probing_file_matches_the_taxonomy():
    items = list(read_image_items(shipped_probing_file("CUB200_all.jsonl"), taxonomy=load_taxonomy("cub"),
                                  root_map=["/projectnb/ivc-ml/yuwentan/dataset=/data"]))
    assert len(items) == 11788
    assert sum(i.split == "train" for i in items) == 5994 and sum(i.split == "test" for i in items) == 5794
    assert len({i.labels[-1] for i in items}) == 200
    first = items[0]
    assert first.labels == ("Procellariiformes", "Diomedeidae", "Phoebastria", "Black-footed Albatross")
    assert first.image.startswith("/data/CUB_200_2011/images/001.")
    assert first.id.startswith("/projectnb/")  # ids keep the file's path: stable across root maps
    assert normalize_label("Black footed Albatross") == normalize_label("Black-footed_Albatross")


def test_bad_lines_name_file_line_and_field(tmp_path):
    tax = load_taxonomy("cub")
    f = tmp_path / "x.jsonl"
    cases = [
        ('{"image": "a.jpg", "label": "Sooty Albatross"}', 1, "split", "missing field"),
        ('{"image": "a.jpg", "label": "Sooty Albatross", "split": "train"}\n{"image": "b.jpg", "label": "Dodo", "split": "test"}',
         2, "label", "'Dodo' is not a leaf"),
        ('{"image": "", "label": "x", "split": "train"}', 1, "image", "non-empty"),
        ("[1, 2]", 1, None, "expected a JSON object"),
        ('{"image": "a", "label": "b", "split": "t", "level2": "x"}', 1, "level1", "contiguous"),
    ]
    for text, line, fld, msg in cases:
        f.write_text(text + "\n")
        with pytest.raises(ItemError, match=msg) as e:
            list(read_image_items(f, taxonomy=tax))
        assert (e.value.line, e.value.field) == (line, fld)
        assert str(f) in str(e.value)
    f.write_text('{"image": "a", "label": "Dodo", "split": "t"}\n{"image": "a", "label": "Dodo", "split": "t", "level1": "x", "level2": null}\n')
    got = list(read_image_items(f, taxonomy=tax, skip_unmatched=True))
    assert [(i.id, i.labels) for i in got] == [("a", ("x", None))]  # levelN fields win over the taxonomy
    f.write_text('{"image": "a", "label": "Dodo", "split": "t"}\n')
    with pytest.raises(ItemError, match="pass a taxonomy"):
        list(read_image_items(f))


def test_text_sentences_fix_the_reference_level_names():
    """The reference named CUB's levels kingdom/phylum/class and stopped before the species."""
    cub = load_taxonomy("cub")
    names = level_names(cub, 4)
    assert names == ["order", "family", "genus", "species"]
    splits = {"train": shipped_probing_file("CUB200_train_taxonomy.json"),
              "test": shipped_probing_file("CUB200_test_taxonomy.json")}
    items = list(text_items(splits, SENTENCE, names))
    assert len(items) == 4 * (137 + 63)
    by_id = {i.id: i for i in items}
    assert by_id["Sooty Albatross|1"].text == (
        "Given the Sooty Albatross, what is its taxonomic classification at the order level? "
        "It belongs to Procellariiformes.")
    assert by_id["Sooty Albatross|4"].text.endswith("at the species level? It belongs to Sooty Albatross.")
    assert by_id["Black-footed Albatross|3"].split == "test" and by_id["Black-footed Albatross|3"].level == 3
    assert by_id["Black-footed Albatross|3"].group == "Black-footed Albatross"
    assert len(list(text_items(splits, SENTENCE, names, leaf=False))) == 3 * 200

    plant = load_taxonomy("inat_plant")
    pnames = level_names(plant, 7)
    assert pnames == ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
    p = list(text_items({"test": shipped_probing_file("Inat21_Plant_test_taxonomy.json")}, SENTENCE, pnames))
    assert len(p) == 7 * 1763
    order = next(i for i in p if i.id == "Houstonia longifolia|4")
    # the reference probed iNat-Plant "order" with the phylum index; here level 4 is the order
    assert order.text.endswith("at the order level? It belongs to Gentianales.")
    assert order.labels[3] == "Gentianales"


def test_smart_resize_and_size_rules():
    assert smart_resize(375, 500, 28, 4 * 784, 16384 * 784) == (364, 504)
    assert smart_resize(10, 10, 28, 56 * 56, 1280 * 784) == (56, 56)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(1, 300, 28, 1, 10**9)
    big = Image.new("RGB", (2000, 1000))
    # 2000x1000 -> qwen-vl-utils 1988x1008 -> cap 1680 (int truncation) -> smart resize within 28*28*1280
    assert SizeRule("qwen", 1680, 28 * 28 * 1280).apply(big).size == (1400, 700)
    assert SizeRule("qwen", 1024, 28 * 28 * 640).apply(big).size == (980, 504)
    cub_sized = Image.new("RGB", (500, 375))
    assert SizeRule("qwen", 1680, 28 * 28 * 1280).apply(cub_sized).size == (504, 364)  # below the cap
    assert SizeRule("none").apply(Image.new("L", (500, 375))).mode == "RGB"


def test_recipes_hold_the_reference_settings():
    r = recipes()
    assert r["hierarchy-vision"].system == "You are an assistant." and r["hierarchy-vision"].user == "Describe this image."
    assert (r["hierarchy-vision"].max_side, r["hierarchy-vision"].max_pixels) == (1680, 28 * 28 * 1280)
    assert (r["hierarchy-llm"].max_side, r["hierarchy-llm"].max_pixels) == (1024, 28 * 28 * 640)
    assert r["hierarchy-llm"].pools == ("img_last", "img_mean") and r["hierarchy-llm"].sites == ("llm.-1",)
    assert r["classification"].template == "USER: {image}\nWhat type of object is in this photo?\nASSISTANT:"
    assert r["text"].system == "You are a helpful assistant." and r["text"].sites == ("llm.all",)
    with pytest.raises(ValueError, match="unknown recipe"):
        load_recipe("nope")


def test_duplicate_images_get_distinct_ids(tmp_path):
    from probes.data import duplicate_ids

    f = tmp_path / "d.jsonl"
    rec = '{{"image": "{}", "label": "Sooty Albatross", "split": "train"}}\n'
    f.write_text(rec.format("a.jpg") + rec.format("b.jpg") + rec.format("a.jpg") + rec.format("a.jpg"))
    assert duplicate_ids(f) == {"a.jpg"}
    ids = [i.id for i in read_image_items(f, taxonomy=load_taxonomy("cub"))]
    assert ids == ["a.jpg", "b.jpg", "a.jpg#2", "a.jpg#3"]
