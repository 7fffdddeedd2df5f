"""Experiment plans: validation, expansion of the shipped plans into the paper's cells, status, and
runs against the loopback stub (end to end, killed mid-run and resumed without asking anything twice,
one server launch shared by a model's cells)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import orjson
import pytest

from harness.cli import main as harness_main
from harness.cli import plan as cli_plan
from harness.data.items import read_items
from harness.prompts.hierarchy import PromptConfig, Renderer
from harness.study import cells, executor, plan_spec
from tests.support.stub_server import Stub, StubThread

REPO = Path(__file__).resolve().parents[3]
CUB_DIR = REPO / "data" / "hierarchy"


def write_plan(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def stub_plan(tmp: Path, *, limit: int = 20, models: tuple[str, ...] = ("a", "b")) -> Path:
    """Text-mode CUB grid: models x {similar, random} x variants {1, 2} against one stub."""
    ms = "".join(f'[[models]]\nname = "{m}"\nmodel = "stub-model"\n\n' for m in models)
    return write_plan(tmp / "plan.toml", f'''
name = "stubgrid"
out = "{tmp / 'out'}"
modes = "text"
variants = [1, 2]
choices = ["similar", "random"]
limit = {limit}
{ms}
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl", random = "${{SHIPPED}}/CUB200_with_random_choice.jsonl" }}
''')


def cell_records(cell_dir: Path) -> list[dict]:
    p = cell_dir / "results.jsonl"
    out = []
    for line in p.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            out.append(orjson.loads(line))
    return out


def distinct_requests(cell_dir: Path, skip: set[str], limit: int) -> int:
    """Requests a cell must send when the qids in `skip` are on disk: distinct question texts among
    the rest (text runs send one request per distinct text), rendered from the cell's run.json."""
    st = orjson.loads((cell_dir / "run.json").read_bytes())["settings"]
    r = Renderer(PromptConfig.model_validate(st["prompt"]), answer=st["answer"])
    texts = {q.text for item in islice(read_items(st["data"]), limit) for q in r.render(item)
             if q.auto is None and q.qid not in skip}
    return len(texts)


# ------------------------------------------------------------------ validation


def test_plan_errors_name_the_file_and_the_field(tmp_path):
    bad = write_plan(tmp_path / "bad.toml", '''
name = "x"
[[models]]
name = "m"
profil = "qwen2.5-vl-7b"
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = { similar = "a.jsonl" }
''')
    with pytest.raises(plan_spec.PlanError, match=r"bad\.toml: invalid plan:\n  models\[0\] \(m\)\.profil: unknown key"):
        plan_spec.load_plan(bad)
    bad.write_text(bad.read_text().replace("profil =", "profile =").replace("qwen2.5-vl-7b", "no-such-model"))
    with pytest.raises(plan_spec.PlanError, match=r"bad\.toml: models\[0\] \(m\)\.profile: unknown server profile"):
        plan_spec.load_plan(bad)
    bad.write_text('choices = ["random"]\n' + bad.read_text().replace('profile = "no-such-model"', 'model = "m"'))
    with pytest.raises(plan_spec.PlanError, match=r"\(top level\): choices: 'random' is not a key of any benchmark's items"):
        plan_spec.load_plan(bad)
    bad.write_text('name = "x"\nmodels = []\n')
    with pytest.raises(plan_spec.PlanError, match=r"models: List should have at least 1 item"):
        plan_spec.load_plan(bad)
    with pytest.raises(FileNotFoundError, match="no such plan file .*hierarchy-image"):
        plan_spec.load_plan(tmp_path / "missing.toml")


def test_profile_variant_needs_a_profile_or_preset(tmp_path):
    p = write_plan(tmp_path / "p.toml", '''
name = "x"
[[models]]
name = "m"
endpoint = "http://127.0.0.1:9/v1"
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = { similar = "a.jsonl" }
''')
    with pytest.raises(ValueError, match=r"variants = \"profile\" but models \[m\] has no profile or preset"):
        cells.expand(plan_spec.load_plan(p).spec)


def test_profile_variant_listed_again_is_one_cell(tmp_path):
    p = write_plan(tmp_path / "p.toml", '''
name = "x"
modes = ["image", "text"]
variants = ["profile", 0, 1]
[[models]]
name = "q"
profile = "qwen2.5-vl-7b"
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = { similar = "a.jsonl" }
''')
    exp = cells.expand(plan_spec.load_plan(p).spec)
    # CUB: image variant 0, text variant 1 in the profile
    assert [c.key.split("/")[1] for c in exp.cells] == [
        "cub.similar.image.v0.generate.robust", "cub.similar.image.v1.generate.robust",
        "cub.similar.text.v1.generate.robust", "cub.similar.text.v0.generate.robust"]
    assert [c.variant == c.profile_variant for c in exp.cells] == [True, False, True, False]
    assert sum("listed twice" in why for _, why in exp.skipped) == 2


