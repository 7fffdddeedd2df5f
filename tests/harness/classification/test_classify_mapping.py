"""Mapping free-form answers into the label set: direct rules, zero-shot NLI through transformers'
pipeline (a tiny random BART NLI model built here, loaded by path like facebook/bart-large-mnli),
embedding similarity (a tiny random BERT), and the run-level report (how many answers needed mapping)."""

from __future__ import annotations

import pytest

from harness.classification.generation import score_run
from harness.classification.mapping import direct, map_answer
from harness.classification.scoring import NameIndex

CANDS = ["bird", "cat", "dog", "oak", "red fox"]


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch
    from tokenizers import processors
    from transformers import BartConfig, BartForSequenceClassification

    from tests.support.tiny_models import build_tokenizer

    tok = build_tokenizer("llava")
    bos, eos = tok.bos_token, tok.eos_token
    tok._tokenizer.post_processor = processors.TemplateProcessing(  # BART's <s> A </s></s> B </s>
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    cfg = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     decoder_start_token_id=tok.eos_token_id, init_std=0.5,
                     id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
                     label2id={"contradiction": 0, "neutral": 1, "entailment": 2})
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-nli")
    BartForSequenceClassification(cfg).eval().save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_direct_rules():
    idx = NameIndex(CANDS)
    assert direct("A red fox.", CANDS, "exact") == "red fox"
    assert direct("It is a red fox in the snow", CANDS, "exact") is None
    assert direct("It is a red fox in the snow", CANDS, "contained", idx) == "red fox"
    assert direct("a dog or a cat", CANDS, "contained", idx) is None  # two candidates: needs mapping
    assert direct("A red fox.", CANDS, "none") is None
    assert map_answer("", CANDS, None, "exact") == (None, "empty")
    assert map_answer("a canine", CANDS, None, "contained", idx) == (None, "unmapped")


def test_nli_mapper_is_the_entailment_argmax(tiny_nli):
    import torch

    from harness.classification.mapping import NLIMapper, load_mapper

    m = load_mapper("nli", str(tiny_nli))
    assert isinstance(m, NLIMapper) and m.name == f"nli:{tiny_nli}"
    model, tok = m.pipe.model, m.pipe.tokenizer
    for answer, cands in [("a small red bird", CANDS), ("something furry", CANDS[::-1]), ("a tree", ["oak", "cat"])]:
        enc = tok([answer] * len(cands), [f"This example is {c}." for c in cands], return_tensors="pt", padding=True)
        with torch.no_grad():
            entail = model(**enc).logits[:, 2]
        assert m.map(answer, cands) == cands[int(entail.argmax())]
        label, how = map_answer(answer, cands, m, "exact")
        assert how == "mapped" and label == cands[int(entail.argmax())]
    assert map_answer("A cat.", CANDS, m, "exact") == ("cat", "direct")  # a candidate is never sent to the model


def test_embedding_mapper_maps_a_paraphrase_to_itself(tmp_path):
    pytest.importorskip("transformers")
    import torch
    from transformers import BertConfig, BertModel

    from harness.classification.mapping import EmbeddingMapper
    from tests.support.tiny_models import build_tokenizer

    tok = build_tokenizer("llava")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = EmbeddingMapper(str(tmp_path))
    for c in CANDS:
        assert m.map(c, CANDS) == c  # identical text: cosine 1
    assert set(m._cache) == set(CANDS)  # candidate embeddings computed once


def test_run_report_counts_what_needed_mapping():
    classes = ["bird", "cat", "dog", "oak", "red fox", "tench"]

    class First:
        name = "first"

        def map(self, answer, candidates):
            return candidates[0]

    recs = [
        {"qid": "1", "label": "cat", "k": 3, "choices": ["cat", "dog", "oak"], "pred": "cat", "error": None},
        {"qid": "2", "label": "dog", "k": 3, "choices": ["dog", "bird", "oak"], "pred": "It is a dog.", "error": None},
        {"qid": "3", "label": "oak", "k": 3, "choices": ["oak", "cat", "dog"], "pred": "a tree", "error": None},
        {"qid": "4", "label": "bird", "k": 3, "choices": ["cat", "bird", "oak"], "pred": "a mammal", "error": None},
        {"qid": "5", "label": "tench", "k": 6, "choices": "all", "pred": None, "error": "gave up"},
    ]
    s = score_run(recs, classes, mapper=First())
    m = s["mapping"]
    assert m["how"] == {"direct": 2, "mapped": 2, "empty": 1} and m["needed_mapping"] == 2
    # predictions: cat, dog, oak (mapped: first candidate), cat (mapped), None
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert s["n_errors"] == 1 and s["corrected"]["correct"] == 2
    without = score_run(recs, classes)["mapping"]
    assert without["how"] == {"direct": 2, "unmapped": 2, "empty": 1} and without["accuracy"] == pytest.approx(2 / 5)


def test_score_command_maps_with_nli(tiny_nli, tmp_path, capsys):
    """`harness classify score RUN --map nli --map-model DIR`: the thesis protocol's report."""
    import argparse
    import json

    from harness.cli.classify import add_cli

    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps(CANDS))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"kind": "generation", "settings": {"classes": str(classes)}}))
    lines = [{"qid": "1", "label": "cat", "k": 3, "choices": ["cat", "dog", "oak"], "pred": "cat", "error": None},
             {"qid": "2", "label": "oak", "k": 3, "choices": ["dog", "oak", "bird"], "pred": "a tall tree", "error": None},
             {"qid": "3", "label": "dog", "k": 5, "choices": "all", "pred": "something furry", "error": None}]
    (run / "results.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    p = argparse.ArgumentParser()
    add_cli(p.add_subparsers())
    args = p.parse_args(["classify", "score", str(run), "--map", "nli", "--map-model", str(tiny_nli), "--json"])
    capsys.readouterr()
    assert args.func(args) == 0
    m = json.loads(capsys.readouterr().out)["mapping"]
    assert m["mapper"] == f"nli:{tiny_nli}" and m["how"] == {"direct": 1, "mapped": 2} and m["needed_mapping"] == 2
    assert 0 <= m["f1"] <= 1 and m["n_labels"] >= 2
