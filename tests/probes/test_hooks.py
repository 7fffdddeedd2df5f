"""Hook features equal what the model itself exposes (output_hidden_states, vision tower outputs), on
tiny random LLaVA and Qwen2-VL; image-token positions; batching; early stop."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from probes.arch import expand_sites, hook_point, site_order, spec_for
from probes.extract import feature_keys
from probes.hooks import Recorder
from probes.recipes import load_recipe

VISION = load_recipe("hierarchy-vision")


def _inputs(ext, paths, recipe=VISION):
    imgs = [ext.size_rule(recipe).apply(Image.open(p)) for p in paths]
    prompts = [ext.prompt(recipe, text=None, image=True) for _ in paths]
    return ext.encode(prompts, imgs)


def _reference(ext, inputs):
    """What the model exposes without hooks: hidden states, and the vision tower / projector outputs."""
    m = ext.model
    with torch.no_grad():
        hs = m(**inputs, output_hidden_states=True).hidden_states
        if m.config.model_type == "llava":
            tower = m.model.vision_tower(inputs["pixel_values"], output_hidden_states=True)
            vision = tower.hidden_states[m.config.vision_feature_layer][:, 1:]  # "default": CLS dropped
            proj = m.model.multi_modal_projector(vision)
            vision, proj = list(vision), list(proj)
        else:
            out = m.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
            n = inputs["image_grid_thw"].prod(-1)
            vision = list(out.last_hidden_state.split(n.tolist()))
            proj = list(out.pooler_output.split((n // ext.merge**2).tolist()))
    return hs, vision, proj


def test_hook_features_equal_hidden_states_and_vision_outputs(ext, images):
    inputs = _inputs(ext, images[1:2])
    sites = expand_sites(["vision", "projector", "llm.all"], ext.n_layers)
    keys = feature_keys(sites, ["last", "mean", "img_last", "img_mean"])
    got = ext.features(inputs, keys, n_images=1)
    hs, vision, proj = _reference(ext, inputs)
    assert len(hs) == ext.n_layers + 1
    close = torch.testing.assert_close
    close(torch.from_numpy(got["vision.last"][0]), vision[0][-1])
    close(torch.from_numpy(got["vision.mean"][0]), vision[0].mean(0))
    close(torch.from_numpy(got["projector.last"][0]), proj[0][-1])
    close(torch.from_numpy(got["projector.mean"][0]), proj[0].mean(0))
    img = inputs["input_ids"][0] == ext.image_token_id
    for k in range(ext.n_layers + 1):
        h = hs[k][0]
        close(torch.from_numpy(got[f"llm.{k}.last"][0]), h[-1])
        close(torch.from_numpy(got[f"llm.{k}.mean"][0]), h.mean(0))
        close(torch.from_numpy(got[f"llm.{k}.img_last"][0]), h[img][-1])
        close(torch.from_numpy(got[f"llm.{k}.img_mean"][0]), h[img].mean(0))
    # the last hidden state is after the final norm (protocol: "last decoder layer after the final norm")
    assert not torch.allclose(hs[-1], hs[-2])


def test_image_token_positions(ext, images):
    """The image-token positions are where the projector rows enter the LLM, in order."""
    inputs = _inputs(ext, images[4:5])  # 100x30: a wide image
    ids = inputs["input_ids"][0]
    pos = (ids == ext.image_token_id).nonzero().flatten()
    hs, _, proj = _reference(ext, inputs)
    assert len(pos) == proj[0].shape[0] > 0
    assert pos.tolist() == list(range(int(pos[0]), int(pos[0]) + len(pos)))  # one contiguous block
    tok = ext.tokenizer
    if ext.model_type == "qwen2_vl":
        assert ids[pos[0] - 1] == tok.convert_tokens_to_ids("<|vision_start|>")
        assert ids[pos[-1] + 1] == tok.convert_tokens_to_ids("<|vision_end|>")
        t, h, w = inputs["image_grid_thw"][0].tolist()
        assert len(pos) == t * h * w // 4
    else:
        assert len(pos) == 4  # 2x2 patches, CLS dropped
    # hidden state 0 at those positions is the projector output, row for row
    torch.testing.assert_close(hs[0][0, pos], proj[0])
    keys = feature_keys(["projector", "llm.0"], ["last", "mean", "img_last", "img_mean"])
    got = ext.features(inputs, keys, n_images=1)
    torch.testing.assert_close(torch.from_numpy(got["llm.0.img_mean"]), torch.from_numpy(got["projector.mean"]))
    torch.testing.assert_close(torch.from_numpy(got["llm.0.img_last"]), torch.from_numpy(got["projector.last"]))


def test_batched_equals_one_at_a_time(ext, images):
    """Padding and per-image splitting of vision rows: a batch of differently sized images gives each
    image's features as a batch of one does."""
    sites = expand_sites(["vision", "projector", "llm.-1"], ext.n_layers)
    keys = feature_keys(sites, ["last", "mean", "img_last", "img_mean"])
    paths = images[:4]
    batched = ext.features(_inputs(ext, paths), keys, n_images=len(paths))
    for i, p in enumerate(paths):
        single = ext.features(_inputs(ext, [p]), keys, n_images=1)
        for k in single:
            torch.testing.assert_close(torch.from_numpy(batched[k][i]), torch.from_numpy(single[k][0]),
                                       atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_text_features_every_layer(ext):
    """Text probing: mean over all prompt tokens at every hidden state, padding-independent."""
    recipe = load_recipe("text")
    sentences = [recipe.sentence.format(species=s, rank="genus", label="Geococcyx")
                 for s in ("Greater Roadrunner", "Sooty Albatross, a bird of the southern ocean", "Ani")]
    prompts = [ext.prompt(recipe, text=s, image=False) for s in sentences]
    assert "You are a helpful assistant." in prompts[0] and sentences[0] in prompts[0]
    keys = feature_keys(expand_sites(["llm.all"], ext.n_layers), ["mean"])
    got = ext.features(ext.encode(prompts, None), keys, n_images=0)
    for i, p in enumerate(prompts):
        one = ext.encode([p], None)
        with torch.no_grad():
            hs = ext.model(**one, output_hidden_states=True).hidden_states
        for k in range(ext.n_layers + 1):
            torch.testing.assert_close(torch.from_numpy(got[f"llm.{k}.mean"][i]), hs[k][0].mean(0), atol=1e-4, rtol=1e-4)


def test_forward_stops_after_the_deepest_site(llava_ext, images):
    """A vision-only extraction never runs a decoder layer."""
    ext = llava_ext
    calls = []
    layers = ext.model.model.language_model.layers
    h = layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        ext.features(_inputs(ext, images[:2]), feature_keys(["vision", "projector"], ["mean"]), n_images=2)
        assert calls == []
        ext.features(_inputs(ext, images[:2]), feature_keys(["llm.1"], ["mean"]), n_images=2)
        assert calls == [1]
    finally:
        h.remove()


def test_sites_and_table():
    assert expand_sites(["llm.-1", "vision", "llm.2", "llm.0"], 2) == ["llm.2", "vision", "llm.0"]
    assert expand_sites(["llm.all"], 3) == ["llm.0", "llm.1", "llm.2", "llm.3"]
    with pytest.raises(ValueError, match="hidden states 0..2"):
        expand_sites(["llm.3"], 2)
    with pytest.raises(ValueError, match="unknown site"):
        expand_sites(["merger"], 2)
    assert sorted(["llm.1", "projector", "vision", "llm.0"], key=site_order) == ["vision", "projector", "llm.0", "llm.1"]

    class Cfg:
        model_type = "mamba"

    with pytest.raises(ValueError, match="no hook table"):
        spec_for(Cfg())
    with pytest.raises(ValueError, match="unknown pools"):
        feature_keys(["vision"], ["max"])
    # vision sites take last/mean only; img_* apply to LLM sites
    assert feature_keys(["vision", "llm.1"], ["mean", "img_mean"]) == [
        ("vision", "mean"), ("llm.1", "mean"), ("llm.1", "img_mean")]


def test_hook_points_follow_the_table(llava_ext):
    m, spec = llava_ext.model, llava_ext.spec
    assert hook_point(m, spec, "vision").path == "model.multi_modal_projector"
    assert hook_point(m, spec, "vision").what == "input"
    assert hook_point(m, spec, "llm.0").what == "input"
    assert hook_point(m, spec, "llm.1").path == "model.language_model.layers.0"
    assert hook_point(m, spec, "llm.2").path == "model.language_model.norm"
    layer = m.model.language_model.layers[0]
    before = len(layer._forward_hooks)
    with Recorder(m, spec, ["llm.1"]):
        assert len(layer._forward_hooks) == before + 1
    assert len(layer._forward_hooks) == before  # removed on exit


def test_qwen25_window_order_matches_the_reference(qwen25_ext, tmp_path, make_images):
    """Qwen2.5-VL runs its vision blocks in window order. The reference's patched model saved the last
    block's output as is (`v_i`: its "last" row is the last in window order) and the merger output put
    back in raster order (`v_o`); the hooks read the same two tensors, and the projector rows are the
    ones the LLM receives at the image positions."""
    ext = qwen25_ext
    path = make_images(tmp_path, [(112, 112)])[0]
    inputs = _inputs(ext, [path])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]  # 4x4 merged tokens = 4 windows of 2x2
    keys = feature_keys(["vision", "projector", "llm.0"], ["last", "mean", "img_last", "img_mean"])
    got = ext.features(inputs, keys, n_images=1)
    with torch.no_grad():
        out = ext.model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        window_order = ext.model.model.visual.merger(out.last_hidden_state)
        hs = ext.model(**inputs, output_hidden_states=True).hidden_states
    assert not torch.allclose(window_order, out.pooler_output)  # the orders do differ here
    close = torch.testing.assert_close
    close(torch.from_numpy(got["vision.last"][0]), out.last_hidden_state[-1])
    close(torch.from_numpy(got["vision.mean"][0]), out.last_hidden_state.mean(0))
    close(torch.from_numpy(got["projector.last"][0]), out.pooler_output[-1])
    close(torch.from_numpy(got["projector.mean"][0]), out.pooler_output.mean(0))
    img = inputs["input_ids"][0] == ext.image_token_id
    close(hs[0][0][img], out.pooler_output)
    close(torch.from_numpy(got["llm.0.img_last"][0]), out.pooler_output[-1])


