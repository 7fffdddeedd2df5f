"""Taxonomies: the six shipped files against the protocol table (section 1.3), and validation."""

from __future__ import annotations

import json

import pytest

from harness.data.taxonomy import (
    ROOT_NAMES,
    TAXONOMIES,
    TaxonomyError,
    get_info,
    infer_taxonomy,
    load_taxonomy,
    taxonomy_path,
)

# Protocol section 1.3: distinct names per depth, leaves, path lengths (min, max, mean).
DISTINCT = {
    "cub": [13, 37, 124, 200],
    "inat_animal": [1, 6, 27, 152, 715, 2988, 5388],
    "inat_plant": [1, 5, 14, 85, 286, 1702, 4271],
    "imagenet_animal": [1, 2, 10, 37, 81, 123, 81, 65, 41, 64, 34, 2],
    "imagenet_artifact": [1, 5, 40, 149, 205, 162, 62, 44],
    "food": [1, 6, 29, 40, 24],
}
LEAVES = {"cub": 200, "inat_animal": 5388, "inat_plant": 4271, "imagenet_animal": 397,
          "imagenet_artifact": 494, "food": 84}
PATH_LENGTHS = {"cub": (4, 4, 4.0), "inat_animal": (7, 7, 7.0), "inat_plant": (7, 7, 7.0),
                "imagenet_animal": (4, 12, 7.48), "imagenet_artifact": (3, 8, 5.50), "food": (3, 5, 4.0)}
ROOTS = {"cub": None, "inat_animal": "Animalia", "inat_plant": "Plantae", "imagenet_animal": "animal",
         "imagenet_artifact": "artifact", "food": "food"}


def test_six_taxonomies_known():
    assert set(TAXONOMIES) == set(DISTINCT)


@pytest.mark.parametrize("tid", sorted(DISTINCT))
def test_distinct_names_per_depth_match_protocol(tid):
    tax = load_taxonomy(tid)
    assert [len(d) for d in tax.names_by_depth()] == DISTINCT[tid]
    assert len(tax.paths) == LEAVES[tid]


@pytest.mark.parametrize("tid", sorted(DISTINCT))
def test_path_lengths_and_root(tid):
    tax = load_taxonomy(tid)
    lengths = [len(p) for p in tax.paths.values()]
    lo, hi, mean = PATH_LENGTHS[tid]
    assert (min(lengths), max(lengths)) == (lo, hi)
    assert round(sum(lengths) / len(lengths), 2) == mean
    root = ROOTS[tid]
    assert get_info(tid).root == root
    if root is not None:
        assert tax.names_by_depth()[0] == [root]
        assert root.lower() in ROOT_NAMES


def test_load_by_file_path_recognises_known_file(taxonomy_dir):
    tax = load_taxonomy(taxonomy_dir / "hierarchy_Food.json")
    assert tax.info is not None and tax.info.id == "food"
    info, path = taxonomy_path("cub")
    assert info.id == "cub" and path.name == "hierarchy_CUB200.json" and path.is_file()


def test_cub_case_mismatch_is_a_warning_not_an_error():
    tax = load_taxonomy("cub")
    key = "Nelson's Sharp-tailed Sparrow"
    assert tax.paths[key][-1] == "Nelson's sharp-tailed Sparrow"
    case_warnings = [w for w in tax.warnings if "differs only in case" in w]
    assert len(case_warnings) == 1 and key in case_warnings[0]


def test_cub_genus_equals_species_is_not_a_second_parent():
    tax = load_taxonomy("cub")
    parents = tax.parents()
    for name in ("Geococcyx", "Sayornis"):
        p = tax.paths[name]
        assert p[2] == p[3] == name
        assert len(parents[name]) == 1
        assert any(name in w and "consecutive" in w for w in tax.warnings)
    # a consistent tree otherwise: no node of CUB has two parents
    assert not [w for w in tax.warnings if "parents" in w]


def test_sports_equipment_has_two_parents():
    tax = load_taxonomy("imagenet_artifact")
    assert tax.parents()["sports equipment"] == {"equipment", "implement"}
    two = [w for w in tax.warnings if "parents" in w]
    assert len(two) == 1
    assert "sports equipment" in two[0] and "equipment" in two[0] and "implement" in two[0]


@pytest.mark.parametrize("tid", ["inat_animal", "inat_plant", "food", "imagenet_animal"])
def test_other_taxonomies_have_no_warnings(tid):
    assert load_taxonomy(tid).warnings == []


def test_level_names():
    cub, inat, imnet = get_info("cub"), get_info("inat_animal"), get_info("imagenet_animal")
    assert [cub.level_name(i) for i in range(5)] == ["order", "family", "genus", "species", "species"]
    assert [inat.level_name(i) for i in range(7)] == ["kingdom", "phylum", "class", "order", "family",
                                                       "genus", "species"]
    assert imnet.level_name(0) == "root" and imnet.level_name(3) == "depth 4"
    assert imnet.ranks is None and get_info("food").ranks is None


def test_siblings():
    tax = load_taxonomy("cub")
    # independent computation: the genera sharing Phoebastria's family
    fam = {p[1] for p in tax.paths.values() if p[2] == "Phoebastria"}
    expected = sorted({p[2] for p in tax.paths.values() if p[1] in fam and p[2] != "Phoebastria"})
    assert tax.siblings(2, "Phoebastria") == expected
    assert "Phoebastria" not in tax.siblings(2, "Phoebastria")
    # depth 0: every other order
    assert len(tax.siblings(0, "Passeriformes")) == 12


def test_unknown_id_and_missing_file():
    with pytest.raises(KeyError, match="unknown taxonomy"):
        get_info("nope")
    with pytest.raises(TaxonomyError, match="nope"):
        load_taxonomy("nope")


@pytest.mark.parametrize(
    "content, why",
    [
        ("", "invalid JSON"),
        ('{"a": ["x", "a"', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": []}', "non-empty list"),
        ('{"a": "x"}', "non-empty list"),
        ('{"a": ["x", 3]}', "non-empty list"),
        ('{"a": ["x", ""]}', "non-empty list"),
    ],
    ids=["empty-file", "truncated", "not-an-object", "empty-path", "non-list", "non-string", "empty-name"],
)
def test_malformed_file_raises_naming_the_file(tmp_path, content, why):
    f = tmp_path / "bad_taxonomy.json"
    f.write_text(content)
    with pytest.raises(TaxonomyError) as ei:
        load_taxonomy(f)
    assert str(f) in str(ei.value)
    assert why in str(ei.value)


def test_custom_valid_file(tmp_path):
    f = tmp_path / "mini.json"
    f.write_text(json.dumps({"cat": ["animal", "mammal", "cat"], "trout": ["animal", "fish", "trout"],
                             "Dog": ["animal", "mammal", "dog"]}))
    tax = load_taxonomy(f)
    assert tax.info is None
    assert [len(d) for d in tax.names_by_depth()] == [1, 2, 3]
    assert len(tax.warnings) == 1 and "'Dog'" in tax.warnings[0] and "case" in tax.warnings[0]


def test_infer_taxonomy_from_cub_labels(cub_items):
    labels = [it.label for it in cub_items[:50]]
    assert infer_taxonomy(labels, [it.levels[0].truth for it in cub_items[:50]]) == "cub"
    assert infer_taxonomy(["no such thing", "nor this"], ["x"]) is None
