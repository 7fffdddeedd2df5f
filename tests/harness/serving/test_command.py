"""The one vLLM command builder, the one backend choice, and profile lookup for a model to serve."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest

from harness.serving import command, launcher
from harness.serving import profiles as servers
from harness.serving.command import choose_backend, vllm_command
from harness.serving.profiles import ProfileError, find_profile, load_profile


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def test_vllm_command_from_a_profile_cli_and_module():
    prof = load_profile("qwen2.5-vl-7b")
    cli = vllm_command(prof, host="127.0.0.1", port=9000, extra=["--max-num-seqs", "8"])
    assert cli[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert cli[3:] == prof.vllm_args(host="127.0.0.1", port=9000)[1:] + ["--max-num-seqs", "8"]
    mod = vllm_command(prof, model="/w/merged", port=9000, served_model_name="tuned", launcher="python")
    assert mod[:2] == [sys.executable, "-c"] and mod[3:5] == ["serve", "/w/merged"]
    assert "from vllm.entrypoints.cli.main import main" in mod[2]  # the `vllm serve` CLI, not api_server
    assert vllm_command(prof, model="/w/merged", port=9000, launcher="module") == \
        vllm_command(prof, model="/w/merged", port=9000, launcher="python")  # the old name: same command
    assert mod[mod.index("--served-model-name") + 1:][:2] == ["tuned", "qwen2.5-vl-7b"]
    assert _flag(mod, "--limit-mm-per-prompt") == '{"image": 1}'


def test_vllm_command_for_a_bare_model():
    argv = vllm_command(model="/models/x", host="127.0.0.1", port=8123, served_model_name="x")
    assert argv == ["vllm", "serve", "/models/x", "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "x"]
    with pytest.raises(ValueError, match="profile or a model"):
        vllm_command(port=1)
    with pytest.raises(ValueError, match="launcher"):
        vllm_command(model="m", port=1, launcher="docker")  # type: ignore[arg-type]


@pytest.mark.parametrize(("vllm", "gpu", "want"), [(True, True, "vllm"), (True, False, "transformers"),
                                                   (False, True, "transformers"), (False, False, "transformers")])
def test_choose_backend_needs_vllm_and_a_gpu(monkeypatch, vllm, gpu, want):
    monkeypatch.setattr(command, "vllm_available", lambda: vllm)
    monkeypatch.setattr(command, "gpu_available", lambda: gpu)
    assert choose_backend() == want
    assert choose_backend("vllm") == "vllm" and choose_backend("transformers") == "transformers"


def test_choose_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown server backend 'tgi'"):
        choose_backend("tgi")


def _profiles_in(monkeypatch, tmp_path: Path) -> Path:
    d = tmp_path / "servers"
    d.mkdir()
    good = servers.profiles_dir() / "qwen2.5-7b-instruct.toml"
    (d / good.name).write_text(good.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(servers, "profiles_dir", lambda: d)
    return d


def test_a_model_without_a_profile_is_fine(monkeypatch, tmp_path):
    _profiles_in(monkeypatch, tmp_path)
    assert find_profile(str(tmp_path / "weights")) is None
    assert find_profile("org/some-model") is None
    assert find_profile("Qwen/Qwen2.5-7B-Instruct").name == "qwen2.5-7b-instruct"


def test_a_broken_profile_is_an_error_naming_the_file(monkeypatch, tmp_path):
    d = _profiles_in(monkeypatch, tmp_path)
    broken = d / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ProfileError, match=str(broken) + ": invalid TOML"):
        find_profile("broken")
    with pytest.raises(ProfileError, match=str(broken)):  # looked up by HF id: every profile is read
        find_profile("org/some-model")


def _capture_server(monkeypatch) -> list[list[str]]:
    cmds: list[list[str]] = []

    @contextlib.contextmanager
    def fake(cmd, port, **kw):
        cmds.append(cmd)
        yield f"http://127.0.0.1:{port}/v1"

    monkeypatch.setattr(launcher, "managed_server", fake)
    monkeypatch.setattr(launcher, "choose_backend", lambda requested="auto": "vllm")
    monkeypatch.setattr(launcher, "default_launcher", lambda: "cli")
    return cmds


def test_local_server_uses_the_profile_of_a_study_model(monkeypatch):
    cmds = _capture_server(monkeypatch)
    with launcher.local_server("qwen2.5-vl-7b", quiet=True) as server:
        assert server.model == "qwen2.5-vl-7b"
    (cmd,) = cmds
    assert cmd[2] == "Qwen/Qwen2.5-VL-7B-Instruct"  # a profile name is not a weights folder
    assert cmd[cmd.index("--served-model-name") + 1] == "qwen2.5-vl-7b"
    assert _flag(cmd, "--max-model-len") == "16384" and _flag(cmd, "--host") == "127.0.0.1"


def test_local_server_serves_a_bare_folder_under_its_own_name(monkeypatch, tmp_path):
    cmds = _capture_server(monkeypatch)
    model = str(tmp_path / "merged")
    with launcher.local_server(model, quiet=True) as server:
        assert server.model == model
    (cmd,) = cmds
    assert cmd[:3] == ["vllm", "serve", model] and _flag(cmd, "--served-model-name") == model
    assert "--max-model-len" not in cmd


def test_local_server_does_not_swallow_a_broken_profile(monkeypatch, tmp_path):
    cmds = _capture_server(monkeypatch)
    d = _profiles_in(monkeypatch, tmp_path)
    (d / "mine.toml").write_text("name = 'mine'\nbogus = 1\n")
    with pytest.raises(ProfileError, match=str(d / "mine.toml")), launcher.local_server("mine", quiet=True):
        pass
    assert cmds == []  # nothing started


def test_local_server_with_an_explicit_profile_serves_a_local_folder_with_its_arguments(monkeypatch, tmp_path):
    """`harness run --model /weights --profile qwen2.5-vl-7b`: the profile's vLLM arguments, the folder as weights."""
    cmds = _capture_server(monkeypatch)
    weights = tmp_path / "qwen-ft"
    weights.mkdir()
    with launcher.local_server(str(weights), profile="qwen2.5-vl-7b", quiet=True) as server:
        assert server.model == str(weights)
    (cmd,) = cmds
    prof = load_profile("qwen2.5-vl-7b")
    assert cmd[:3] == ["vllm", "serve", str(weights)]
    assert _flag(cmd, "--max-model-len") == "16384" and _flag(cmd, "--limit-mm-per-prompt") == '{"image": 1}'
    assert _flag(cmd, "--gpu-memory-utilization") == f"{prof.vllm.gpu_memory_utilization:g}"
    assert cmd[cmd.index("--served-model-name") + 1:][:2] == [str(weights), "qwen2.5-vl-7b"]
    assert _flag(cmd, "--host") == "127.0.0.1"


