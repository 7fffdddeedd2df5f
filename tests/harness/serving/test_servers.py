"""Server profiles (servers/*.toml), the generated docker-compose.yml, and `harness serve`."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from harness.cli import serve as serve_cli
from harness.serving import command, compose
from harness.serving import profiles as servers
from harness.serving.compose import compose_config, render_compose
from harness.serving.profiles import (
    TAXONOMIES,
    ProfileError,
    ServerProfile,
    list_profiles,
    load_profile,
)

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker-compose.yml"

EXPECTED = {
    # name: (hf_id, kind, compose_service, tensor_parallel_size)
    "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "vlm", "vllm-qwen", 1),
    "qwen2.5-vl-32b": ("Qwen/Qwen2.5-VL-32B-Instruct", "vlm", "vllm-qwen-32b", 2),
    "qwen2.5-vl-72b": ("Qwen/Qwen2.5-VL-72B-Instruct", "vlm", "vllm-qwen-72b", 4),
    "internvl2.5-8b": ("OpenGVLab/InternVL2_5-8B", "vlm", "vllm-internvl", 1),
    "internvl3-8b": ("OpenGVLab/InternVL3-8B", "vlm", "vllm-internvl3", 1),
    "llava-onevision-7b": ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "vlm", "vllm-llava", 1),
    "qwen2.5-7b-instruct": ("Qwen/Qwen2.5-7B-Instruct", "llm", "vllm-qwen-llm", 1),
    "qwen2-7b-instruct": ("Qwen/Qwen2-7B-Instruct", "llm", "vllm-qwen2-llm", 1),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", "llm", "vllm-qwen-base", 1),
    "internlm2.5-7b-chat": ("internlm/internlm2_5-7b-chat", "llm", "vllm-internlm", 1),
}


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# -- profiles --------------------------------------------------------------------------------------


def test_every_expected_profile_ships_and_validates():
    assert list_profiles() == sorted(EXPECTED)
    ports = set()
    for name, (hf_id, kind, service, tp) in EXPECTED.items():
        p = load_profile(name)
        assert isinstance(p, ServerProfile)
        assert (p.name, p.hf_id, p.kind, p.compose_service, p.vllm.tensor_parallel_size) == (name, hf_id, kind, service, tp)
        assert p.gpus == tp
        assert p.vllm.dtype == "bfloat16"
        assert p.vllm.generation_config == "auto"
        assert f"{tp} GPU" in p.vllm.notes
        assert "generation_config" in p.vllm.notes
        ports.add(p.port)
        if kind == "vlm":
            assert p.vllm.limit_mm_per_prompt == {"image": 1}
            assert set(p.protocol.image_prompt_variant) == set(TAXONOMIES)
        else:
            assert p.vllm.limit_mm_per_prompt is None
            assert p.protocol.image_prompt_variant == {}
        assert p.vllm.trust_remote_code == name.startswith(("internvl", "internlm"))
    assert len(ports) == len(EXPECTED)
    assert load_profile("qwen2.5-vl-7b").port == 8000


def test_profile_lookup_by_service_hf_id_and_path():
    by_name = load_profile("qwen2.5-vl-7b")
    assert load_profile("vllm-qwen") == by_name
    assert load_profile("qwen/qwen2.5-vl-7b-instruct") == by_name
    assert load_profile(servers.profiles_dir() / "qwen2.5-vl-7b.toml") == by_name


def test_unknown_profile_lists_available_names():
    with pytest.raises(ProfileError) as e:
        load_profile("gpt-5-vision")
    msg = str(e.value)
    assert "gpt-5-vision" in msg
    for name in EXPECTED:
        assert name in msg


def _copy_profile(tmp_path: Path, name: str = "qwen2.5-vl-7b") -> Path:
    dst = tmp_path / f"{name}.toml"
    dst.write_text((servers.profiles_dir() / f"{name}.toml").read_text(encoding="utf-8"), encoding="utf-8")
    return dst


def test_unknown_key_is_rejected_with_file_name(tmp_path):
    f = _copy_profile(tmp_path)
    f.write_text(f.read_text().replace("[vllm]\n", "[vllm]\nswap_space = 4\n"))
    with pytest.raises(ProfileError) as e:
        load_profile(f)
    assert str(f) in str(e.value)
    assert "vllm.swap_space" in str(e.value)
    assert "unknown key" in str(e.value)


def test_top_level_unknown_key_and_bad_toml_name_the_file(tmp_path):
    f = _copy_profile(tmp_path)
    f.write_text("gpu = 'a100'\n" + f.read_text())
    with pytest.raises(ProfileError, match=re.escape(str(f)) + r".*\n  gpu: unknown key"):
        load_profile(f)
    f.write_text("name = \n")
    with pytest.raises(ProfileError, match=re.escape(str(f)) + ": invalid TOML"):
        load_profile(f)


def test_invalid_values_are_rejected(tmp_path):
    f = _copy_profile(tmp_path)
    text = f.read_text()
    f.write_text(text.replace("cub = 0, food = 0 }", "cub = 7, food = 0 }"))
    with pytest.raises(ProfileError, match="image_prompt_variant.cub"):
        load_profile(f)
    f.write_text(text.replace('system_prompt = "qwen_expert"', 'system_prompt = "pirate"'))
    with pytest.raises(ProfileError, match="protocol.system_prompt"):
        load_profile(f)
    f.write_text(text.replace('kind = "vlm"', 'kind = "llm"'))
    with pytest.raises(ProfileError, match="limit_mm_per_prompt"):
        load_profile(f)
    f.write_text(text.replace('name = "qwen2.5-vl-7b"', 'name = "other"'))
    with pytest.raises(ProfileError, match="file name stem"):
        load_profile(f)
    f.write_text(text.replace('generation_config = "auto"', 'generation_config = "auto"\nextra_args = ["--api-key", "abc"]'))
    with pytest.raises(ProfileError, match="VLLM_API_KEY"):
        load_profile(f)


# -- protocol settings -----------------------------------------------------------------------------


def test_qwen7b_protocol_settings():
    p = load_profile("qwen2.5-vl-7b")
    assert p.prompt_variant_for("inat_animal", "image") == 1
    assert p.prompt_variant_for("inat_plant", "image") == 1
    assert p.prompt_variant_for("cub", "image") == 0
    assert p.prompt_variant_for("food", "image") == 0
    assert [p.max_tokens_for(t) for t in TAXONOMIES] == [10, 5, 5, 10, 10, 10]
    assert p.max_tokens_for("cub", "text") == 5
    assert p.system_prompt_for("image") == "qwen_expert"
    assert p.system_prompt_for("text") == "helpful"
    assert p.system_prompt_key("image") == "qwen_expert"
    assert {t: p.prompt_variant_for(t, "text") for t in servers.TEXT_TAXONOMIES} == {
        "cub": 1, "inat_animal": 1, "inat_plant": 1, "imagenet_animal": 2, "imagenet_artifact": 2,
    }
    with pytest.raises(ValueError, match="Food text"):
        p.prompt_variant_for("food", "text")
    with pytest.raises(ValueError, match="unknown taxonomy"):
        p.prompt_variant_for("cars", "image")


def test_published_image_variants_per_model():
    # section 2.2 "Variants behind the published tables" (order: iNat-A, iNat-P, artifact, animal, CUB, Food)
    order = ["inat_animal", "inat_plant", "imagenet_artifact", "imagenet_animal", "cub", "food"]
    table = {
        "llava-onevision-7b": [0, 0, 0, 0, 0, 0],
        "internvl2.5-8b": [1, 0, 0, 2, 0, 0],
        "internvl3-8b": [1, 0, 0, 0, 0, 0],
        "qwen2.5-vl-7b": [1, 1, 0, 0, 0, 0],
        "qwen2.5-vl-32b": [1, 0, 0, 0, 0, 0],
        "qwen2.5-vl-72b": [1, 0, 0, 0, 0, 0],
    }
    for name, row in table.items():
        p = load_profile(name)
        assert [p.prompt_variant_for(t, "image") for t in order] == row, name


def test_text_variants_and_budgets():
    internlm = load_profile("internlm2.5-7b-chat")
    assert internlm.prompt_variant_for("inat_animal", "text") == 2
    assert internlm.prompt_variant_for("inat_plant", "text") == 2
    assert internlm.prompt_variant_for("imagenet_artifact", "text") == 1
    assert internlm.prompt_variant_for("imagenet_animal", "text") == 1
    assert internlm.prompt_variant_for("cub", "text") == 1
    assert internlm.prompt_variant_for("cub") == 1  # an LLM's default mode is text
    assert internlm.system_prompt_for() == "model_default"
    assert internlm.system_prompt_key() is None
    with pytest.raises(ValueError, match="no image mode"):
        internlm.prompt_variant_for("cub", "image")
    for name in ("qwen2.5-7b-instruct", "qwen2-7b-instruct", "qwen2.5-7b"):
        p = load_profile(name)
        assert [p.prompt_variant_for(t) for t in ("imagenet_animal", "imagenet_artifact", "inat_animal", "cub")] == [2, 2, 1, 1]
        # the base model's raw completion has no system text (reference og_llm/qwen --base at c86f23a)
        assert p.system_prompt_for() == ("model_default" if name == "qwen2.5-7b" else "helpful")
        assert p.max_tokens_for("cub") == 5
    assert load_profile("qwen2.5-7b").protocol.api == "completions"
    for name in ("internvl2.5-8b", "internvl3-8b"):
        p = load_profile(name)
        assert {p.max_tokens_for(t) for t in TAXONOMIES} == {5}
        assert p.system_prompt_for("image") == p.system_prompt_for("text") == "model_default"
        assert p.vllm.mm_processor_kwargs == {"max_dynamic_patch": 4}
    llava = load_profile("llava-onevision-7b")
    assert {llava.max_tokens_for(t) for t in TAXONOMIES} == {10}
    assert llava.max_tokens_for("cub", "text") == 5
    assert "BUG" in llava.protocol.notes


def test_system_prompt_ids_exist_in_the_prompt_catalogue():
    prompts = pytest.importorskip("harness.prompts.hierarchy")
    known = set(prompts.catalogue()["system"])
    for name in list_profiles():
        p = load_profile(name)
        for mode in p.modes:
            key = p.system_prompt_key(mode)
            assert key is None or key in known, (name, mode, key)


# -- vllm args -------------------------------------------------------------------------------------


def test_qwen7b_vllm_args():
    p = load_profile("qwen2.5-vl-7b")
    args = p.vllm_args()
    assert args[0] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert json.loads(_flag(args, "--limit-mm-per-prompt")) == {"image": 1}
    assert _flag(args, "--max-model-len") == "16384"
    assert _flag(args, "--tensor-parallel-size") == "1"
    assert _flag(args, "--dtype") == "bfloat16"
    assert _flag(args, "--host") == "0.0.0.0"
    assert _flag(args, "--port") == "8000"
    assert _flag(args, "--generation-config") == "auto"
    assert args[args.index("--served-model-name") + 1: args.index("--served-model-name") + 3] == [
        "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b"]
    assert "--trust-remote-code" not in args
    assert "--api-key" not in args
    assert "--allowed-local-media-path" not in args


def test_vllm_args_options():
    p = load_profile("internvl2.5-8b")
    args = p.vllm_args(host="127.0.0.1", port=9001, api_key_env="VLLM_API_KEY", served_model_name="ivl",
                       allowed_local_media_path="/data/images", model_path="/models/merged")
    assert args[0] == "/models/merged"
    assert _flag(args, "--port") == "9001"
    assert _flag(args, "--host") == "127.0.0.1"
    assert _flag(args, "--api-key") == "${VLLM_API_KEY}"
    assert _flag(args, "--allowed-local-media-path") == "/data/images"
    assert _flag(args, "--served-model-name") == "ivl"
    assert json.loads(_flag(args, "--mm-processor-kwargs")) == {"max_dynamic_patch": 4}
    assert "--trust-remote-code" in args
    with pytest.raises(ValueError, match="environment variable name"):
        p.vllm_args(api_key_env="sk-abc 123")
    llm = load_profile("qwen2.5-7b-instruct").vllm_args()
    assert "--limit-mm-per-prompt" not in llm and "--mm-processor-kwargs" not in llm
    assert _flag(load_profile("qwen2.5-vl-72b").vllm_args(), "--tensor-parallel-size") == "4"


# -- docker compose --------------------------------------------------------------------------------


def test_committed_compose_file_is_up_to_date():
    assert COMPOSE.is_file(), "docker-compose.yml missing: run `harness serve --write-compose`"
    assert COMPOSE.read_text(encoding="utf-8") == render_compose(), (
        "docker-compose.yml is stale: run `harness serve --write-compose` and commit it")


def test_compose_services_match_profiles():
    doc = compose_config()
    services = doc["services"]
    assert set(services) == {v[2] for v in EXPECTED.values()}
    assert doc["volumes"] == {"hf-cache": {}}
    for name in list_profiles():
        p = load_profile(name)
        svc = services[p.compose_service]
        assert svc["image"] == "vllm/vllm-openai:${VLLM_IMAGE_TAG:-" + compose.DEFAULT_VLLM_IMAGE_TAG + "}"
        assert svc["ports"] == [f"127.0.0.1:{p.port}:8000"]
        assert svc["ipc"] == "host"
        ids = "${" + p.gpus_env + ":-" + ",".join(str(i) for i in range(p.gpus)) + "}"
        assert svc["deploy"]["resources"]["reservations"]["devices"] == [
            {"driver": "nvidia", "device_ids": [ids], "capabilities": ["gpu"]}]  # explicit ids, never `count`
        assert svc["profiles"] == [p.name]  # a bare `docker compose up` starts nothing
        assert svc["restart"] == compose.RESTART_POLICY
        assert svc["entrypoint"][:2] == ["/bin/sh", "-c"] and "exec vllm serve" in svc["entrypoint"][2]
        hc = svc["healthcheck"]
        assert hc["test"] == ["CMD", "curl", "-f", "http://localhost:8000/health"]
        assert hc["start_period"] in ("30m", "60m")
        assert "${HARNESS_IMAGE_ROOT:-./images}:/data/images:ro" in svc["volumes"]
        assert "hf-cache:/root/.cache/huggingface" in svc["volumes"]
        assert "HF_TOKEN" in svc["environment"]
        # passed through, never required at interpolation time: `config`/`ps`/`logs`/`down` work without it
        assert "VLLM_API_KEY" in svc["environment"] and not any(":?" in e for e in svc["environment"])
        assert f"HARNESS_GPUS={ids}" in svc["environment"]
        assert f"HARNESS_TENSOR_PARALLEL_SIZE={p.vllm.tensor_parallel_size}" in svc["environment"]
        cmd = svc["command"]
        assert cmd[0] == p.hf_id  # the entrypoint ends in `exec vllm serve "$@"`
        # the data-parallel size is added in the container from the number of GPU ids
        assert cmd == p.vllm_args(host="0.0.0.0", port=8000, allowed_local_media_path="/data/images",
                                  data_parallel_size=1)
        assert "--data-parallel-size" not in cmd
        assert _flag(cmd, "--allowed-local-media-path") == "/data/images"


def test_compose_has_no_literal_secrets():
    text = COMPOSE.read_text(encoding="utf-8")
    assert "--api-key" not in text  # the key travels as VLLM_API_KEY in the environment only
    for pat in (r"sk-[A-Za-z0-9]{8,}", r"hf_[A-Za-z0-9]{20,}", r"(?i)(token|key|secret|password)\s*[:=]\s*[\"']?[A-Za-z0-9+/_-]{12,}"):
        assert not re.search(pat, text), pat
    for line in text.splitlines():
        for m in re.finditer(r"(?i)(api_key|token)=(\S*)", line):
            assert m.group(2) == "..." or m.group(2).startswith(("${", "$(")), line  # never a value


def test_committed_compose_file_loads_to_the_profiles_data():
    """The committed file, read by a YAML parser, is exactly the document built from the profiles, and it
    keeps the header that says it is generated."""
    committed = COMPOSE.read_text(encoding="utf-8")
    assert yaml.safe_load(committed) == yaml.safe_load(render_compose()) == compose_config()
    assert committed.startswith("# GENERATED from servers/*.toml by `harness serve --write-compose`")


def test_compose_strings_stay_strings():
    """Values YAML would otherwise read as numbers or booleans (ports, sizes, JSON) come back as text."""
    doc = yaml.safe_load(render_compose())
    cmd = doc["services"]["vllm-qwen"]["command"]
    assert _flag(cmd, "--port") == "8000" and _flag(cmd, "--tensor-parallel-size") == "1"
    assert json.loads(_flag(cmd, "--limit-mm-per-prompt")) == {"image": 1}
    assert doc["services"]["vllm-qwen"]["healthcheck"]["retries"] == 5


# -- harness serve -----------------------------------------------------------------------------------


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command")
    serve_cli.add_cli(sub)
    ns = parser.parse_args(["serve", *argv])
    return ns.func(ns)


def test_serve_dry_run_prints_the_command(capsys, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "super-secret-value-123")
    assert _serve(["qwen2.5-vl-7b", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    line = out.strip().splitlines()[0]
    assert line.startswith("vllm serve Qwen/Qwen2.5-VL-7B-Instruct ")
    argv = shlex.split(line)
    assert _flag(argv, "--host") == "127.0.0.1"
    assert _flag(argv, "--port") == "8000"
    assert json.loads(_flag(argv, "--limit-mm-per-prompt")) == {"image": 1}
    assert "super-secret-value-123" not in out + err
    assert "$VLLM_API_KEY" in err


def test_serve_dry_run_options_and_passthrough(capsys, tmp_path):
    model = tmp_path / "merged"
    model.mkdir()
    rc = _serve(["vllm-qwen", "--dry-run", "--port", "9100", "--model-path", str(model),
                 "--allowed-local-media-path", "/img", "--", "--max-num-seqs", "64", "--enable-prefix-caching"])
    assert rc == 0
    argv = shlex.split(capsys.readouterr().out.strip().splitlines()[0])
    assert argv[:3] == ["vllm", "serve", str(model)]
    assert _flag(argv, "--port") == "9100"
    assert _flag(argv, "--served-model-name") == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert _flag(argv, "--allowed-local-media-path") == "/img"
    assert argv[-3:] == ["--max-num-seqs", "64", "--enable-prefix-caching"]
    # options may also come before the profile
    assert _serve(["--dry-run", "--launcher", "python", "internlm2.5-7b-chat"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip().splitlines()[0])
    assert argv[1] == "-c" and "vllm.entrypoints.cli.main" in argv[2]  # `vllm serve`, run by this python
    assert argv[3:5] == ["serve", "internlm/internlm2_5-7b-chat"]
    assert "--trust-remote-code" in argv
    assert all("api_server" not in a for a in argv)  # never the deprecated entrypoint


def test_serve_a_local_folder_with_a_profile(capsys, tmp_path):
    """`harness serve DIR --profile NAME` serves the folder with the profile's vLLM arguments."""
    model = tmp_path / "weights"
    model.mkdir()
    assert _serve([str(model), "--profile", "qwen2.5-vl-7b", "--dry-run", "--port", "9101"]) == 0
    argv = shlex.split(capsys.readouterr().out.strip().splitlines()[0])
    assert argv[:3] == ["vllm", "serve", str(model)]
    assert _flag(argv, "--max-model-len") == "16384" and _flag(argv, "--limit-mm-per-prompt") == '{"image": 1}'
    assert argv[argv.index("--served-model-name") + 1:][:2] == ["Qwen/Qwen2.5-VL-7B-Instruct", "qwen2.5-vl-7b"]
    assert _serve(["--profile", "qwen2.5-vl-7b", "--dry-run"]) == 0  # --profile alone names the profile
    assert shlex.split(capsys.readouterr().out.strip().splitlines()[0])[2] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert _serve([str(model), "--dry-run"]) == 2  # a folder without a profile: say how to name one
    assert "--profile NAME" in capsys.readouterr().err
    assert _serve([str(model), "--profile", "qwen2.5-vl-7b", "--model-path", str(model), "--dry-run"]) == 2


