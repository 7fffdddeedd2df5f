"""SFT data from items: questions, answers, splits, file formats (no torch needed)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from itertools import islice

import orjson
import pytest
from tests.finetune.ft_support import CUB

from finetune.data import (
    OPTION_SUFFIX,
    DataConfig,
    DataError,
    conversations_from_items,
    read_conversations,
    split_items_file,
    split_of,
    to_llava,
    write_jsonl,
    write_llava,
)
from harness.data.items import LETTERS, read_items
from harness.prompts.hierarchy import PromptConfig, Renderer


@pytest.fixture(scope="module")
def items():
    return list(islice(read_items(CUB), 40))


def test_one_conversation_per_asked_level_with_the_reference_prompts(items):
    convs = list(conversations_from_items(items[:2], DataConfig(taxonomy="cub")))
    # CUB: 4 image questions, 3 text questions (the text leaf is auto-filled, never asked) per item
    assert Counter((c.meta["item"], c.meta["mode"]) for c in convs) == {
        (items[0].id, "image"): 4, (items[0].id, "text"): 3, (items[1].id, "image"): 4, (items[1].id, "text"): 3}
    # the user text is exactly what `harness run` asks (same renderer, same hashed option order)
    q = Renderer(PromptConfig(taxonomy="cub", mode="image", system="helpful")).render(items[0])[2]
    c = next(c for c in convs if c.meta["mode"] == "image" and c.meta["level"] == 3)
    assert c.turns[0][0] == q.text and c.image == items[0].image and c.system == "You are a helpful assistant."
    assert c.turns[0][0].startswith("Based on taxonomy, what is the genus of the bird in this image?\nA. ")
    t = next(c for c in convs if c.meta["mode"] == "text" and c.meta["level"] == 1)
    assert t.image is None and "Black-footed Albatross" in t.turns[0][0]


def test_letter_answers_point_at_the_truth(items):
    for c in conversations_from_items(items, DataConfig(taxonomy="cub")):
        user, letter = c.turns[0]
        assert letter in LETTERS[:4]
        line = next(ln for ln in user.split("\n") if ln.startswith(f"{letter}. "))
        assert line[3:] == c.meta["truth"]


def test_option_text_answers_and_their_suffix(items):
    convs = list(conversations_from_items(items[:1], DataConfig(taxonomy="cub", answer="option", modes=("image",))))
    assert [c.turns[0][1] for c in convs] == [lv.truth for lv in items[0].levels]
    assert all(c.turns[0][0].endswith(OPTION_SUFFIX) for c in convs)
    both = next(conversations_from_items(items[:1], DataConfig(taxonomy="cub", answer="letter_option", modes=("image",))))
    assert both.turns[0][1].endswith(f". {items[0].levels[0].truth}") and both.turns[0][1][0] in "ABCD"


def test_system_prompt_choice_and_text_dedupe(items):
    auto = next(conversations_from_items(items[:1], DataConfig(taxonomy="cub", system="auto", modes=("image",))))
    assert auto.system.startswith("You are an expert in hierarchical image classification")
    none = next(conversations_from_items(items[:1], DataConfig(taxonomy="cub", system=None)))
    assert none.system is None
    same_species = [i for i in items if i.label == items[0].label]
    assert len(same_species) > 1
    convs = list(conversations_from_items(same_species, DataConfig(taxonomy="cub", modes=("text",), dedupe_text=True)))
    assert len(convs) == 3


def test_split_is_species_disjoint_stable_and_near_the_fraction(tmp_path):
    tr, ev, rep = split_items_file(CUB, tmp_path, by="species", eval_fraction=0.3, seed=0)
    train_species = {i.label for i in read_items(tr)}
    eval_species = {i.label for i in read_items(ev)}
    assert not train_species & eval_species
    assert len(train_species) + len(eval_species) == 200 and rep.shared_keys == 0
    assert rep.items["train"] + rep.items["eval"] == 5794
    assert 0.2 < len(eval_species) / 200 < 0.4
    # lines are copied byte for byte, in file order
    src = CUB.read_bytes().split(b"\n")
    assert ev.read_bytes().split(b"\n")[0] in src and tr.read_bytes().startswith(src[0])
    # a pure function of the species: the same answer for an item alone or in a full file
    item = next(read_items(ev))
    assert split_of(item, "species", 0.3, 0) == "eval"
    assert split_of(item, "species", 0.3, 1) in ("train", "eval")


def test_image_split_and_no_split(tmp_path):
    _, ev, rep = split_items_file(CUB, tmp_path / "img", by="image", eval_fraction=0.5, seed=3)
    assert rep.keys["eval"] == rep.items["eval"] and 0.45 < rep.items["eval"] / 5794 < 0.55
    _, ev, rep = split_items_file(CUB, tmp_path / "none", by="none")
    assert rep.items == {"train": 5794, "eval": 0} and ev.read_bytes() == b""
    with pytest.raises(ValueError, match="eval fraction"):
        split_items_file(CUB, tmp_path, eval_fraction=1.0)


def test_llava_export_and_round_trip(items, tmp_path):
    convs = list(conversations_from_items(items[:2], DataConfig(taxonomy="cub")))
    img = to_llava(convs[0])
    assert img == {"id": convs[0].id, "image": convs[0].image, "conversations": [
        {"from": "human", "value": "<image>\n" + convs[0].turns[0][0]}, {"from": "gpt", "value": convs[0].turns[0][1]}]}
    txt = to_llava(next(c for c in convs if c.image is None))
    assert "image" not in txt and not txt["conversations"][0]["value"].startswith("<image>")
    path = tmp_path / "llava.json"
    assert write_llava(path, convs) == len(convs)
    assert len(json.loads(path.read_text())) == len(convs)  # a plain JSON list
    back = read_conversations(path)
    assert [(c.id, c.turns, c.image) for c in back] == [(c.id, c.turns, c.image) for c in convs]
    assert all(c.system == "You are a helpful assistant." for c in back)  # the reference fork's system turn
    ours = tmp_path / "sft.jsonl"
    write_jsonl(ours, convs)
    again = read_conversations(ours)
    assert again == convs and again[0].meta == convs[0].meta


def test_root_map_applies_when_reading(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"id": "x", "image": "/old/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]}]))
    assert read_conversations(p, root_map=["/old=/new"])[0].image == "/new/a.jpg"


@pytest.mark.parametrize("record, field, message", [
    ({"messages": [{"role": "user", "content": "Q"}]}, "messages", "end with assistant"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}, "messages[1]", "role"),
    ({"messages": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]}, "messages[0]", "alternate"),
    ({"image": 3, "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}, "image", "string"),
    ({"image": "a.jpg", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
     "conversations[0]", "no <image>"),
    ({"text": "Q"}, "messages", "missing"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, field, message):
    p = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    p.write_bytes(orjson.dumps(good) + b"\n" + orjson.dumps(record) + b"\n")
    with pytest.raises(DataError) as e:
        read_conversations(p)
    assert f"{p}:2: field {field!r}" in str(e.value) and message in str(e.value)


def _cli(argv):
    from finetune.cli import add_cli

    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_data_writes_split_items_sft_and_llava_files(tmp_path, capsys):
    out = tmp_path / "d"
    assert _cli(["finetune", "data", "--data", str(CUB), "--out", str(out), "--limit", "120",
                 "--eval-fraction", "0.5", "--image-root-map", "/projectnb/ivc-ml/yuwentan/dataset=/imgs",
                 "--profile", "qwen2.5-vl-7b"]) == 0
    m = json.loads((out / "data.json").read_text())
    assert m["config"]["taxonomy"] == "cub" and m["config"]["image_variant"] == 0 and m["config"]["text_variant"] == 1
    n_train, n_eval = m["split"]["items"]["train"], m["split"]["items"]["eval"]
    assert n_train + n_eval == 120 and n_train and n_eval
    assert m["conversations"] == {"sft_train_image.jsonl": 4 * n_train, "sft_train_text.jsonl": 3 * n_train,
                                  "sft_eval_image.jsonl": 4 * n_eval, "sft_eval_text.jsonl": 3 * n_eval}
    first = orjson.loads((out / "sft_train_image.jsonl").read_bytes().split(b"\n")[0])
    assert first["image"].startswith("/imgs/CUB_200_2011/") and first["messages"][-1]["role"] == "assistant"
    text = orjson.loads((out / "sft_train_text.jsonl").read_bytes().split(b"\n")[0])
    assert text["messages"][1]["content"].startswith("Given the ")  # the profile's text variant 1
    llava = json.loads((out / "llava_eval_image.json").read_text())
    assert len(llava) == 4 * n_eval and llava[0]["conversations"][0]["value"].startswith("<image>\n")
    # the held-out items file is what `harness run` reads: original (unmapped) paths
    assert sum(1 for _ in read_items(out / "items_eval.jsonl")) == n_eval
    assert b"/projectnb/" in (out / "items_eval.jsonl").read_bytes()
    assert "none shared" in capsys.readouterr().out


def test_cli_data_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such items file"):
        _cli(["finetune", "data", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--modes"):
        _cli(["finetune", "data", "--data", str(CUB), "--out", str(tmp_path), "--modes", "video"])