def test_local_server_passes_its_key_to_the_health_wait_and_names_it(monkeypatch, tmp_path):
    seen: list[dict] = []

    @contextlib.contextmanager
    def fake(cmd, port, **kw):
        seen.append(kw)
        yield f"http://127.0.0.1:{port}/v1"

    monkeypatch.setattr(launcher, "managed_server", fake)
    monkeypatch.setattr(launcher, "choose_backend", lambda requested="auto": "vllm")
    monkeypatch.setattr(launcher, "default_launcher", lambda: "cli")
    monkeypatch.setenv("VLLM_API_KEY", "sekrit")
    with launcher.local_server(str(tmp_path), quiet=True) as server:
        assert server.api_key_env == "VLLM_API_KEY"
    assert seen[0]["api_key"] == "sekrit" and seen[0]["env"]["VLLM_API_KEY"] == "sekrit"
    assert "sekrit" not in " ".join(str(v) for k, v in seen[0].items() if k != "env" and k != "api_key")
    assert "--server-timeout" in seen[0]["timeout_hint"]
    monkeypatch.delenv("VLLM_API_KEY")
    with launcher.local_server(str(tmp_path), quiet=True, timeout=12) as server:
        assert server.api_key_env is None
    assert seen[1]["api_key"] is None and "VLLM_API_KEY" not in seen[1]["env"] and seen[1]["timeout"] == 12