# ------------------------------------------------------------------ the shipped plans

# hierarchy-protocol.md section 2.2: image variants behind the published tables
IMAGE_VARIANTS = {
    "llava-onevision-7b": {"inat_animal": 0, "inat_plant": 0, "imagenet_artifact": 0, "imagenet_animal": 0, "cub": 0, "food": 0},
    "internvl2.5-8b": {"inat_animal": 1, "inat_plant": 0, "imagenet_artifact": 0, "imagenet_animal": 2, "cub": 0, "food": 0},
    "internvl3-8b": {"inat_animal": 1, "inat_plant": 0, "imagenet_artifact": 0, "imagenet_animal": 0, "cub": 0, "food": 0},
    "qwen2.5-vl-7b": {"inat_animal": 1, "inat_plant": 1, "imagenet_artifact": 0, "imagenet_animal": 0, "cub": 0, "food": 0},
    "qwen2.5-vl-32b": {"inat_animal": 1, "inat_plant": 0, "imagenet_artifact": 0, "imagenet_animal": 0, "cub": 0, "food": 0},
    "qwen2.5-vl-72b": {"inat_animal": 1, "inat_plant": 0, "imagenet_artifact": 0, "imagenet_animal": 0, "cub": 0, "food": 0},
}
VLM_TEXT = {"inat_animal": 1, "inat_plant": 1, "imagenet_artifact": 2, "imagenet_animal": 2, "cub": 1}
OG_TEXT = {"qwen2-7b-instruct": VLM_TEXT, "qwen2.5-7b-instruct": VLM_TEXT, "qwen2.5-7b": VLM_TEXT,
           "internlm2.5-7b-chat": {"inat_animal": 2, "inat_plant": 2, "imagenet_artifact": 1, "imagenet_animal": 1, "cub": 1}}


def _expand(name: str, **kw) -> cells.Expansion:
    return cells.expand(plan_spec.load_plan(name).spec, **kw)


def _variants(exp: cells.Expansion) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for c in exp.cells:
        out.setdefault(c.model, {})[c.benchmark] = c.variant
    return out


def test_main_image_table_expands_to_the_papers_cells():
    exp = _expand("hierarchy-image")
    assert len(exp.cells) == 36 and len({c.out for c in exp.cells}) == 36  # 6 open VLMs x 6 taxonomies
    assert _variants(exp) == IMAGE_VARIANTS
    c = next(c for c in exp.cells if c.key == "internvl2.5-8b/imagenet_animal.similar.image.v2.generate.reference")
    t = c.spec.task
    assert t.profile == "internvl2.5-8b" and t.prompt_variant is None  # the variant comes from the profile
    assert t.protocol == "reference" and "${IMAGES}" in " ".join(c.spec.image_root_map)
    assert c.needs == ("DATA", "IMAGES")
    assert all(c.spec.max_side == 1680 for c in exp.cells if c.model.startswith("qwen"))
    with_gpt = _expand("hierarchy-image", models=[*IMAGE_VARIANTS, "gpt-4o"])  # paid API: opt-in only
    gpt = [c for c in with_gpt.cells if c.model == "gpt-4o"]
    assert len(gpt) == 6 and all(c.variant == "preset" and c.spec.task.preset == "gpt-4o" for c in gpt)


def test_text_og_llm_and_prompt_plans():
    text = _expand("hierarchy-text")
    assert len(text.cells) == 30 and {c.mode for c in text.cells} == {"text"}
    assert _variants(text) == {m: VLM_TEXT for m in IMAGE_VARIANTS}
    assert all(c.spec.image_root_map == [] for c in text.cells)
    og = _expand("hierarchy-og-llm")
    assert len(og.cells) == 20 and _variants(og) == OG_TEXT
    rob = _expand("hierarchy-prompts")
    assert len(rob.cells) == 180 and {c.variant for c in rob.cells} == {0, 1, 2, 3, 4}
    # every main-table cell is also a robustness cell, in the same folder: run once, used by both
    assert {c.out for c in _expand("hierarchy-image").cells} <= {c.out for c in rob.cells}
    img = {c.out: c for c in _expand("hierarchy-image").cells}
    for c in rob.cells:
        if c.out in img:
            assert c.variant == c.profile_variant == img[c.out].variant


