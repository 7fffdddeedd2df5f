"""What a plan's SLURM jobs ask for (no cluster needed): the [slurm] section and its flags, the GPUs a
group's job requests (TP x DP of its profile, a whole node, none with an endpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from harness.cli import plan as cli_plan
from harness.study import cells, executor, plan_spec, slurm

PLAN = '''
name = "s"
out = "{out}"
modes = "text"
variants = [1]
[[models]]
name = "llm"
profile = "qwen2.5-7b-instruct"
[[models]]
name = "api"
model = "m"
endpoint = "http://127.0.0.1:9/v1"
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl" }}
[slurm]
partition = "gpu"
time = "1-00:00:00"
gpus_per_node = 8
sbatch = {{ qos = "high" }}
'''


def _exp(tmp_path: Path) -> cells.Expansion:
    p = tmp_path / "p.toml"
    p.write_text(PLAN.format(out=tmp_path / "out"))
    return cells.expand(plan_spec.load_plan(p).spec)


def test_slurm_section_and_flags(tmp_path):
    exp = _exp(tmp_path)
    s = exp.plan.slurm
    assert (s.partition, s.time, s.gpus_per_node, s.sbatch, s.hf_offline) == ("gpu", 1440, 8, {"qos": "high"}, True)
    args = argparse.Namespace(partition=None, account="lab", time="02:00:00", gpus_per_node=None, cpus_per_task=16,
                              mem_gb=None, cells_per_job=3, whole_node=True, sbatch=["constraint=h100"], setup=[])
    o = cli_plan._slurm_options(s, args)
    assert (o.partition, o.account, o.time, o.cpus_per_task, o.cells_per_job, o.whole_node) == (
        "gpu", "lab", 120, 16, 3, True)
    assert o.sbatch == {"qos": "high", "constraint": "h100"}
    with pytest.raises(ValueError, match="time"):
        plan_spec.SlurmSection(time="soon")


def test_job_resources_follow_the_profile_or_the_whole_node(tmp_path):
    exp = _exp(tmp_path)
    _, groups = executor.plan_groups(exp, {"hierarchy"})
    by = {g.gid: g for g in groups}
    opts = exp.plan.slurm
    r = slurm.group_resources(by["llm"], opts)
    assert r == {"time": 1440, "partition": "gpu", "gpus_per_node": 1, "additional_parameters": {"qos": "high"}}
    r = slurm.group_resources(by["llm"], opts.model_copy(update={"whole_node": True}))
    assert r["exclusive"] is True and r["gpus_per_node"] == 8
    assert "gpus_per_node" not in slurm.group_resources(by["api"], opts)  # served elsewhere: no GPU
    _, split = executor.plan_groups(cells.expand(exp.plan, extra_args=()), {"hierarchy"}, cells_per_group=1)
    assert [g.gid for g in split] == ["llm", "api"]  # one cell each here


def test_slurm_executor_without_sbatch_says_so(tmp_path, monkeypatch, cli):
    p = tmp_path / "p.toml"
    p.write_text(PLAN.format(out=tmp_path / "out"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    rc, _, err = cli("plan", "run", p, "--executor", "slurm", "--models", "api")
    if slurm.submitit is None:
        assert rc == 2 and "needs submitit" in err
    else:
        assert rc == 2 and "no `sbatch` on PATH" in err
    assert not (tmp_path / "out" / "_jobs").exists()
