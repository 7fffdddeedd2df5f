"""`harness demo`: the whole flow offline, on any machine, in about a minute.

Builds a tiny random-weight LLaVA (no download), draws stand-in JPEGs for the first N images of the
shipped CUB benchmark at their remapped paths, starts a real local server for the model
(`transformers serve`, or vLLM on a GPU), runs it through the Python API (`harness.run` with a
RunSpec, then `harness.report`). The scores are chance-level by construction (random weights); the
point is that every part runs. The `harness demo` command is harness.cli.demo.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from itertools import islice
from pathlib import Path

from harness.api import report, run
from harness.paths import data_dir
from harness.runs.execute import RunResult
from harness.runs.folder import ExitCode
from harness.runs.spec import EndpointBackend, HierarchyTask, RunSpec

AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


def draw_images(items_path: Path, root: Path, n: int) -> int:
    """A small JPEG per item at the remapped path (colour from the species, so images differ)."""
    from PIL import Image, ImageDraw

    from harness.data.items import read_items

    k = 0
    for item in islice(read_items(items_path, root_map=[f"{AUTHORS_PREFIX}={root}"]), n):
        p = Path(item.image)
        if p.exists():
            k += 1
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.blake2b(item.label.encode(), digest_size=6).digest()
        im = Image.new("RGB", (96, 72), tuple(h[:3]))
        ImageDraw.Draw(im).ellipse((20, 10, 76, 62), fill=tuple(h[3:6]))
        im.save(p, format="JPEG", quality=90)
        k += 1
    return k


def demo_spec(out: Path, model_dir: Path, items: Path, root: Path, n_items: int, mode: str = "image",
              endpoint: str | None = None) -> RunSpec:
    """The demo's run: the first `n_items` CUB items against the tiny model (a local server is started
    for it unless `endpoint` is given)."""
    return RunSpec(out=str(out / f"run-{mode}"), data=str(items), model=str(model_dir), limit=n_items,
                   image_root_map=[f"{AUTHORS_PREFIX}={root}"], max_tokens=3,
                   backend=EndpointBackend(endpoints=[endpoint] if endpoint else [], concurrency=4),
                   task=HierarchyTask(mode=mode))


NOTE = ("harness demo: the model has random weights, so its answers are noise: most are not a letter and are\n"
        "counted as unanswered (never guessed). With a real model, point --model at it or --endpoint at a\n"
        "server. Files: {run}/results.jsonl (one line a question), run.json (manifest), summary.json.")


def run_demo(out: str | Path = "runs/demo", n_items: int = 40, mode: str = "image", endpoint: str | None = None, *,
             progress: bool = True, log: Callable[[str], None] = print) -> tuple[RunResult, dict | None]:
    """Build the tiny model and the stand-in images (once), run the demo's spec through `harness.run`
    and read it back with `harness.report`: (the run's result, its report; None when the run failed
    before it had anything to report)."""
    from harness.demo_models import build_tiny_llava

    out = Path(out).resolve()
    model_dir = out / "tiny-llava"
    if not (model_dir / "config.json").exists():
        log(f"harness demo: building a tiny random LLaVA in {model_dir}")
        build_tiny_llava(model_dir)
    items = data_dir("hierarchy") / "CUB200_with_similar_choice.jsonl"
    root = out / "images"
    n = draw_images(items, root, n_items)
    log(f"harness demo: {n} stand-in images under {root}")
    spec = demo_spec(out, model_dir, items, root, n_items, mode, endpoint)
    result = run(spec, progress=progress)
    if result.exit_code not in (ExitCode.OK, ExitCode.UNANSWERED):
        return result, None
    return result, report([spec.out])[0]
