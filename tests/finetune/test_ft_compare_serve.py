"""The before/after comparison through four RunSpec runs (loopback stubs), and the vLLM LoRA serve command."""

from __future__ import annotations

import json

import pytest
from tests.finetune.ft_support import AUTHORS_PREFIX, CUB

from finetune.compare import Side, compare
from finetune.serve import lora_args, max_lora_rank
from harness.data.items import read_items
from harness.prompts.hierarchy import PromptConfig, Renderer
from harness.metrics.report import summarize_path
from tests.support.stub_server import Stub, StubThread


class Oracle(Stub):
    """A "tuned" model that knows the truths (looked up by the question's options in their order); the
    "base" is a plain stub answering a hashed letter."""

    def __init__(self, truths: dict[tuple, str], **kw):
        super().__init__(**kw)
        self.truths = truths

    def answer(self, text: str) -> str:
        options = {line[3:]: line[0] for line in text.split("\n") if len(line) > 3 and line[1:3] == ". "}
        return options.get(self.truths.get(tuple(options), ""), "A")


@pytest.fixture
def items(tmp_path):
    p = tmp_path / "items.jsonl"
    with CUB.open("rb") as f:
        p.write_bytes(b"".join(line for k, line in enumerate(f) if k % 97 == 0))  # 60 items, many species
    return p


def _cli(argv):
    from harness.cli import main

    return main(argv)


def test_compare_runs_four_evaluations_and_reports_the_deltas(items, tmp_path, monkeypatch):
    from harness.demo import draw_images

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    root = tmp_path / "images"
    draw_images(items, root, 10_000)
    truths = {q.options: q.truth for mode in ("image", "text") for it in read_items(items)
              for q in Renderer(PromptConfig(taxonomy="cub", mode=mode)).render(it)}
    with StubThread(Stub(model="base")) as b, StubThread(Oracle(truths, model="tuned")) as t:
        out = tmp_path / "cmp"
        rc = _cli(["finetune", "compare", "--data", str(items), "--out", str(out), "--base-model", "base",
                   "--tuned-model", "tuned", "--endpoint", b.url, "--tuned-endpoint", t.url, "--",
                   "--image-root-map", f"{AUTHORS_PREFIX}={root}", "--concurrency", "8", "--quiet"])
        assert rc == 0
        asked = b.stub.requests + t.stub.requests
        assert asked == 2 * (60 * 4 + 60 * 3)  # image: 4 levels; text: 3 (the leaf is auto-filled)
        res = json.loads((out / "compare.json").read_text())
        for side in ("base", "tuned"):
            for mode in ("image", "text"):
                s = summarize_path(out / f"{side}-{mode}")
                assert res["runs"][f"{side}-{mode}"]["hca"] == pytest.approx(s.hca, abs=1e-3)
                assert s.n_items == 60 and s.n_unanswered == 0
        d = res["deltas"]
        assert d["image"]["tuned_hca"] == 100.0 and d["text"]["tuned_hca"] == 100.0
        assert d["image"]["delta_hca"] == pytest.approx(100.0 - res["runs"]["base-image"]["hca"], abs=1e-3)
        assert res["text_gain_minus_visual_gain"] == pytest.approx(d["text"]["delta_hca"] - d["image"]["delta_hca"])
        md = (out / "compare.md").read_text()
        assert "| image |" in md and "| text |" in md and "Δ HCA" in md
        # running it again resumes every run: nothing is asked twice
        compare(Side("base", "base", (b.url,)), Side("tuned", "tuned", (t.url,)), items, out,
                options={"image_root_map": [f"{AUTHORS_PREFIX}={root}"]})
        assert b.stub.requests + t.stub.requests == asked


def test_compare_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such items file"):
        compare(Side("base", "b"), Side("tuned", "t"), tmp_path / "nope.jsonl", tmp_path)
    p = tmp_path / "i.jsonl"
    p.write_bytes(CUB.read_bytes().split(b"\n")[0] + b"\n")
    with pytest.raises(ValueError, match="unknown mode"):
        compare(Side("base", "b"), Side("tuned", "t"), p, tmp_path, modes=("video",))


def _adapter(tmp_path, **cfg):
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 64, "base_model_name_or_path": "base", **cfg}))
    return d


def test_lora_args_for_vllm(tmp_path):
    d = _adapter(tmp_path)
    assert lora_args(d, "tuned") == ["--enable-lora", "--lora-modules", f"tuned={d.resolve()}", "--max-lora-rank", "64"]
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 64, 100, 512)] == [1, 8, 8, 16, 64, 128, 512]
    with pytest.raises(ValueError, match="largest"):
        max_lora_rank(1024)
    with pytest.raises(ValueError, match="plain name"):
        lora_args(d, "a=b")
    with pytest.raises(ValueError, match="merge it"):
        lora_args(_adapter(tmp_path, modules_to_save=["multi_modal_projector"]))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_args(tmp_path / "nothing")


def test_finetune_serve_adds_the_adapter_to_the_profile_command(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    d = _adapter(tmp_path)
    rc = _cli(["finetune", "serve", "--adapter", str(d), "--profile", "qwen2.5-vl-7b", "--name", "hier",
               "--dry-run", "--", "--max-loras", "2"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith("vllm serve Qwen/Qwen2.5-VL-7B-Instruct ")
    assert out.rstrip().endswith(f"--enable-lora --lora-modules hier={d.resolve()} --max-lora-rank 64 --max-loras 2")
    assert "--dtype bfloat16" in out and "harness run --model hier" in err
