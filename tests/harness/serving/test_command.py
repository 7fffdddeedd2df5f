"""The one vLLM command builder, the one backend choice, and profile lookup for a model to serve."""

from __future__ import annotations

import contextlib
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
    mod = vllm_command(prof, model="/w/merged", port=9000, served_model_name="tuned", launcher="module")
    assert mod[:5] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "/w/merged"]
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
    with launcher.local_server("qwen2.5-vl-7b", quiet=True) as (_, served):
        assert served == "qwen2.5-vl-7b"
    (cmd,) = cmds
    assert cmd[2] == "Qwen/Qwen2.5-VL-7B-Instruct"  # a profile name is not a weights folder
    assert cmd[cmd.index("--served-model-name") + 1] == "qwen2.5-vl-7b"
    assert _flag(cmd, "--max-model-len") == "16384" and _flag(cmd, "--host") == "127.0.0.1"


def test_local_server_serves_a_bare_folder_under_its_own_name(monkeypatch, tmp_path):
    cmds = _capture_server(monkeypatch)
    model = str(tmp_path / "merged")
    with launcher.local_server(model, quiet=True) as (_, served):
        assert served == model
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
