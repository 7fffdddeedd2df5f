"""Prompts: golden tests against the protocol text (sections 2, 2.1, 2.2, 3, 4), option orders and
message rendering. Every expected string here is copied from the protocol, not from prompts.toml."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from harness.data.items import Item, Level
from harness.prompts.hierarchy import (
    PromptConfig,
    Renderer,
    build_messages,
    catalogue_hash,
    format_options,
    make_qid,
    taxonomy_context,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ------------------------------------------------------------------ protocol text (golden)

STANDARD_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
COT_SUFFIX = "\nLet's think step by step. Answer with the option's letter from the given choices directly."
COT_QWEN_SUFFIX = "\nLet\u2019s think step by step. Answer with the option's letter from the given choices directly."

SYSTEM_QWEN = ("You are an expert in hierarchical image classification. Given an image, classify it at its "
               "current hierarchy level by selecting the most appropriate option from the provided choices "
               "(labeled with letters). Respond with only the corresponding letter.")
SYSTEM_HELPFUL = "You are a helpful assistant."
SYSTEM_BINARY = ("You are an expert in hierarchical image classification. Given an image and a corresponding "
                 "statement, determine whether the statement accurately reflects the content of the image. "
                 "Respond with a single word: Yes or No.")

# Section 4, copied as printed (Markdown escapes and "\n" included); unescaped below.
TAX_COT_ANIMAL_PROTOCOL = r"""You are an expert in hierarchical image classification. Given an image and a multiple-choice question about a specific taxonomy level (e.g., genus, family), first infer the most likely species from the image, then reason step-by-step through the taxonomy hierarchy to identify the correct label. Respond with only the letter corresponding to the correct answer.\nExample: if the image depicts \*Caenurgina crassiuscula\*, then the correct genus is \*Caenurgina\*, family is \*Erebidae\*, order is \*Lepidoptera\*, class is \*Insecta\*, phylum is \*Arthropoda\*, and kingdom is \*Animalia\*.\nFor instance, if the question is:\n\*Given the animal in the image, what is its taxonomic classification at the phylum level?\*\nA. Annelida\nB. Arthropoda\nC. Mollusca\nD. Chordata\nYou should select option \*\*B\*\*, labeled with \*Arthropoda\*."""


def _unescape(s: str) -> str:
    return s.replace("\\*", "*").replace("\\n", "\n")


TAX_COT_ANIMAL = _unescape(TAX_COT_ANIMAL_PROTOCOL)
# "Plant: same skeleton with *Oenothera curtiflora* -> *Oenothera* / *Onagraceae* / *Myrtales* /
# *Magnoliopsida* / *Tracheophyta* / *Plantae*, "the plant", options "A. Chlorophyta\nB. Bryophyta\n
# C. Rhodophyta\nD. Tracheophyta", answer **D** *Tracheophyta*."
TAX_COT_PLANT = TAX_COT_ANIMAL
for _a, _b in [
    ("A. Annelida\nB. Arthropoda\nC. Mollusca\nD. Chordata",
     "A. Chlorophyta\nB. Bryophyta\nC. Rhodophyta\nD. Tracheophyta"),
    ("option **B**", "option **D**"),
    ("*Caenurgina crassiuscula*", "*Oenothera curtiflora*"), ("*Caenurgina*", "*Oenothera*"),
    ("*Erebidae*", "*Onagraceae*"), ("*Lepidoptera*", "*Myrtales*"), ("*Insecta*", "*Magnoliopsida*"),
    ("*Arthropoda*", "*Tracheophyta*"), ("*Animalia*", "*Plantae*"), ("the animal", "the plant"),
]:
    assert _a in TAX_COT_PLANT, _a
    TAX_COT_PLANT = TAX_COT_PLANT.replace(_a, _b)

CUB_RANKS = ["order", "family", "genus", "species"]
INAT_RANKS = ["kingdom", "phylum", "class", "order", "family", "genus", "species"]

IMAGE_PROMPTS = {
    "cub": [
        "Based on taxonomy, what is the {rank} of the bird in this image?",
        "Based on the image, what is the taxonomic classification at the {rank} level?",
        "What is the taxonomic classification of the bird in this image?",
        "How can the bird in this image be categorized taxonomically?",
        "What is the systematic position of the bird shown in the image?",
    ],
    "imagenet_animal": [
        "What is the taxonomic category of the animal in this image?",
        "How can the animal in this image be categorized in taxonomy?",
        "Based on classification, what type of animal is this?",
        "What is the hierarchical class of the animal shown here?",
        "Where does this animal belong in the taxonomic hierarchy?",
    ],
    "food": [
        "What is the taxonomic category of the food item in this image?",
        "How can the food item in this image be categorized in taxonomy?",
        "Based on classification, what type of food is this?",
        "What is the hierarchical class of the food shown here?",
        "Where does this food item belong in the taxonomic hierarchy?",
    ],
    "inat_animal": [
        "Based on taxonomy, where does the animal in the image fall in terms of {rank}?",
        "Given the animal in the image, what is its taxonomic classification at the {rank} level?",
        "What could the animal in the image be classified as?",
        "How can the animal in the image be taxonomically categorized?",
        "What is the systematic position of the animal in the image in the biological classification hierarchy?",
    ],
}
IMAGE_PROMPTS["imagenet_artifact"] = [p.replace("animal", "object") for p in IMAGE_PROMPTS["imagenet_animal"]]
IMAGE_PROMPTS["inat_plant"] = [p.replace("animal", "plant") for p in IMAGE_PROMPTS["inat_animal"]]
RANKS = {"cub": CUB_RANKS, "inat_animal": INAT_RANKS, "inat_plant": INAT_RANKS}

TEXT_COMMON_2_4 = [
    "What could {label} be classified as?",
    "How can {label} be taxonomically categorized?",
    "What is the systematic position of {label} in the biological classification hierarchy?",
]
TEXT_PROMPTS = {
    "cub": ["Based on taxonomy, where does {label} fall in terms of {rank}?",
            "Given the {label}, what is its taxonomic classification at the {rank} level?", *TEXT_COMMON_2_4],
    "imagenet_animal": ["Given the {label}, what is its taxonomic classification?",
                        "Based on taxonomy, where does {label} fall?", *TEXT_COMMON_2_4],
}
TEXT_PROMPTS["inat_animal"] = TEXT_PROMPTS["cub"]
TEXT_PROMPTS["inat_plant"] = TEXT_PROMPTS["cub"]
TEXT_PROMPTS["imagenet_artifact"] = TEXT_PROMPTS["imagenet_animal"][:4] + [
    "What is the categorical classification of {label} in the artifact taxonomy?"]

GPT_IMAGE = {
    "cub": IMAGE_PROMPTS["cub"][0], "inat_animal": IMAGE_PROMPTS["inat_animal"][0],
    "inat_plant": IMAGE_PROMPTS["inat_plant"][0],
    "imagenet_animal": "How can the animal in this image be categorized in taxonomy?",
    "imagenet_artifact": "How can the object in this image be categorized in taxonomy?",
    "food": "What is the taxonomic category of the food item in this image?",
}
GPT_TEXT = {
    "cub": "Given the {label}, what is its taxonomic classification at the {rank} level?",
    "inat_animal": "Given the {label}, what is its taxonomic classification at the {rank} level?",
    "inat_plant": "Given the {label}, what is its taxonomic classification at the {rank} level?",
    "imagenet_animal": "What could {label} be classified as?",
    "imagenet_artifact": "What could {label} be classified as?",
}

DEPTH = {"cub": 4, "inat_animal": 7, "inat_plant": 7, "imagenet_animal": 6, "imagenet_artifact": 5, "food": 4}


def synthetic_item(taxonomy: str, depth: int | None = None, label: str = "Leaf Name") -> Item:
    depth = depth or DEPTH[taxonomy]
    levels = []
    for n in range(1, depth + 1):
        k = 2 if n == 2 else 4
        opts = tuple(f"opt{n}_{j}" for j in range(k))
        levels.append(Level(n, opts[1], opts))
    return Item(id=f"{taxonomy}-item", image=f"/img/{taxonomy}.jpg", label=label, levels=tuple(levels))


def expected_text(prompt: str, options, suffix: str = STANDARD_SUFFIX) -> str:
    # protocol section 2: prompt + "\n" + "\n".join(f"{L}. {option}") + suffix
    return prompt + "\n" + "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, options)) + suffix


def rank_for(taxonomy: str, t: int) -> str:
    r = RANKS.get(taxonomy)
    return r[min(t, len(r) - 1)] if r else ""


# ------------------------------------------------------------------ image mode

@pytest.mark.parametrize("variant", range(5))
@pytest.mark.parametrize("taxonomy", sorted(IMAGE_PROMPTS))
def test_image_prompts_golden(taxonomy, variant):
    item = synthetic_item(taxonomy)
    cfg = PromptConfig(taxonomy=taxonomy, variant=variant, option_order="file")
    qs = Renderer(cfg).render(item)
    assert len(qs) == len(item.levels)
    for t, (q, lv) in enumerate(zip(qs, item.levels)):
        prompt = IMAGE_PROMPTS[taxonomy][variant].replace("{rank}", rank_for(taxonomy, t))
        assert q.text == expected_text(prompt, lv.choices)
        assert q.system == SYSTEM_QWEN
        assert q.image == item.image and q.level == lv.n and q.index == t
        assert q.options == lv.choices and q.truth == lv.truth and q.scored
        assert q.choices == dict(zip(LETTERS, lv.choices))


def test_cub_image_rank_words_exact():
    item = synthetic_item("cub")
    qs = Renderer(PromptConfig(taxonomy="cub", variant=0, option_order="file")).render(item)
    assert [q.text.split("\n")[0] for q in qs] == [
        "Based on taxonomy, what is the order of the bird in this image?",
        "Based on taxonomy, what is the family of the bird in this image?",
        "Based on taxonomy, what is the genus of the bird in this image?",
        "Based on taxonomy, what is the species of the bird in this image?",
    ]
    # deeper than the rank list: the last rank applies
    deep = Renderer(PromptConfig(taxonomy="cub", variant=1, option_order="file")).render(synthetic_item("cub", 6))
    assert deep[5].text.startswith("Based on the image, what is the taxonomic classification at the species level?\n")


def test_inat_rank_words_by_level_index():
    qs = Renderer(PromptConfig(taxonomy="inat_plant", variant=1, option_order="file")).render(
        synthetic_item("inat_plant", 8))
    heads = [q.text.split("\n")[0] for q in qs]
    assert heads[0] == "Given the plant in the image, what is its taxonomic classification at the kingdom level?"
    assert heads[2] == "Given the plant in the image, what is its taxonomic classification at the class level?"
    assert heads[6] == heads[7] == \
        "Given the plant in the image, what is its taxonomic classification at the species level?"


def test_exact_question_text_on_first_cub_item(cub_items):
    q = Renderer(PromptConfig(taxonomy="cub", variant=0, option_order="file")).render(cub_items[0])[2]
    assert q.text == ("Based on taxonomy, what is the genus of the bird in this image?\n"
                      "A. stercorarius\nB. phoebastria\nC. fregata\nD. hydroprogne\n"
                      "Answer with the option's letter from the given choices directly.")
    assert format_options(("x", "y")) == "A. x\nB. y"


def test_root_level_is_asked_but_not_scored():
    root = Level(1, "animal", ("animal",), root=True)
    item = Item("r", "/r.jpg", "tabby cat", (root, Level(2, "vertebrate", ("invertebrate", "vertebrate"))))
    qs = Renderer(PromptConfig(taxonomy="imagenet_animal", option_order="file")).render(item)
    assert [q.scored for q in qs] == [False, True]
    assert qs[0].text == expected_text(IMAGE_PROMPTS["imagenet_animal"][0], ["animal"])
    assert qs[1].text.endswith("\nA. invertebrate\nB. vertebrate" + STANDARD_SUFFIX)


def test_none_truth_level_is_skipped():
    item = Item("n", "/n.jpg", "x", (Level(1, "a", ("a", "b")), Level(2, None, ("c", "d")), Level(3, "e", ("e", "f"))))
    qs = Renderer(PromptConfig(taxonomy="cub", option_order="file")).render(item)
    assert [q.level for q in qs] == [1, 3]
    assert [q.index for q in qs] == [0, 2]  # the rank still follows the level index


@pytest.mark.parametrize("taxonomy", sorted(GPT_IMAGE))
def test_gpt_fixed_image_prompts(taxonomy):
    item = synthetic_item(taxonomy)
    qs = Renderer(PromptConfig(taxonomy=taxonomy, variant="gpt", system="helpful", option_order="file")).render(item)
    for t, (q, lv) in enumerate(zip(qs, item.levels)):
        assert q.text == expected_text(GPT_IMAGE[taxonomy].replace("{rank}", rank_for(taxonomy, t)), lv.choices)
        assert q.system == SYSTEM_HELPFUL


def test_variant_validation():
    with pytest.raises(ValueError, match="out of range"):
        PromptConfig(taxonomy="cub", variant=5).template()
    with pytest.raises(ValueError, match="unknown prompt variant"):
        PromptConfig(taxonomy="cub", variant="nope").template()
    with pytest.raises(ValueError, match="unknown taxonomy 'not-a-taxonomy'"):
        PromptConfig(taxonomy="not-a-taxonomy")
    assert PromptConfig(taxonomy="cub", variant="3").template() == IMAGE_PROMPTS["cub"][3]
    with pytest.raises(ValueError, match="unknown system prompt"):
        PromptConfig(taxonomy="cub", system="nope").system_text()


# ------------------------------------------------------------------ system prompts and suffixes

def test_system_prompts():
    assert PromptConfig(taxonomy="cub").system_text() == SYSTEM_QWEN
    assert PromptConfig(taxonomy="cub", mode="text").system_text() == SYSTEM_HELPFUL
    assert PromptConfig(taxonomy="cub", mode="binary").system_text() == SYSTEM_BINARY
    assert PromptConfig(taxonomy="cub", system="helpful").system_text() == SYSTEM_HELPFUL
    assert PromptConfig(taxonomy="cub", system=None).system_text() is None
    assert PromptConfig(taxonomy="cub", system="none").system_text() is None


def test_suffixes():
    assert PromptConfig(taxonomy="cub").suffix_text() == STANDARD_SUFFIX
    assert PromptConfig(taxonomy="cub", suffix="cot").suffix_text() == COT_SUFFIX
    qwen = PromptConfig(taxonomy="cub", suffix="cot_qwen").suffix_text()
    assert qwen == COT_QWEN_SUFFIX and "\u2019" in qwen and "'" in qwen  # "Let’s" but "option's"
    item = synthetic_item("cub")
    q = Renderer(PromptConfig(taxonomy="cub", suffix="cot", option_order="file")).render(item)[0]
    assert q.text == expected_text(IMAGE_PROMPTS["cub"][0].replace("{rank}", "order"), item.levels[0].choices,
                                   COT_SUFFIX)


def test_taxonomy_cot_system_prompts_character_for_character():
    animal = PromptConfig(taxonomy="inat_animal", variant=1, taxonomy_cot=True).system_text()
    plant = PromptConfig(taxonomy="inat_plant", variant=1, taxonomy_cot=True).system_text()
    assert animal == TAX_COT_ANIMAL
    assert plant == TAX_COT_PLANT
    assert "\\" not in animal and animal.count("\n") == 8 and "**B**" in animal
    assert "*Oenothera curtiflora*" in plant and "**D**" in plant and "the plant in the image" in plant
    # only the system prompt changes
    item = synthetic_item("inat_animal")
    a = Renderer(PromptConfig(taxonomy="inat_animal", variant=1, taxonomy_cot=True, option_order="file")).render(item)
    b = Renderer(PromptConfig(taxonomy="inat_animal", variant=1, option_order="file")).render(item)
    assert [q.text for q in a] == [q.text for q in b]
    assert {q.system for q in a} == {TAX_COT_ANIMAL}
    assert a[0].qid != b[0].qid  # a different experiment: distinct question ids


def test_taxonomy_in_context(taxonomy_dir, cub_items):
    expected_ctx = str(json.loads((taxonomy_dir / "hierarchy_CUB200.json").read_text(encoding="utf-8")))
    assert len(expected_ctx) == 17137
    assert taxonomy_context("cub") == expected_ctx
    cfg = PromptConfig(taxonomy="cub", variant=0, taxonomy_in_context=True, option_order="file")
    assert cfg.system_text() == "You are a helpful assistant. Here is a taxonomy: " + expected_ctx
    item = cub_items[0]
    q = Renderer(cfg).render(item)[0]
    # no "\n" before the suffix [QUIRK]
    assert q.text == ("Based on taxonomy, what is the order of the bird in this image?\n"
                      "A. procellariiformes\nB. apodiformes\nC. podicipediformes\nD. pelecaniformes"
                      "Answer with the option's letter from the given choices directly.")
    assert q.system.startswith("You are a helpful assistant. Here is a taxonomy: {'Black-footed Albatross': ['Procellariiformes', ")


# ------------------------------------------------------------------ text mode

@pytest.mark.parametrize("variant", range(5))
@pytest.mark.parametrize("taxonomy", sorted(TEXT_PROMPTS))
def test_text_prompts_golden(taxonomy, variant):
    item = synthetic_item(taxonomy, label="Black-footed Albatross")
    qs = Renderer(PromptConfig(taxonomy=taxonomy, mode="text", variant=variant, option_order="file")).render(item)
    assert len(qs) == len(item.levels)
    *asked, leaf = qs
    for t, (q, lv) in enumerate(zip(asked, item.levels)):
        prompt = TEXT_PROMPTS[taxonomy][variant].replace("{rank}", rank_for(taxonomy, t)) \
            .replace("{label}", "Black-footed Albatross")
        assert q.text == expected_text(prompt, lv.choices)
        assert q.image is None and q.system == SYSTEM_HELPFUL and q.auto is None
    # the leaf is not asked: its prediction is the label
    assert leaf.auto == "Black-footed Albatross" and leaf.text == "" and leaf.level == item.levels[-1].n
    assert leaf.truth == item.levels[-1].truth and leaf.scored


def test_text_prompts_imagenet_have_no_rank():
    qs = Renderer(PromptConfig(taxonomy="imagenet_animal", mode="text", variant=0, option_order="file")).render(
        synthetic_item("imagenet_animal", label="tabby"))
    assert {q.text.split("\n")[0] for q in qs if q.auto is None} == {"Given the tabby, what is its taxonomic classification?"}


def test_text_cub_exact_and_og_qwen(cub_items):
    it = cub_items[0]
    qs = Renderer(PromptConfig(taxonomy="cub", mode="text", variant=0, option_order="file")).render(it)
    assert qs[1].text == ("Based on taxonomy, where does Black-footed Albatross fall in terms of family?\n"
                          "A. diomedeidae\nB. stercorariidae\nC. alcidae\nD. podicipedidae" + STANDARD_SUFFIX)
    og = Renderer(PromptConfig(taxonomy="cub", mode="text", variant="og_qwen_0", option_order="file")).render(it)
    assert og[0].text.startswith("Based on taxonomy, where does Black-footed Albatross fall in terms of order\nA. ")


@pytest.mark.parametrize("taxonomy", sorted(GPT_TEXT))
def test_gpt_text_prompts_ask_the_leaf(taxonomy):
    item = synthetic_item(taxonomy, label="Thing")
    qs = Renderer(PromptConfig(taxonomy=taxonomy, mode="text", variant="gpt", ask_leaf=True,
                               option_order="file")).render(item)
    assert all(q.auto is None for q in qs)
    for t, (q, lv) in enumerate(zip(qs, item.levels)):
        prompt = GPT_TEXT[taxonomy].replace("{rank}", rank_for(taxonomy, t)).replace("{label}", "Thing")
        assert q.text == expected_text(prompt, lv.choices)
    if taxonomy == "cub":
        assert qs[3].text.startswith("Given the Thing, what is its taxonomic classification at the species level?")


def test_text_cub_counts_over_similar_file(cub_items):
    for variant in (0, 1):
        r = Renderer(PromptConfig(taxonomy="cub", mode="text", variant=variant, option_order="file"))
        qs = [q for it in cub_items for q in r.render(it)]
        asked = [q for q in qs if q.auto is None]
        assert len(qs) == 23176 and len(asked) == 17382
        assert len({q.text for q in asked}) == 15507
        assert all(q.level != 4 for q in asked)


def test_text_mode_never_shuffles_even_in_reference_order(cub_items):
    r = Renderer(PromptConfig(taxonomy="cub", mode="text", option_order="reference"))
    for it in cub_items[:200]:
        assert [q.options for q in r.render(it)] == [lv.choices for lv in it.levels]


# ------------------------------------------------------------------ binary statements

def test_binary_statements(cub_items):
    cfg = PromptConfig(taxonomy="cub", mode="binary", option_order="file")
    r = Renderer(cfg)
    qs = r.render(cub_items[0])
    assert len(qs) == 16
    assert qs[0].text == ("The bird in the image belongs to the order procellariiformes.\n"
                          "Is this statement correct? Please answer Yes or No.")
    assert qs[15].text == ("The bird in the image belongs to the species laysan albatross.\n"
                           "Is this statement correct? Please answer Yes or No.")
    assert [q.option for q in qs] == [0, 1, 2, 3] * 4
    assert {q.system for q in qs} == {SYSTEM_BINARY}
    assert all(q.image == cub_items[0].image for q in qs)
    assert len({q.qid for q in qs}) == 16
    assert sum(len(r.render(it)) for it in cub_items) == 16 * 5794


# ------------------------------------------------------------------ option orders

def independent_reference_orders(path) -> list[list[tuple[str, ...]]]:
    """Written from the protocol: module-level random.seed(42), then random.shuffle in place over the
    raw records in file order, levels in numeric order, skipping None truths."""
    state = random.getstate()
    try:
        random.seed(42)
        out = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                rec = json.loads(line)
                ns = sorted(int(k[5:]) for k in rec if k.startswith("level") and k[5:].isdigit())
                per = []
                for n in ns:
                    if rec[f"level{n}"] is None:
                        continue
                    random.shuffle(rec[f"choices_level{n}"])
                    per.append(tuple(rec[f"choices_level{n}"]))
                out.append(per)
        return out
    finally:
        random.setstate(state)


def test_reference_order_replays_seed_42_over_the_whole_cub_file(cub_similar, cub_items):
    expected = independent_reference_orders(cub_similar)
    assert len(expected) == 5794
    r = Renderer(PromptConfig(taxonomy="cub", option_order="reference"))
    got = [[q.options for q in r.render(it)] for it in cub_items]
    assert got == expected
    # sanity: the replay really shuffles (not file order)
    assert sum(g != [lv.choices for lv in it.levels] for g, it in zip(got, cub_items)) > 5000
    # and the question text lists the options in that order
    q = Renderer(PromptConfig(taxonomy="cub", option_order="reference")).render(cub_items[0])[0]
    assert q.text == expected_text(IMAGE_PROMPTS["cub"][0].replace("{rank}", "order"), expected[0][0])


def test_reference_order_binary_consumes_one_shuffle_per_level(cub_similar, cub_items):
    expected = independent_reference_orders(cub_similar)
    r = Renderer(PromptConfig(taxonomy="cub", mode="binary", option_order="reference"))
    for it, exp in zip(cub_items[:300], expected[:300]):
        qs = r.render(it)
        assert [qs[4 * k].options for k in range(4)] == exp
        assert [q.text.split(" belongs to the ")[1].split(".\n")[0].split(" ", 1)[1] for q in qs[:4]] == list(exp[0])


def test_reference_order_skipped_levels_consume_no_shuffle(tmp_path):
    recs = []
    for i in range(30):
        r = {"image": f"/i{i}.jpg", "label": "x"}
        for n in range(1, 4):
            opts = [f"o{n}{j}" for j in range(4)]
            r[f"level{n}"] = None if (i + n) % 4 == 0 else opts[0]
            r[f"choices_level{n}"] = opts
        recs.append(r)
    f = tmp_path / "none.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    from harness.data.items import read_items

    rr = Renderer(PromptConfig(taxonomy="cub", option_order="reference"))
    got = [[q.options for q in rr.render(it)] for it in read_items(f)]
    assert got == independent_reference_orders(f)


def test_file_order_keeps_file_order(cub_items):
    r = Renderer(PromptConfig(taxonomy="cub", option_order="file"))
    for it in cub_items:
        assert [q.options for q in r.render(it)] == [lv.choices for lv in it.levels]


def _hashed(items, seed=0):
    r = Renderer(PromptConfig(taxonomy="cub", option_order="hashed", seed=seed))
    return {(q.item_id, q.level): q.options for it in items for q in r.render(it)}


def test_hashed_order_stable_and_order_independent(cub_items):
    a = _hashed(cub_items)
    assert _hashed(cub_items) == a  # a fresh Renderer
    assert _hashed(list(reversed(cub_items))) == a  # item order does not matter
    assert _hashed(cub_items[1000:1100]) == {k: v for k, v in a.items() if k[0] in {it.id for it in cub_items[1000:1100]}}
    for it in cub_items[:50]:
        for lv in it.levels:
            assert sorted(a[(it.id, lv.n)]) == sorted(lv.choices)


def test_hashed_order_differs_across_seeds(cub_items):
    a, b = _hashed(cub_items, 0), _hashed(cub_items, 1)
    same = sum(a[k] == b[k] for k in a)
    # 24 permutations of 4 options: about 1/24 coincide
    assert same / len(a) < 0.1


def test_hashed_truth_position_about_uniform(cub_items):
    r = Renderer(PromptConfig(taxonomy="cub", option_order="hashed"))
    pos = Counter(q.options.index(q.truth) for it in cub_items for q in r.render(it))
    n = sum(pos.values())
    assert n == 23176
    chi2 = sum((pos[k] - n / 4) ** 2 / (n / 4) for k in range(4))
    assert chi2 < 16.27, (pos, chi2)  # 3 degrees of freedom, p = 0.001


def test_qids_stable_and_distinct(cub_items):
    r1 = Renderer(PromptConfig(taxonomy="cub", option_order="hashed"))
    r2 = Renderer(PromptConfig(taxonomy="cub", option_order="reference"))
    q1 = [q.qid for it in cub_items for q in r1.render(it)]
    assert len(set(q1)) == 23176
    assert q1[:8] == [q.qid for it in cub_items[:2] for q in r2.render(it)]
    assert q1[0] == make_qid(cub_items[0].id, 1, "image", 0, "generate")
    other = Renderer(PromptConfig(taxonomy="cub", variant=1)).render(cub_items[0])[0].qid
    text = Renderer(PromptConfig(taxonomy="cub", mode="text")).render(cub_items[0])[0].qid
    choice = Renderer(PromptConfig(taxonomy="cub"), answer="choice").render(cub_items[0])[0].qid
    assert len({q1[0], other, text, choice}) == 4
    assert len(catalogue_hash()) == 64


# ------------------------------------------------------------------ messages

def _q(mode="image"):
    item = synthetic_item("cub")
    return Renderer(PromptConfig(taxonomy="cub", mode=mode, option_order="file")).render(item)[0]


def test_messages_image_first_by_default():
    q = _q()
    cfg = PromptConfig(taxonomy="cub")
    msgs = build_messages(q, "data:image/jpeg;base64,AAAA", cfg)
    assert msgs == [
        {"role": "system", "content": SYSTEM_QWEN},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
            {"type": "text", "text": q.text},
        ]},
    ]


def test_messages_gpt_order_with_detail_low():
    q = _q()
    cfg = PromptConfig(taxonomy="cub", image_first=False, detail="low")
    msgs = build_messages(q, "data:image/jpeg;base64,AAAA", cfg)
    assert msgs[1]["content"] == [
        {"type": "text", "text": q.text},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA", "detail": "low"}},
    ]


def test_messages_uuid_on_image_part():
    q = _q()
    msgs = build_messages(q, "file:///img/cub.jpg", PromptConfig(taxonomy="cub"), uuid="item-1")
    img = msgs[1]["content"][0]
    assert img["type"] == "image_url" and img["uuid"] == "item-1"
    assert "uuid" not in msgs[1]["content"][1]


def test_messages_text_mode_and_no_system():
    q = _q("text")
    msgs = build_messages(q, None, PromptConfig(taxonomy="cub", mode="text"))
    assert msgs == [{"role": "system", "content": SYSTEM_HELPFUL}, {"role": "user", "content": q.text}]
    item = synthetic_item("cub")
    q2 = Renderer(PromptConfig(taxonomy="cub", system=None, option_order="file")).render(item)[0]
    msgs = build_messages(q2, "u", PromptConfig(taxonomy="cub", system=None))
    assert [m["role"] for m in msgs] == ["user"]
