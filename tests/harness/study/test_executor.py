"""The plan executor on its own: cells run by an injected runner, servers chosen by the serving rule,
and broken profiles or unknown presets refused when the plan is loaded."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from harness.serving import profiles as servers
from harness.study import cells, executor, plan_spec

PLAN = '''
name = "p"
out = "{out}"
modes = "text"
variants = [1]
limit = 3
[[models]]
name = "m"
model = "served-m"
endpoint = "http://127.0.0.1:9/v1"
{extra}
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl" }}
'''


def _plan(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "p.toml"
    p.write_text(PLAN.format(out=tmp_path / "out", extra=extra))
    return p


class FakeRunner:
    def __init__(self, kinds=("hierarchy",), rc=0):
        self._kinds, self.rc, self.ran = set(kinds), rc, []

    def kinds(self):
        return self._kinds

    def run(self, spec, *, quiet=False):
        self.ran.append(spec)
        return self.rc


def test_cells_are_run_by_the_injected_runner(tmp_path):
    exp = cells.expand(plan_spec.load_plan(_plan(tmp_path)).spec)
    runner = FakeRunner()
    out = executor.run_plan(exp, runner, log=lambda s: None)
    assert [(o.key, o.result) for o in out] == [("m/cub.similar.text.v1.generate.robust.n3", "done")]
    (spec,) = runner.ran
    assert (spec.backend.endpoints, spec.model) == (["http://127.0.0.1:9/v1"], "served-m")
    assert spec.limit == 3 and spec.task.prompt_variant == "1" and spec.task.mode == "text"
    assert (exp.cells[0].out / "plan-cell.json").is_file()


def test_runner_decides_what_is_missing_rejected_or_failed(tmp_path):
    exp = cells.expand(plan_spec.load_plan(_plan(tmp_path)).spec)
    out = executor.run_plan(exp, FakeRunner(kinds=("classify",)), log=lambda s: None)
    assert out[0].result == "blocked: `harness run` not available yet"
    bad = cells.expand(plan_spec.load_plan(_plan(tmp_path, 'args = ["--x"]')).spec)
    out = executor.run_plan(bad, FakeRunner(), log=lambda s: None)
    assert out[0].result == "failed: arguments not accepted by `harness run`: unrecognized arguments: --x"
    out = executor.run_plan(exp, FakeRunner(rc=3), log=lambda s: None)
    assert (out[0].result, out[0].rc) == ("failed (exit 3)", 3)


def test_a_broken_profile_named_by_a_plan_is_an_error(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("name = 'mine'\n[vllm]\nmax_model_len = 'long'\n")
    with pytest.raises(plan_spec.PlanError, match=rf"p\.toml: models\[0\] \(m\)\.profile: {bad}: invalid server profile"):
        plan_spec.load_plan(_plan(tmp_path, f'profile = "{bad}"'))


def test_presets_are_checked_when_the_caller_knows_them(tmp_path):
    p = _plan(tmp_path, 'preset = "gpt-9"')
    with pytest.raises(plan_spec.PlanError, match=r"models\[0\] \(m\)\.preset: unknown preset 'gpt-9'; known: gpt-4o"):
        plan_spec.load_plan(p, presets=["gpt-4o"])
    assert plan_spec.load_plan(p).spec.models[0].preset == "gpt-9"  # left to the cell's command


def _entry(**kw) -> plan_spec.ModelEntry:
    return plan_spec.ModelEntry(name="m", **kw)


@pytest.mark.parametrize(("backend", "kw", "want"), [
    ("vllm", {"profile": "qwen2.5-7b-instruct"}, "a vLLM server the plan starts with profile qwen2.5-7b-instruct"),
    ("vllm", {"path": "/w/merged"}, "a vLLM server the plan starts with /w/merged"),
    ("transformers", {"path": "/w/merged", "profile": "qwen2.5-7b-instruct"},
     "a transformers server the plan starts for /w/merged"),
    ("transformers", {"profile": "qwen2.5-7b-instruct"}, "nothing: no endpoint and no way to start one here"),
])
def test_what_a_plan_starts_follows_the_serving_backend_choice(monkeypatch, backend, kw, want):
    monkeypatch.setattr(executor, "choose_backend", lambda requested="auto": backend)
    assert executor.launch_description(_entry(**kw)).startswith(want)


def test_launch_server_starts_the_profile_with_the_local_weights(monkeypatch, tmp_path):
    calls = []

    @contextlib.contextmanager
    def fake_start(model=None, **kw):
        calls.append((model, kw))
        yield "http://127.0.0.1:1/v1", kw["served_model_name"] or kw["profile"].hf_id

    monkeypatch.setattr(executor, "choose_backend", lambda requested="auto": "vllm")
    monkeypatch.setattr(executor, "start_server", fake_start)
    with executor.launch_server(_entry(profile="qwen2.5-7b-instruct", path="/w/merged"), tmp_path / "logs") as got:
        assert got == (["http://127.0.0.1:1/v1"], "Qwen/Qwen2.5-7B-Instruct")
    ((model, kw),) = calls
    assert model == "/w/merged" and kw["profile"] == servers.load_profile("qwen2.5-7b-instruct")
    assert kw["backend"] == "vllm" and kw["log_path"] == tmp_path / "logs" / "m.log"
    monkeypatch.setattr(executor, "choose_backend", lambda requested="auto": "transformers")
    with pytest.raises(executor.LaunchUnavailable, match="vLLM with a GPU is not available here.*--endpoint m=URL"), \
            executor.launch_server(_entry(profile="qwen2.5-7b-instruct"), tmp_path / "logs"):
        pass