def test_cell_arguments_give_the_profiles_settings(tmp_path):
    """A CUB cell's RunSpec yields the paper's settings, and its printed command line, parsed by the real
    `harness run`, is the same spec."""
    from harness.cli import build_parser
    from harness.cli.run import spec_from_args
    from harness.runs.hierarchy import resolve

    exp = _expand("hierarchy-text", only=["qwen2.5-vl-7b/cub.*"], out=str(tmp_path))
    (cell,) = exp.cells
    spec = cell.spec_for(["http://127.0.0.1:9/v1"], "Qwen/Qwen2.5-VL-7B-Instruct")
    line = cell.command_line(["http://127.0.0.1:9/v1"], "Qwen/Qwen2.5-VL-7B-Instruct")
    assert spec_from_args(build_parser().parse_args(line[1:])) == spec
    st = resolve(spec, "Qwen/Qwen2.5-VL-7B-Instruct")
    assert (st.prompt.mode, st.prompt.variant, st.prompt.system, st.max_tokens, st.parser) == ("text", 1, "helpful", 5, "reference")
    assert st.data == str(CUB_DIR / "CUB200_with_similar_choice.jsonl")


def test_classification_sweep_cells():
    exp = _expand("classify-label-size")
    assert len(exp.cells) == 20  # 4 datasets x K in 2, 5, 20, 100, all
    assert [c.axes for c in exp.cells[:5]] == [(("k", k),) for k in ("2", "5", "20", "100", "all")]
    c = exp.cells[4]
    assert c.key == "llava-1.5-7b/imagenet.test.reference.kall"
    assert c.command[:1] == ("classify",) and c.spec.task.kind == "classify" and c.spec.task.k == "all"
    assert c.spec.task.classes and c.error is None
    assert c.mode is None and c.variant is None


