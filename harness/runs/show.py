"""One question as the model saw it: the exact request a run sent for a qid, rebuilt from the run
folder's recorded spec (prompts are not stored - a million of them would dwarf the answers), beside
the stored answer. The image travels as a reference (its path), not as base64."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from harness.backends.images import ImagePayload, image_uuid
from harness.metrics.readers import iter_records
from harness.runs.experiments import experiment_for
from harness.runs.folder import RunFolder
from harness.runs.spec import RunSpec


def _placeholder(path: str, max_side: int | None) -> ImagePayload:
    return ImagePayload(f"<image {path}>", image_uuid(path, max_side), 0, None)


def _decoded(body: Any) -> Any:
    if isinstance(body, bytes | bytearray):
        return orjson.loads(body)
    if isinstance(body, dict):
        return {k: _decoded(v) for k, v in body.items() if k != "image"} | (
            {"image": "<pixels>"} if "image" in body else {})
    return body


def _image_ref(exp, spec: RunSpec, unit) -> ImagePayload | None:
    """The unit's image as the engine sends it (same cache id: the experiment's resize rule), by path."""
    if unit.image is None or spec.backend.kind != "openai":
        return None
    return _placeholder(unit.image, getattr(exp, "max_side", spec.max_side))


def show(run: str | Path, qid: str) -> dict:
    """{qid, image, requests: [{path, body}], answer} of one question of a run folder.

    Raises ValueError naming the folder or the qid when they cannot be found."""
    folder = RunFolder(run)
    manifest = folder.read_manifest()
    if manifest is None or "spec" not in manifest:
        raise ValueError(f"{folder.path}: no run.json with a recorded spec (is this a run folder?)")
    spec = RunSpec.model_validate(manifest["spec"])
    model = (manifest.get("settings") or {}).get("model") or spec.model or ""
    exp = experiment_for(spec, model)
    for unit in exp.units(set()):  # every unit in order: keeps a seeded stream (reference shuffle) in step
        for group in unit.groups:
            if group.qid != qid:
                continue
            image = _image_ref(exp, spec, unit)
            requests = []
            for i in range(group.n):
                if group.head and i > 0:
                    requests.append({"note": "built from request 0's answer at run time"})
                    continue
                path, body = exp.task.request(group, i, image)
                requests.append({"path": path, "body": _decoded(body)})
            answer = None
            for rec in iter_records(folder.path):  # every results file of the folder (shards too)
                if rec.get("qid") == qid:
                    answer = rec  # the last line of a qid wins (--retry-errors appends)
            return {"qid": qid, "image": unit.image, "requests": requests, "answer": answer}
    raise ValueError(f"{folder.path}: no question {qid!r} in this run (see the qids in results.jsonl)")


def sample_request(exp, done: set[str], spec: RunSpec, limit: int = 4000) -> list[str]:
    """Lines showing the first request the run would send (image as a reference), for a dry run."""
    for unit in exp.units(done):
        for group in unit.groups:
            if unit.image is not None and spec.backend.kind != "openai":
                return [f"first request: {group.qid}: image {unit.image} scored against its options"]
            image = _image_ref(exp, spec, unit)
            try:
                path, body = exp.task.request(group, 0, image)
            except Exception as e:  # noqa: BLE001 - a kind that needs its server first (log-likelihood tries)
                return [f"first request: {group.qid}: built at run time ({type(e).__name__})"]
            text = orjson.dumps(_decoded(body), option=orjson.OPT_INDENT_2).decode()
            return [f"first request ({group.qid}): POST {path}", text[:limit] + ("\n..." if len(text) > limit else "")]
    return ["nothing left to ask"]
