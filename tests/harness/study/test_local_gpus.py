"""The local executor on a multi-GPU box (fake GPU ids, stub servers, no GPU needed): models side by
side on disjoint GPUs (each server's CUDA_VISIBLE_DEVICES is its TP x DP share), a model that does not
fit waits or is blocked, data-parallel servers get URL#dp=N; the GPU inventory; `plan prefetch`."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from pathlib import Path

import orjson
import pytest

from harness.study import cells, executor, gpus, plan_spec, prefetch
from tests.support.stub_server import Stub, StubThread

REPO = Path(__file__).resolve().parents[3]
BASE_PROFILE = (REPO / "servers" / "qwen2.5-7b-instruct.toml").read_text()


def _profile(tmp_path: Path, name: str, tp: int, dp: int = 1) -> Path:
    text = BASE_PROFILE.replace('name = "qwen2.5-7b-instruct"', f'name = "{name}"')
    text = text.replace('compose_service = "vllm-qwen-llm"', f'compose_service = "vllm-{name}"')
    text = re.sub(r"(?m)^data_parallel_size = .*\n", "", text)
    text = re.sub(r"(?m)^tensor_parallel_size = .*$", f"tensor_parallel_size = {tp}"
                  + (f"\ndata_parallel_size = {dp}" if dp > 1 else ""), text)
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def _plan(tmp_path: Path, models: dict[str, Path]) -> cells.Expansion:
    ms = "".join(f'[[models]]\nname = "{n}"\nprofile = "{p}"\n' for n, p in models.items())
    p = tmp_path / "p.toml"
    p.write_text(f'''
name = "box"
out = "{tmp_path / 'out'}"
modes = "text"
variants = [1]
limit = 3
{ms}
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl" }}
''')
    return cells.expand(plan_spec.load_plan(p).spec)


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """vLLM "available" and start_server replaced by a stub server that records, per start, the model,
    its CUDA_VISIBLE_DEVICES, its data-parallel size and when it ran (from whatever worker process)."""
    log = tmp_path / "starts.jsonl"
    monkeypatch.setattr(executor, "choose_backend", lambda requested="auto": "vllm")
    together: dict[str, str] = {}  # model -> a model whose server must have started before it serves

    @contextlib.contextmanager
    def fake_start(model=None, *, profile=None, served_model_name=None, log_path=None, **kw):
        rec = {"model": profile.name, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
               "dp": getattr(profile.vllm, "data_parallel_size", 1), "start": time.time()}
        (tmp_path / f"started-{profile.name}").touch()
        other = together.get(profile.name)
        if other:  # proves side by side: this server waits (up to 10 s) for the other one to start
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (tmp_path / f"started-{other}").exists():
                time.sleep(0.02)
            rec["met"] = (tmp_path / f"started-{other}").exists()
        with StubThread(Stub(model=profile.hf_id, latency=0.02)) as st:
            yield st.url, served_model_name or profile.hf_id
        rec["end"] = time.time()
        with log.open("ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(orjson.dumps(rec) + b"\n")

    monkeypatch.setattr(executor, "start_server", fake_start)

    def starts():
        return [orjson.loads(x) for x in log.read_bytes().splitlines()] if log.exists() else []

    return starts, together


def test_models_run_side_by_side_on_disjoint_gpus(tmp_path, fake_vllm):
    starts, together = fake_vllm
    together.update(a="b", b="a")
    exp = _plan(tmp_path, {"a": _profile(tmp_path, "a", 1), "b": _profile(tmp_path, "b", 1),
                           "c": _profile(tmp_path, "c", 2)})
    out = executor.run_plan(exp, gpus=["3", "5"], log=lambda s: None)
    assert [(o.key.split("/")[0], o.result) for o in out] == [("a", "done"), ("b", "done"), ("c", "done")]
    got = {s["model"]: s for s in starts()}
    assert {got["a"]["cuda"], got["b"]["cuda"]} == {"3", "5"}  # disjoint single GPUs
    assert got["c"]["cuda"] == "3,5"  # TP 2: both, once a and b are done
    assert len({got[m]["pid"] for m in "abc"} | {os.getpid()}) == 4  # each in its own worker
    assert got["a"]["met"] and got["b"]["met"]  # each saw the other's server start while it ran
    assert got["c"]["start"] >= max(got["a"]["end"], got["b"]["end"]) - 0.5
    for c in exp.cells:
        assert orjson.loads((c.out / "run.json").read_bytes())["status"] == "done"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ or os.environ["CUDA_VISIBLE_DEVICES"] != "3,5"


def test_one_gpu_runs_models_one_after_another_and_blocks_what_cannot_fit(tmp_path, fake_vllm):
    starts, _ = fake_vllm
    exp = _plan(tmp_path, {"a": _profile(tmp_path, "a", 1), "b": _profile(tmp_path, "b", 1),
                           "c": _profile(tmp_path, "c", 2)})
    out = executor.run_plan(exp, gpus=["0"], log=lambda s: None)
    res = {o.key.split("/")[0]: o.result for o in out}
    assert res["a"] == res["b"] == "done"
    assert res["c"].startswith("blocked: model c: its server needs 2 GPUs (tensor parallel), 1 here (0)")
    s = sorted(starts(), key=lambda r: r["start"])
    assert [(r["model"], r["cuda"]) for r in s] == [("a", "0"), ("b", "0")]
    assert s[1]["start"] >= s[0]["end"] - 0.5  # never two servers on GPU 0


def test_without_gpus_the_plan_runs_serially_in_process(tmp_path, fake_vllm):
    starts, _ = fake_vllm
    exp = _plan(tmp_path, {"a": _profile(tmp_path, "a", 1), "b": _profile(tmp_path, "b", 1)})
    out = executor.run_plan(exp, gpus=[], log=lambda s: None)
    assert [o.result for o in out] == ["done", "done"]
    assert {s["pid"] for s in starts()} == {os.getpid()} and {s["cuda"] for s in starts()} <= {None, ""} | {
        os.environ.get("CUDA_VISIBLE_DEVICES")}


def test_a_data_parallel_server_gets_its_share_and_a_dp_endpoint(tmp_path, fake_vllm, monkeypatch):
    from harness.serving.profiles import VllmSettings

    if "data_parallel_size" not in VllmSettings.model_fields:
        pytest.skip("profiles have no data_parallel_size yet")
    starts, _ = fake_vllm
    seen = []
    real = executor.SpecRunner.run
    monkeypatch.setattr(executor.SpecRunner, "run", lambda self, spec, quiet=False: seen.append(spec) or real(
        self, spec, quiet=quiet))
    exp = _plan(tmp_path, {"d": _profile(tmp_path, "d", 1, dp=4)})
    assert executor.run_plan(exp, gpus=["0", "1", "2"], log=lambda s: None)[0].result == "done"
    (s,) = starts()
    assert (s["cuda"], s["dp"]) == ("0,1,2", 3)  # DP 4 wanted, 3 fit
    assert seen[0].backend.endpoints[0].endswith("#dp=3")  # items pinned to engines; 256 in flight each


def test_gpu_inventory_and_fit(monkeypatch):
    assert gpus.parse_gpus("4") == ["0", "1", "2", "3"] and gpus.parse_gpus("0,2") == ["0", "2"]
    assert gpus.parse_gpus("") == []
    with pytest.raises(ValueError, match="twice"):
        gpus.parse_gpus("1,1")
    assert gpus.gpu_inventory("2,3") == ["2", "3"]
    assert gpus.gpu_inventory(env={"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == ["GPU-aa", "GPU-bb"]
    assert gpus.gpu_inventory(env={"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]  # an id, not a count
    assert gpus.gpu_inventory(env={"CUDA_VISIBLE_DEVICES": ""}) == []
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    assert gpus.gpu_inventory(env={}) == []  # no nvidia-smi: none
    f = gpus.fit(2, 3, list("abcdefg"))
    assert (f.tp, f.dp, f.gpus) == (2, 3, tuple("abcdef"))
    assert gpus.fit(2, None, list("abcde")).dp == 2 and gpus.fit(4, 1, list("abc")) is None


def test_prefetch_downloads_what_the_plan_would_serve(tmp_path, monkeypatch, cli):
    weights = tmp_path / "merged"
    weights.mkdir()
    p = tmp_path / "p.toml"
    p.write_text(f'''
name = "pre"
out = "{tmp_path / 'out'}"
modes = "text"
variants = [1]
[[models]]
name = "llm"
profile = "qwen2.5-7b-instruct"
[[models]]
name = "same"
profile = "qwen2.5-7b-instruct"
[[models]]
name = "tuned"
path = "org/tuned-model"
[[models]]
name = "local"
path = "{weights}"
[[models]]
name = "remote"
profile = "qwen2-7b-instruct"
endpoint = "http://127.0.0.1:9/v1"
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl" }}
''')
    calls = []

    def fake(repo_id, revision=None):
        calls.append((repo_id, revision))
        if repo_id == "org/tuned-model":
            raise OSError("401 gated repo")
        return f"/hf/{repo_id}"

    monkeypatch.setattr(prefetch, "snapshot_download", fake)
    rc, out, _ = cli("plan", "prefetch", p)
    assert rc == 1  # one failed
    assert calls == [("Qwen/Qwen2.5-7B-Instruct", None), ("org/tuned-model", None)]  # once per repo
    assert "llm: Qwen/Qwen2.5-7B-Instruct -> /hf/Qwen/Qwen2.5-7B-Instruct" in out
    assert "tuned: org/tuned-model -> failed: OSError: 401 gated repo" in out
    assert "local: skipped: local weights" in out and "remote: skipped: served at the plan's endpoint" in out
    calls.clear()
    rc, out, _ = cli("plan", "prefetch", p, "--dry-run", "--models", "llm")
    assert rc == 0 and calls == [] and "would download" in out