def test_serve_errors(capsys, monkeypatch):
    assert _serve(["no-such-model", "--dry-run"]) == 2
    assert "available: " in capsys.readouterr().err
    assert _serve([]) == 2
    assert _serve(["qwen2.5-vl-7b", "--bogus"]) == 2
    assert "after `--`" in capsys.readouterr().err
    monkeypatch.setattr(serve_cli, "vllm_available", lambda: False)
    monkeypatch.setattr(serve_cli.os, "execvpe", lambda *a: pytest.fail("must not exec without vLLM"))
    assert _serve(["qwen2.5-vl-7b"]) == 2
    err = capsys.readouterr().err
    assert "pip install vllm" in err and "docker compose up vllm-qwen" in err


def test_serve_execs_vllm_with_key_in_environment_only(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(serve_cli, "vllm_available", lambda: True)
    monkeypatch.setattr(command.shutil, "which", lambda name: "/usr/bin/vllm")
    monkeypatch.setattr(command, "_vllm_dist", lambda: True)
    monkeypatch.setattr(serve_cli.os, "execvpe", lambda file, argv, env: calls.append((file, argv, env)))
    monkeypatch.setenv("MY_KEY", "k-123456789")
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert _serve(["qwen2.5-7b", "--api-key-env", "MY_KEY"]) == 0
    (file, argv, env), = calls
    assert file == "vllm" and argv[:3] == ["vllm", "serve", "Qwen/Qwen2.5-7B"]
    assert env["VLLM_API_KEY"] == "k-123456789"
    assert "k-123456789" not in " ".join(argv) + capsys.readouterr().err


def test_serve_list_and_write_compose(capsys, tmp_path):
    assert _serve(["--list"]) == 0
    out = capsys.readouterr().out
    for name, (hf_id, _, service, _) in EXPECTED.items():
        assert name in out and service in out and hf_id in out
    target = tmp_path / "compose.yml"
    assert _serve(["--write-compose", str(target)]) == 0
    assert target.read_text(encoding="utf-8") == render_compose()


def test_serve_reserves_explicit_gpus(monkeypatch, capsys):
    """`harness serve` hands vLLM exactly TP x DP GPUs by id (CUDA_VISIBLE_DEVICES), from --gpus, the
    per-server variable docker compose also reads, an inherited CUDA_VISIBLE_DEVICES, or 0..N-1."""
    calls = []
    monkeypatch.setattr(serve_cli, "vllm_available", lambda: True)
    monkeypatch.setattr(command.shutil, "which", lambda name: "/usr/bin/vllm")
    monkeypatch.setattr(command, "_vllm_dist", lambda: True)
    monkeypatch.setattr(serve_cli.os, "execvpe", lambda file, argv, env: calls.append((argv, env)))
    for var in ("CUDA_VISIBLE_DEVICES", "VLLM_QWEN_GPUS", "VLLM_QWEN_72B_GPUS"):
        monkeypatch.delenv(var, raising=False)
    assert _serve(["qwen2.5-vl-7b", "--gpus", "4,5,6,7"]) == 0
    argv, env = calls[-1]
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7" and _flag(argv, "--data-parallel-size") == "4"
    assert "CUDA_VISIBLE_DEVICES=4,5,6,7 (tensor parallel 1 x data parallel 4; from --gpus)" in capsys.readouterr().err
    assert _serve(["qwen2.5-vl-72b"]) == 0
    argv, env = calls[-1]
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and "--data-parallel-size" not in argv
    monkeypatch.setenv("VLLM_QWEN_72B_GPUS", "4,5,6,7")
    assert _serve(["qwen2.5-vl-72b", "-tp", "2"]) == 0
    argv, env = calls[-1]
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert _flag(argv, "--tensor-parallel-size") == "2" and _flag(argv, "--data-parallel-size") == "2"
    # dry run: the command on stdout, the GPUs on stderr
    assert _serve(["qwen2.5-vl-7b", "--dry-run", "--gpus", "1", "-dp", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("vllm serve ") and "# GPUs: CUDA_VISIBLE_DEVICES=1 " in err
    # a count that does not fit, and parallel flags after `--`, are refused before anything starts
    n = len(calls)
    assert _serve(["qwen2.5-vl-72b", "--gpus", "0,1"]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    assert _serve(["qwen2.5-vl-7b", "--", "--data-parallel-size", "2"]) == 2
    assert "before `--`" in capsys.readouterr().err
    assert len(calls) == n
