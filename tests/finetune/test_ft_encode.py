"""Label masking: the loss sees exactly the assistant tokens (answer + end-of-turn), on tiny LLaVA and
Qwen2-VL, for image, text-only and multi-turn conversations; batching pads and concatenates right."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import torch

from finetune.data import Conversation
from finetune.encode import IGNORE, EncodeError, Encoder, collate
from finetune.model import load_processor

FAMILIES = ["ft_llava_dir", "ft_qwen_dir"]
# what each tiny template puts after the generation prompt for answer X: the model must produce it
ASSISTANT = {"ft_llava_dir": (" {}</s>", "</s>"), "ft_qwen_dir": ("{}<|im_end|>", "<|im_end|>")}


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    from PIL import Image

    p = tmp_path_factory.mktemp("enc") / "x.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(p)
    return str(p)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_assistant_tokens(family, request, image_path):
    proc = load_processor(str(request.getfixturevalue(family)))
    tok = proc.tokenizer
    enc = Encoder(proc)
    conv = Conversation("c1", (("What is it?\nA. oak\nB. fir\nAnswer with the option's letter.", "B"),), image_path,
                        "You are a helpful assistant.")
    e = enc.encode(conv)
    ids, labels = e["input_ids"].tolist(), e["labels"].tolist()
    answer = _ids(tok, ASSISTANT[family][0].format("B"))
    k = len(ids) - len(answer)
    # the labelled positions are the last len(answer) ones and hold exactly the answer's tokens
    assert [i for i, v in enumerate(labels) if v != IGNORE] == list(range(k, len(ids)))
    assert labels[k:] == ids[k:] == answer
    assert tok.decode(ids[k:]) == ASSISTANT[family][0].format("B")
    # the context is the prompt a server renders (generation prompt included), image tokens expanded
    prompt = proc.apply_chat_template(enc.messages(conv, 1, False), tokenize=False, add_generation_prompt=True)
    from finetune.encode import load_image

    ref = proc(text=[prompt], images=[load_image(image_path)], return_tensors="pt", add_special_tokens=False)
    assert ids[:k] == ref["input_ids"][0].tolist()
    image_token = tok.convert_tokens_to_ids(proc.image_token)
    assert ids.count(image_token) >= 1 and all(labels[i] == IGNORE for i, t in enumerate(ids) if t == image_token)
    assert e["attention_mask"].tolist() == [1] * len(ids)
    assert "pixel_values" in e


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_turn_and_text_only(family, request):
    proc = load_processor(str(request.getfixturevalue(family)))
    tok = proc.tokenizer
    enc = Encoder(proc)
    e = enc.encode(Conversation("c2", (("First question?", "A"), ("Second one?", "C")), None, None))
    ids, labels = e["input_ids"].tolist(), e["labels"].tolist()
    kept = [t for t in labels if t != IGNORE]
    fmt, eot = ASSISTANT[family]
    assert kept == _ids(tok, fmt.format("A")) + _ids(tok, fmt.format("C"))
    assert tok.decode(kept).count(eot) == 2
    assert "pixel_values" not in e
    # the whole sequence decodes to the rendered conversation minus the separator after the last turn
    full = proc.apply_chat_template(enc.messages(Conversation("c2", (("First question?", "A"), ("Second one?", "C"))), 2,
                                                 True), tokenize=False)
    assert tok.decode(ids) == full.rstrip()


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_pads_per_token_tensors_and_concatenates_images(family, request, image_path):
    proc = load_processor(str(request.getfixturevalue(family)))
    enc = Encoder(proc)
    a = enc.encode(Conversation("a", (("Q?", "A"),), image_path, "S"))
    b = enc.encode(Conversation("b", (("A much longer text-only question here?", "D"),), None, "S"))
    c = enc.encode(Conversation("c", (("Q?", "B"),), image_path, None))
    batch = collate([a, b, c], proc.tokenizer.pad_token_id)
    n = max(x["input_ids"].numel() for x in (a, b, c))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, n)
    for row, x in enumerate((a, b, c)):
        m = x["input_ids"].numel()
        assert batch["input_ids"][row, :m].tolist() == x["input_ids"].tolist()
        assert batch["input_ids"][row, m:].eq(proc.tokenizer.pad_token_id).all()
        assert batch["labels"][row, m:].eq(IGNORE).all() and batch["attention_mask"][row, m:].eq(0).all()
    assert torch.equal(batch["pixel_values"], torch.cat([a["pixel_values"], c["pixel_values"]]))
    if "image_grid_thw" in a:  # Qwen2-VL: one grid row per image, per-token type ids padded with 0
        assert batch["image_grid_thw"].shape == (2, 3) and batch["mm_token_type_ids"].shape == (3, n)


def test_templates_that_cannot_be_masked_are_refused(ft_llava_dir):
    proc = load_processor(str(ft_llava_dir))
    proc.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}{% if add_generation_prompt %}GO{% endif %}"
    with pytest.raises(EncodeError, match="generation prompt is not a prefix"):
        Encoder(proc).encode(Conversation("bad", (("Q?", "A"),)))
    proc.chat_template = "{% for m in messages %}{{ m['role'] }}:{% endfor %}"
    with pytest.raises(EncodeError, match="dropped the answer"):
        Encoder(proc).encode(Conversation("bad2", (("Q?", "A"),)))


def test_max_length_and_missing_image(ft_llava_dir, tmp_path):
    proc = load_processor(str(ft_llava_dir))
    with pytest.raises(EncodeError, match="max length 5"):
        Encoder(proc, max_length=5).encode(Conversation("long", (("Q?", "A"),)))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        Encoder(proc).encode(Conversation("img", (("Q?", "A"),), str(tmp_path / "nope.png")))