def test_status_reports_unset_variables_and_missing_files(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DATA", raising=False)
    monkeypatch.setenv("COLUMNS", "300")
    rc = harness_main(["plan", "status", "hierarchy-og-llm", "--out", str(tmp_path), "--json"])
    rows = orjson.loads(capsys.readouterr().out)
    assert rc == 3 and len(rows) == 20
    cub = [r for r in rows if "/cub." in r["key"]]
    assert {r["state"] for r in cub} == {"missing"}  # CUB ships with the package
    assert {r["detail"] for r in rows if r not in cub} == {"needs ${DATA} (--set NAME=VALUE or export it)"}
    rc = harness_main(["plan", "status", "hierarchy-og-llm", "--out", str(tmp_path), "--set", f"DATA={tmp_path}"])
    out = capsys.readouterr().out
    assert rc == 3 and "20 cells: 0 done, 0 partial, 4 missing, 16 blocked" in out
    assert f"missing data file: {tmp_path}/Inat21_Animal_with_similar_choice.jsonl" in out


# ------------------------------------------------------------------ running against the stub


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """The stub grid run end to end, in-process, once: (plan, out root, stub requests, results by cell)."""
    tmp = tmp_path_factory.mktemp("clean")
    plan = stub_plan(tmp)
    with StubThread(Stub()) as st:
        rc = harness_main(["plan", "run", str(plan), "--endpoint", f"a={st.url}", "--endpoint", f"b={st.url}"])
        asked = st.stub.requests
        # the whole plan again: every cell is done, nothing is sent
        rc2 = harness_main(["plan", "run", str(plan), "--endpoint", f"a={st.url}", "--endpoint", f"b={st.url}"])
        assert st.stub.requests == asked
    assert rc == 0 and rc2 == 0
    results = {d.relative_to(tmp / "out"): {r["qid"]: r["letter"] for r in cell_records(d)}
               for d in sorted((tmp / "out").glob("*/*"))}
    return plan, tmp / "out", asked, results


def test_plan_runs_every_cell_end_to_end(clean_run, capsys):
    plan, out, asked, results = clean_run
    assert len(results) == 8  # 2 models x 2 choice files x 2 variants
    assert all(len(v) == 80 for v in results.values())  # 20 items x 4 levels (leaf filled in)
    expected = sum(distinct_requests(out / k, set(), 20) for k in results)
    assert asked == expected and 400 <= asked <= 480
    cell = orjson.loads((out / "a" / "cub.random.text.v2.generate.robust.n20" / "plan-cell.json").read_bytes())
    assert (cell["model"], cell["choice"], cell["variant"], cell["taxonomy"]) == ("a", "random", 2, "cub")
    rc = harness_main(["plan", "status", str(plan), "--json"])
    rows = orjson.loads(capsys.readouterr().out)
    assert rc == 0 and {r["state"] for r in rows} == {"done"} and {r["lines"] for r in rows} == {80}


def test_killed_plan_resumes_without_asking_anything_twice(clean_run, tmp_path):
    _, _, clean_asked, clean_results = clean_run
    plan = stub_plan(tmp_path)
    out = tmp_path / "out"
    with StubThread(Stub(latency=0.01)) as st:
        eps = ["--endpoint", f"a={st.url}", "--endpoint", f"b={st.url}"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "plan", "run", str(plan), *eps,
                                 "--run-args", "--concurrency 4"], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while st.stub.requests < 170 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        killed_at = st.stub.requests
        assert 170 <= killed_at < clean_asked, "the plan was not interrupted mid-way"
        done_at_kill = {d.relative_to(out): {r["qid"] for r in cell_records(d)} for d in out.glob("*/*")}
        states = {k: cells.cell_state(c).state for k, c in
                  ((c.out.relative_to(out), c) for c in cells.expand(plan_spec.load_plan(plan).spec).cells)}
        assert "partial" in states.values() and "missing" in states.values()
        before = st.stub.requests
        assert harness_main(["plan", "run", str(plan), *eps]) == 0
        resumed = st.stub.requests - before
    expected = sum(distinct_requests(out / k, done_at_kill.get(k, set()), 20) for k in clean_results)
    assert resumed == expected < clean_asked
    for k, ref in clean_results.items():
        recs = cell_records(out / k)
        assert len(recs) == len({r["qid"] for r in recs}) == 80, k  # no question recorded twice
        assert {r["qid"]: r["letter"] for r in recs} == ref  # same answers as the uninterrupted run


def test_cells_of_a_profile_share_one_server_launch(tmp_path):
    plan = write_plan(tmp_path / "p.toml", f'''
name = "shared"
out = "{tmp_path / 'out'}"
modes = ["text", "image"]
variants = ["profile", 2]
choices = ["similar", "random"]
limit = 10
[[models]]
name = "llm"
profile = "qwen2.5-7b-instruct"
[[models]]
name = "nowhere"
profile = "qwen2-7b-instruct"
[[benchmarks]]
name = "cub"
taxonomy = "cub"
items = {{ similar = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl", random = "${{SHIPPED}}/CUB200_with_random_choice.jsonl" }}
''')
    launches = []

    @contextlib.contextmanager
    def fake_launcher(entry, log_dir):
        if entry.name != "llm":  # the real one: no vLLM here, no path -> "pass --endpoint"
            with executor.launch_server(entry, log_dir) as got:
                yield got
            return
        launches.append(entry.name)
        with StubThread(Stub(model="Qwen/Qwen2.5-7B-Instruct")) as st:
            yield [st.url], None

    exp = cells.expand(plan_spec.load_plan(plan).spec)
    assert ("llm/cub.similar.image", "profile qwen2.5-7b-instruct is a text-only LLM") in exp.skipped
    keys = [c.key for c in exp.cells]
    assert keys[:4] == ["llm/cub.similar.text.v1.generate.robust.n10", "llm/cub.similar.text.v2.generate.robust.n10",
                        "llm/cub.random.text.v1.generate.robust.n10", "llm/cub.random.text.v2.generate.robust.n10"]
    outcomes = cli_plan.run_plan(exp, launcher=fake_launcher, log=lambda s: None)
    assert launches == ["llm"]  # one server for the model's four cells
    got = {o.key: o.result for o in outcomes}
    assert [got[k] for k in keys[:4]] == ["done"] * 4
    nowhere = [r for k, r in got.items() if k.startswith("nowhere/")]
    assert len(nowhere) == 4 and all(r.startswith("blocked: model nowhere: no endpoint") and "--endpoint nowhere=URL" in r
                                     for r in nowhere)
    st = orjson.loads((tmp_path / "out/llm/cub.similar.text.v1.generate.robust.n10/run.json").read_bytes())["settings"]
    assert (st["model"], st["prompt"]["variant"], st["prompt"]["system"], st["max_tokens"]) == (
        "Qwen/Qwen2.5-7B-Instruct", 1, "helpful", 5)
    cli_plan.run_plan(cells.expand(plan_spec.load_plan(plan).spec, models=["llm"]), launcher=fake_launcher, log=lambda s: None)
    assert launches == ["llm"]  # all done: no server started again


def test_missing_command_and_bad_arguments_do_not_stop_the_plan(tmp_path):
    plan = write_plan(tmp_path / "p.toml", f'''
name = "later"
kind = "classify"
command = ["classify-not-built-yet"]
out = "{tmp_path / 'out'}"
choices = "test"
[axes.k]
flag = "--k"
values = [2, 5]
[[models]]
name = "m"
endpoint = "http://127.0.0.1:9/v1"
[[benchmarks]]
name = "flowers"
items = {{ test = "${{SHIPPED}}/CUB200_with_similar_choice.jsonl" }}
''')
    outcomes = cli_plan.run_plan(cells.expand(plan_spec.load_plan(plan).spec), log=lambda s: None)
    assert [o.result for o in outcomes] == ["blocked: `harness classify-not-built-yet` not available yet"] * 2
    bad = write_plan(tmp_path / "bad.toml", stub_plan(tmp_path).read_text().replace(
        'name = "stubgrid"', 'name = "bad"\nargs = ["--no-such-flag"]'))
    with StubThread(Stub()) as st:
        outcomes = cli_plan.run_plan(cells.expand(plan_spec.load_plan(bad).spec, models=["a"]),
                                  endpoints={"a": [st.url]}, log=lambda s: None)
        assert st.stub.requests == 0
    assert len(outcomes) == 4 and all("arguments not accepted by `harness run`" in o.result and "--no-such-flag" in o.result
                                      for o in outcomes)


def test_a_server_error_stops_that_servers_cells_only(tmp_path):
    plan = stub_plan(tmp_path, limit=5)
    plan.write_text(plan.read_text().replace('name = "b"\nmodel = "stub-model"', 'name = "b"\nmodel = "not-served"'))
    with StubThread(Stub()) as st, StubThread(Stub(model="not-served")) as st2:
        outcomes = cli_plan.run_plan(cells.expand(plan_spec.load_plan(plan).spec),
                                  endpoints={"a": [st.url], "b": [st.url]}, log=lambda s: None)
        assert st2.stub.requests == 0
    got = [o.result for o in outcomes]
    assert got[:4] == ["done"] * 4  # model a
    assert got[4] == "failed (exit 4)" and all(r.startswith("not run: b/cub.similar.text.v1") for r in got[5:])


def _classify_available() -> bool:
    return "classify" in executor.SpecRunner().kinds()


def test_shipped_classification_cells_are_accepted_by_harness_classify():
    exp = _expand("classify-label-size")
    bad = {c.key: c.error for c in exp.cells}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.skipif(not _classify_available(), reason="`harness classify` not built yet")
def test_classification_cells_run_against_the_stub(tmp_path):
    from PIL import Image

    classes = ["rose", "tulip", "daisy", "lily", "orchid", "iris"]
    (tmp_path / "classes.json").write_text(orjson.dumps(classes).decode())
    lines = []
    for i, c in enumerate(classes):
        Image.new("RGB", (16, 16), (i * 40, 90, 50)).save(tmp_path / f"{i}.png")
        lines.append(orjson.dumps({"image": str(tmp_path / f"{i}.png"), "label": c, "split": "test"}).decode())
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    plan = write_plan(tmp_path / "c.toml", f'''
name = "cls"
kind = "classify"
command = ["classify", "run"]
out = "{tmp_path / 'out'}"
choices = "test"
protocol = "reference"
args = ["--task", "closed", "--quiet"]
[axes.k]
flag = "--k"
values = [2, "all"]
[[models]]
name = "m"
model = "stub-model"
[[benchmarks]]
name = "mini"
items = {{ test = "{tmp_path / 'list.jsonl'}" }}
args = ["--classes", "{tmp_path / 'classes.json'}"]
''')
    with StubThread(Stub()) as st:
        first = cli_plan.run_plan(cells.expand(plan_spec.load_plan(plan).spec), endpoints={"m": [st.url]}, log=lambda s: None)
        asked = st.stub.requests
        again = cli_plan.run_plan(cells.expand(plan_spec.load_plan(plan).spec), endpoints={"m": [st.url]}, log=lambda s: None)
        assert st.stub.requests == asked == 12  # 6 images x 2 cells, then nothing
    assert [o.result for o in first] == ["done", "done"] and [o.result for o in again] == ["skipped (done)"] * 2
    recs = [orjson.loads(x) for x in (tmp_path / "out/m/mini.test.reference.k2/results.jsonl").read_bytes().splitlines()]
    states = [cells.cell_state(c, scores=True) for c in cells.expand(plan_spec.load_plan(plan).spec).cells]
    assert all(s.state == "done" and s.hca is not None and s.leaf is None for s in states)  # accuracy, by kind
    offered = [list(r["choices"].values()) if isinstance(r["choices"], dict) else r["choices"] for r in recs]
    assert len(recs) == 6 and all(r["k"] == 2 and r["label"] in o for r, o in zip(recs, offered, strict=True))
