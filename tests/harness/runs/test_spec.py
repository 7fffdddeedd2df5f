"""RunSpec: documented, round-trips through JSON and TOML, validates with messages that name the flag;
RunFolder: the one resume rule."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, Field, ValidationError

from harness.cli.run import add_run_arguments, spec_from_args
from harness.cli.spec_errors import validated
from harness.runs.folder import NOT_ANSWERS, RunFolder, Settings, SettingsChanged
from harness.runs.spec import ClipBackend, EndpointBackend, HierarchyTask, RunSpec


def _models(cls: type[BaseModel], seen: set) -> None:
    seen.add(cls)
    for f in cls.model_fields.values():
        for t in getattr(f.annotation, "__args__", ()) + (f.annotation,):
            for inner in getattr(t, "__args__", ()) + (t,):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in seen:
                    _models(inner, seen)


def test_every_field_of_the_spec_has_a_docstring():
    seen: set = set()
    _models(RunSpec, seen)
    assert {EndpointBackend, ClipBackend, HierarchyTask} <= seen
    undocumented = [f"{m.__name__}.{k}" for m in seen for k, f in m.model_fields.items()
                    if k != "kind" and not f.description]
    assert not undocumented


@pytest.mark.parametrize("spec", [
    RunSpec(out="o", data="d.jsonl"),
    RunSpec(out="o", data="d.jsonl", model="m", backend={"endpoints": ["http://a:1", "https://b/v1"], "rps": 2.5},
            task={"mode": "binary", "prompt_variant": "gpt", "profile": "qwen2.5-vl-7b"}, limit=7,
            image_root_map=["/old=/new"], max_tokens=3, temperature=0.2, seed=42),
    RunSpec(out="o", data="d.jsonl", model="hf:tiny", backend={"kind": "clip", "dtype": "bfloat16"}),
    RunSpec(out="o", model="m", backend={"endpoints": ["http://a:1"]},
            task={"kind": "classify", "dataset": "flowers", "task": "nway", "k": 5}),
    RunSpec(out="o", model="m", backend={"endpoints": ["http://a:1"]},
            task={"kind": "loglik", "dataset": "cars", "method": "prompt-logprobs", "prior": True}),
    RunSpec(out="o", model="m", backend={"endpoints": ["http://a:1"]}, task={"kind": "wikiqa", "control": "noimage"}),
])
def test_round_trips_through_json_and_toml(spec):
    assert RunSpec.model_validate_json(spec.model_dump_json()) == spec
    assert RunSpec.from_toml(spec.to_toml()) == spec
    assert RunSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_load_reads_toml_and_json_files(tmp_path):
    spec = RunSpec(out="o", data="d.jsonl", task={"mode": "text"}, limit=3)
    (tmp_path / "s.toml").write_text(spec.to_toml())
    (tmp_path / "s.json").write_text(spec.model_dump_json())
    assert RunSpec.load(tmp_path / "s.toml") == spec == RunSpec.load(tmp_path / "s.json")


def test_the_clip_backend_sets_the_answer_mode_and_needs_images():
    assert RunSpec(out="o", data="d", model="hf:x", backend={"kind": "clip"}).task.answer == "clip"
    with pytest.raises(ValidationError, match="task.mode must be image"):
        RunSpec(out="o", data="d", model="hf:x", backend={"kind": "clip"}, task={"mode": "text"})
    with pytest.raises(ValidationError, match="needs the CLIP backend"):
        RunSpec(out="o", data="d", task={"answer": "clip"})


def _cli_spec(*argv: str) -> RunSpec:
    import argparse

    p = argparse.ArgumentParser()
    add_run_arguments(p)
    return validated(spec_from_args, p.parse_args(list(argv)))


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0"], "--concurrency: Input should be greater than or equal to 1 (got 0)"),
    (["--limit", "-3"], "--limit: Input should be greater than or equal to 1 (got -3)"),
    (["--max-side", "-5"], "--max-side: Input should be greater than or equal to 1 (got -5)"),
    (["--endpoint", "127.0.0.1:8000"], "--endpoint: endpoint '127.0.0.1:8000' must start with http:// or https://"),
    (["--image-root-map", "/no/equals"], "--image-root-map: image root map '/no/equals' must be OM=NEW"
     .replace("OM", "OLD")),
    (["--backend", "tpu"], "--backend 'tpu': expected openai or clip[:SPEC]"),
])
def test_bad_flags_give_one_line_naming_the_flag(argv, message):
    with pytest.raises(ValueError) as e:
        _cli_spec("--data", "d.jsonl", "--out", "o", *argv)
    assert str(e.value) == message


def test_the_cli_builds_the_spec_the_api_would():
    spec = _cli_spec("--data", "d.jsonl", "--out", "o", "--endpoint", "http://a:1", "--mode", "text",
                     "--limit", "5", "--concurrency", "8", "--backend", "openai")
    assert spec == RunSpec(out="o", data="d.jsonl", backend={"endpoints": ["http://a:1"], "concurrency": 8},
                           task={"mode": "text"}, limit=5)
    clip = _cli_spec("--data", "d.jsonl", "--out", "o", "--backend", "clip:hf:tiny", "--batch-size", "4")
    assert clip.model == "hf:tiny" and isinstance(clip.backend, ClipBackend) and clip.backend.batch_size == 4


class _S(Settings):
    model: str
    limit: int | None = Field(json_schema_extra=NOT_ANSWERS)


def test_resume_rule_names_the_changed_field_and_ignores_non_answer_fields(tmp_path):
    folder = RunFolder(tmp_path / "r")
    folder.prepare()
    spec = RunSpec(out=str(folder.path), data="d")
    folder.write_manifest(kind="hierarchy", spec=spec, settings=_S(model="a", limit=3), status="done", started="t")
    folder.check("hierarchy", _S(model="a", limit=10))  # a larger limit extends the run
    with pytest.raises(SettingsChanged, match=r"\(model: 'a' -> 'b'\)"):
        folder.check("hierarchy", _S(model="b", limit=3))
    folder.check("hierarchy", _S(model="b", limit=3), force=True)
    with pytest.raises(SettingsChanged, match="holds a hierarchy run, not classify"):
        folder.check("classify", _S(model="a", limit=3))
    assert _S(model="a", limit=3).fingerprint() == {"model": "a"}