def test_text_only_llm(tmp_path):
    """Plain causal LMs (the study's "OG" LLMs): the llama row of the table, a tokenizer as processor, a
    pad token supplied for batching; every hidden state's mean matches output_hidden_states."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.support.tiny_models import build_tokenizer
    from probes.extract import Extractor

    tok = build_tokenizer("llava")
    tok.pad_token = None
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    ext = Extractor(tmp_path, device="cpu")
    assert ext.model_type == "llama" and ext.n_layers == 3 and not ext.has_images
    recipe = load_recipe("text")
    prompts = [ext.prompt(recipe, text=t, image=False) for t in ("Given the Ani, what is it?", "Sparrow")]
    keys = feature_keys(expand_sites(["llm.all"], ext.n_layers), ["mean", "last"])
    got = ext.features(ext.encode(prompts, None), keys, n_images=0)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            hs = ext.model(**ext.encode([p], None), output_hidden_states=True).hidden_states
        for k in range(4):
            torch.testing.assert_close(torch.from_numpy(got[f"llm.{k}.mean"][i]), hs[k][0].mean(0), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(torch.from_numpy(got[f"llm.{k}.last"][i]), hs[k][0][-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="text-only model cannot take images"):
        ext.prompt(load_recipe("hierarchy-vision"), text=None, image=True)