@pytest.mark.parametrize(("cuda", "device"), [(True, "cuda"), (False, "cpu")])
def test_the_transformers_fallback_uses_the_gpu_when_there_is_one(monkeypatch, tmp_path, cuda, device):
    import types

    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: cuda))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert command.gpu_available() is cuda
    assert command.transformers_device() == device
    assert _flag(command.transformers_command("/m", 8000), "--device") == device
    assert _flag(command.transformers_command("/m", 8000, device="cuda:1"), "--device") == "cuda:1"
    # and the launcher's fallback (vLLM absent) starts it so
    cmds: list[list[str]] = []

    @contextlib.contextmanager
    def fake(cmd, port, **kw):
        cmds.append(cmd)
        yield f"http://127.0.0.1:{port}/v1"

    monkeypatch.setattr(launcher, "managed_server", fake)
    monkeypatch.setattr(launcher, "transformers_available", lambda: True)
    monkeypatch.setattr(command, "vllm_available", lambda: False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with launcher.local_server(str(tmp_path), quiet=True):
        pass
    assert _flag(cmds[0], "--device") == device


def test_default_launcher_and_a_separate_vllm_python(monkeypatch):
    monkeypatch.setenv(command.VLLM_PYTHON_ENV, "/opt/vllm-venv/bin/python")
    assert command.default_launcher() == "python"
    argv = vllm_command(model="/m", port=1)
    assert argv[:3] == ["vllm", "serve", "/m"]
    argv = vllm_command(model="/m", port=1, launcher=command.default_launcher())
    assert argv[0] == "/opt/vllm-venv/bin/python" and argv[3:5] == ["serve", "/m"]
    assert command.vllm_available() is False  # no such interpreter
    monkeypatch.delenv(command.VLLM_PYTHON_ENV)
    monkeypatch.setattr(command.shutil, "which", lambda name: None)
    assert command.default_launcher() == "python"


# -- data parallel, the vision encoder's TP mode, the pixel cap, the GPUs a server takes ---------------


def test_data_parallel_size_reaches_the_command_and_the_gpu_count():
    prof = load_profile("qwen2.5-vl-7b")
    assert prof.vllm.data_parallel_size == 1 and prof.gpus == 1
    assert "--data-parallel-size" not in vllm_command(prof, port=1)  # DP 1: vLLM's default, not emitted
    argv = vllm_command(prof, port=1, data_parallel_size=4)
    assert _flag(argv, "--data-parallel-size") == "4" and _flag(argv, "--tensor-parallel-size") == "1"
    argv = vllm_command(load_profile("qwen2.5-vl-72b"), port=1, tensor_parallel_size=2, data_parallel_size=2)
    assert _flag(argv, "--tensor-parallel-size") == "2" and _flag(argv, "--data-parallel-size") == "2"
    wide = prof.model_copy(update={"vllm": prof.vllm.model_copy(update={"tensor_parallel_size": 2,
                                                                        "data_parallel_size": 3})})
    assert wide.gpus == 6 and wide.default_device_ids() == ["0", "1", "2", "3", "4", "5"]
    assert _flag(vllm_command(wide, port=1), "--data-parallel-size") == "3"
    bare = vllm_command(model="/m", port=1, tensor_parallel_size=2, data_parallel_size=4)
    assert _flag(bare, "--tensor-parallel-size") == "2" and _flag(bare, "--data-parallel-size") == "4"
    with pytest.raises(ValueError, match=">= 1"):
        prof.vllm_args(data_parallel_size=0)


def test_a_data_parallel_size_in_a_profile_file(tmp_path):
    src = (servers.profiles_dir() / "qwen2.5-vl-7b.toml").read_text(encoding="utf-8")
    f = tmp_path / "qwen2.5-vl-7b.toml"
    f.write_text(src.replace("data_parallel_size = 1", "data_parallel_size = 8"), encoding="utf-8")
    prof = load_profile(f)
    assert prof.gpus == 8 and _flag(prof.vllm_args(), "--data-parallel-size") == "8"
    f.write_text(src.replace("data_parallel_size = 1", "data_parallel_size = 0"), encoding="utf-8")
    with pytest.raises(ProfileError, match="vllm.data_parallel_size"):
        load_profile(f)
    for flag in ("-dp", "--data-parallel-size=2", "--tensor-parallel-size"):  # the GPU count has one home
        f.write_text(src.replace('generation_config = "auto"', f'generation_config = "auto"\nextra_args = ["{flag}"]'),
                     encoding="utf-8")
        with pytest.raises(ProfileError, match="data_parallel_size"):
            load_profile(f)


def test_mm_encoder_tp_mode_data_for_the_large_qwen_models_only():
    """vLLM 0.32: `--mm-encoder-tp-mode {data,weights}` (EngineArgs.mm_encoder_tp_mode)."""
    for name in ("qwen2.5-vl-32b", "qwen2.5-vl-72b"):
        prof = load_profile(name)
        assert prof.vllm.tensor_parallel_size > 1
        assert _flag(vllm_command(prof, port=1), "--mm-encoder-tp-mode") == "data"
    for name in servers.list_profiles():
        if name not in ("qwen2.5-vl-32b", "qwen2.5-vl-72b"):
            assert "--mm-encoder-tp-mode" not in vllm_command(load_profile(name), port=1), name


def test_mm_encoder_tp_mode_is_for_vlms(tmp_path):
    src = (servers.profiles_dir() / "qwen2.5-7b-instruct.toml").read_text(encoding="utf-8")
    f = tmp_path / "qwen2.5-7b-instruct.toml"
    f.write_text(src.replace("data_parallel_size = 1", 'data_parallel_size = 1\nmm_encoder_tp_mode = "data"'),
                 encoding="utf-8")
    with pytest.raises(ProfileError, match="vision encoder"):
        load_profile(f)


def test_qwen_vl_pixel_cap_is_the_reference_1680_px_square():
    """Qwen2.5-VL's `max_pixels` (vLLM 0.32 maps it to the processor's size.longest_edge, a pixel count):
    1680 x 1680, i.e. at most 3600 image tokens of 28 x 28 px. 1680 is a multiple of 28, so an image the
    client shrank to 1680 px on its longest side (the reference's rule) is not resized again."""
    for name in ("qwen2.5-vl-7b", "qwen2.5-vl-32b", "qwen2.5-vl-72b"):
        kw = json.loads(_flag(vllm_command(load_profile(name), port=1), "--mm-processor-kwargs"))
        assert kw == {"max_pixels": 1680 * 1680}
        assert kw["max_pixels"] // (28 * 28) == 3600 and 1680 % 28 == 0
    for name in ("llava-onevision-7b", "internvl2.5-8b"):
        args = vllm_command(load_profile(name), port=1)
        assert "max_pixels" not in " ".join(args)


def test_plan_gpus_explicit_ids_and_their_sources():
    q7, q72 = load_profile("qwen2.5-vl-7b"), load_profile("qwen2.5-vl-72b")
    assert q7.gpus_env == "VLLM_QWEN_GPUS" and q72.gpus_env == "VLLM_QWEN_72B_GPUS"
    plan = command.plan_gpus(q72, environ={})
    assert plan == command.GpuPlan(["0", "1", "2", "3"], 4, 1, "default")
    assert plan.cuda_visible_devices == "0,1,2,3"
    # ids given: DP = their count / TP
    plan = command.plan_gpus(q7, gpus="4, 5,6,7", environ={})
    assert (plan.device_ids, plan.tensor_parallel_size, plan.data_parallel_size, plan.source) == (
        ["4", "5", "6", "7"], 1, 4, "--gpus")
    # the per-server variable (as docker compose reads it), below --gpus
    env = {"VLLM_QWEN_72B_GPUS": "4,5,6,7", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    assert command.plan_gpus(q72, environ=env) == command.GpuPlan(["4", "5", "6", "7"], 4, 1, "$VLLM_QWEN_72B_GPUS")
    assert command.plan_gpus(q72, gpus="0,1,2,3", environ=env).source == "--gpus"
    # an inherited CUDA_VISIBLE_DEVICES (SLURM): its first TP x DP ids
    assert command.plan_gpus(q7, environ={"CUDA_VISIBLE_DEVICES": "3,2"}) == command.GpuPlan(
        ["3"], 1, 1, "$CUDA_VISIBLE_DEVICES")
    assert command.plan_gpus(q7, data_parallel_size=2, environ={"CUDA_VISIBLE_DEVICES": "3,2"}).device_ids == ["3", "2"]
    assert command.plan_gpus(q72, tensor_parallel_size=2, gpus="0,1,2,3", environ={}).data_parallel_size == 2
    for kw, msg in (({"gpus": "0,1,2"}, "multiple of 4"), ({"gpus": "0,1,2,3", "data_parallel_size": 2}, "needs 8"),
                    ({"gpus": "0,0,1,2"}, "listed twice"), ({"gpus": " , "}, "no GPU ids"),
                    ({"environ": {"CUDA_VISIBLE_DEVICES": "0,1"}}, "needs 4")):
        kw.setdefault("environ", {})
        with pytest.raises(ValueError, match=msg):
            command.plan_gpus(q72, **kw)
