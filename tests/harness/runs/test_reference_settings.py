"""Issue 12: settings resolved for `--protocol reference` (presets by mode, a prompt kind's own system
prompt over a profile's, token budgets, dedupe at temperature > 0) and the reference's >1680 px resize."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from harness.backends.images import MaxSide, encode_image, image_uuid, resized_size
from harness.prompts.hierarchy import catalogue
from harness.runs.hierarchy import HierarchyExperiment, preset_for, resolve
from harness.runs.spec import RunSpec
from tests.support.engine_helpers import CUB_SIMILAR


def _spec(**task) -> RunSpec:
    extra = {k: task.pop(k) for k in ("max_side", "temperature", "media") if k in task}
    return RunSpec(out="unused", data=str(CUB_SIMILAR), model="m", task=task, **extra)


def test_gpt4o_preset_differs_by_mode():
    assert preset_for("gpt-4o", "text")["ask_leaf"] is False  # every reference GPT text script fills the leaf
    assert "ask_leaf" not in preset_for("gpt-4o", "image")
    text = resolve(_spec(mode="text", preset="gpt-4o", protocol="reference"), "gpt-4o")
    image = resolve(_spec(preset="gpt-4o", protocol="reference"), "gpt-4o")
    assert not text.prompt.ask_leaf and text.prompt.text_parts and not image.prompt.text_parts
    assert (text.max_tokens, text.temperature, text.seed) == (5, 0.2, 42) == (image.max_tokens, image.temperature, image.seed)
    with pytest.raises(ValueError, match="unknown"):
        preset_for("gpt-5", "text")


def test_prompt_kind_system_prompt_wins_over_the_profile():
    cat = catalogue()["system"]
    tcot = resolve(_spec(taxonomy="inat_animal", taxonomy_cot=True, profile="qwen2.5-vl-7b", prompt_variant=1), "m")
    assert tcot.prompt.system_text() == cat["taxonomy_cot_animal"]
    assert tcot.max_tokens == 5  # bio_cot/eval_animal_bio.py: max_new_tokens=5
    plant = resolve(_spec(taxonomy="inat_plant", taxonomy_cot=True, profile="qwen2.5-vl-7b"), "m")
    assert plant.prompt.system_text() == cat["taxonomy_cot_plant"]
    binary = resolve(_spec(mode="binary", profile="qwen2.5-vl-7b"), "m")
    assert binary.prompt.system_text() == cat["binary"] and binary.max_tokens == 10
    plain = resolve(_spec(profile="qwen2.5-vl-7b"), "m")
    assert plain.prompt.system_text() == cat["qwen_expert"]
    # no profile: the taxonomy-CoT budget is the reference's 5, a plain run's 10
    assert resolve(_spec(taxonomy="inat_animal", taxonomy_cot=True), "m").max_tokens == 5
    assert resolve(_spec(), "m").max_tokens == 10
    # an explicit --system still wins over everything
    assert resolve(_spec(mode="binary", profile="qwen2.5-vl-7b", system="helpful"), "m").prompt.system_text() == cat["helpful"]


def test_profile_data_drives_label_case_context_and_api():
    llava = resolve(_spec(mode="text", profile="llava-onevision-7b"), "m").prompt
    assert llava.label_case == "lower" and llava.request == "chat"
    assert resolve(_spec(profile="llava-onevision-7b", taxonomy_in_context=True), "m").prompt.context_position == "user"
    assert resolve(_spec(mode="text", profile="qwen2.5-vl-7b"), "m").prompt.label_case == "original"
    base = resolve(_spec(mode="text", profile="qwen2.5-7b"), "m")
    assert base.prompt.request == "completions" and base.max_tokens == 5


def test_new_prompt_fields_keep_old_fingerprints():
    # fields added for issue 12 are left out at their defaults: folders written before still resume
    d = resolve(_spec(), "m").prompt.model_dump(mode="json")
    assert not {"context_position", "label_case", "ask_none", "request", "text_parts"} & set(d)


def test_dedupe_off_under_reference_when_sampling():
    assert not HierarchyExperiment(_spec(mode="text", preset="gpt-4o", protocol="reference"), "m").dedupe
    assert HierarchyExperiment(_spec(mode="text", protocol="reference"), "m").dedupe
    assert HierarchyExperiment(_spec(mode="text", preset="gpt-4o"), "m").dedupe  # robust keeps it
    assert not HierarchyExperiment(_spec(mode="text", protocol="reference", temperature=0.7), "m").dedupe


# ------------------------------------------------------------------ the >1680 px resize

def ref_resize(w: int, h: int) -> tuple[int, int]:
    """eval_CUB.py (Qwen): scale_factor = 1680 / max_dim; (int(width * scale_factor), int(height * scale_factor))."""
    max_dim = max(w, h)
    if max_dim > 1680:
        s = 1680 / max_dim
        return int(w * s), int(h * s)
    return w, h


@pytest.mark.parametrize("size", [(2125, 1600), (2213, 1400), (1200, 2424), (2049, 1537), (1680, 900)])
def test_reference_resize_arithmetic(tmp_path, size):
    want = ref_resize(*size)
    assert resized_size(*size, 1680, "reference") == want
    p = tmp_path / "im.png"
    Image.new("RGB", size, (10, 120, 200)).save(p)
    ref = encode_image(str(p), max_side=MaxSide(1680, "reference"))
    assert ref.size == want
    exact = encode_image(str(p), max_side=1680)
    if max(size) > 1680:
        assert max(exact.size) == 1680
        # the resized pixels travel losslessly under the reference rule (the reference kept them in memory)
        assert ref.url.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(ref.url.split(",", 1)[1]))) as im:
            assert im.size == want
        assert ref.uuid != exact.uuid  # other pixels, another multimodal cache id
    if size in ((2125, 1600), (2213, 1400), (1200, 2424)):
        assert max(want) == 1679  # the reference's long side falls one short
    assert image_uuid(str(p), 1680) == image_uuid(str(p), MaxSide(1680))  # a plain cap keeps its id


def test_reference_protocol_sends_the_rule_with_max_side():
    exp = HierarchyExperiment(_spec(protocol="reference", max_side=1680), "m")
    assert exp.settings.resize == "reference" and exp.max_side == 1680 and exp.max_side.rule == "reference"
    rob = HierarchyExperiment(_spec(max_side=1680), "m")
    assert rob.settings.resize == "exact" and rob.max_side.rule == "exact"
    assert HierarchyExperiment(_spec(protocol="reference"), "m").max_side is None
