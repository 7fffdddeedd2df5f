"""One run folder as the viewer sees it: its manifest, index, image roots, level names, and each
question as it was rendered (rebuilt from the item and the run's recorded prompt settings)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlencode

import orjson

from harness.view import images
from harness.view.index import STATUSES, Filters, RunIndex, read_manifest


class ViewRun:
    def __init__(self, folder: str | Path, run_id: int = 0, *, image_roots: list[str | Path] = (),
                 rebuild: bool = False):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: not a run folder")
        self.id = run_id
        self.index = RunIndex(self.folder, rebuild=rebuild)
        self.manifest = read_manifest(self.folder)
        self.settings = self.manifest.get("settings") or {}
        self.roots = images.run_roots(self.manifest, self.index.meta.get("data"), list(image_roots))
        self._renderer = None
        self._renderer_error: str | None = None
        self.name = self.folder.name

    def refresh(self, every: float = 5.0) -> bool:
        """Rebuild the index when the results grew (checked at most every `every` seconds)."""
        return self.index.ensure(every=every)

    # -- description
    @property
    def kind(self) -> str:
        return self.index.kind

    @property
    def taxonomy(self) -> str | None:
        t = (self.settings.get("prompt") or {}).get("taxonomy")
        return t if isinstance(t, str) else None

    def level_name(self, level) -> str:
        if not isinstance(level, int):
            return ""
        if self.taxonomy:
            from harness.data.taxonomy import TAXONOMIES

            info = TAXONOMIES.get(self.taxonomy)
            if info is not None:
                return info.level_name(level - 1)
        return f"level {level}"

    def describe(self) -> dict:
        meta = self.index.meta
        summary = meta.get("summary") or {}
        m = self.manifest
        complete = summary.get("complete")
        if complete is None:
            status = m.get("status")
            complete = None if status is None else status == "done"
        return {
            "id": self.id, "name": self.name, "path": str(self.folder), "kind": self.kind,
            "model": self.settings.get("model") or (m.get("spec") or {}).get("model"),
            "taxonomy": self.taxonomy, "mode": (self.settings.get("prompt") or {}).get("mode"),
            "answer": self.settings.get("answer"), "status": m.get("status"), "complete": complete,
            "summary": summary, "counts": meta.get("counts", {}), "n_lines": meta.get("n_lines", 0),
            "files": meta.get("files", []),
            "levels": {str(lv): self.level_name(lv) for lv in self.index.levels()},
        }

    # -- questions
    def _renderer_for(self):
        if self._renderer is not None or self._renderer_error is not None:
            return self._renderer
        try:
            from harness.prompts.hierarchy import PromptConfig, Renderer

            cfg = PromptConfig.model_validate(self.settings["prompt"]).model_copy(update={"option_order": "file"})
            self._renderer = Renderer(cfg, answer=self.settings.get("answer") or "generate")
        except (KeyError, TypeError, ValueError) as e:
            self._renderer_error = f"the run's prompt settings cannot be rendered ({e})"
        return self._renderer

    def _item(self, item_id: str):
        info = self.index.item_info(item_id)
        data = self.index.meta.get("data")
        if not info or info.get("data_off") is None or not data:
            return None
        from harness.data.items import parse_record
        from harness.view.index import root_map

        with open(data, "rb") as f:
            f.seek(info["data_off"])
            line = f.readline()
        try:
            return parse_record(orjson.loads(line), data, 0, root_map(self.manifest))
        except (ValueError, orjson.JSONDecodeError):
            return None

    def question(self, rec: dict, item=None) -> dict:
        """The question as the model saw it: {system, text} (or {note} when it cannot be rebuilt)."""
        if self.kind != "hierarchy":
            q = rec.get("question") or rec.get("text")
            return {"text": q} if isinstance(q, str) else {"note": "the prompt is not recorded for this run kind"}
        if rec.get("auto"):
            return {"note": "not asked: text mode fills the leaf with the label"}
        if self.settings.get("answer") == "clip":
            tpl = self.settings.get("template") or "{}"
            opts = [str(v) for v in (rec.get("choices") or {}).values()]
            return {"note": "CLIP: the image is scored against each text",
                    "text": "\n".join(tpl.replace("{cls}", o).replace("{}", o) for o in opts)}
        r = self._renderer_for()
        if r is None:
            return {"note": self._renderer_error or "no prompt settings in run.json"}
        item = item if item is not None else self._item(str(rec.get("item")))
        if item is None:
            return {"note": "the items file of this run is not available: the question cannot be rebuilt"}
        from harness.prompts.hierarchy import format_options

        choices = rec.get("choices") or {}
        for q in r.render(item):
            if q.level != rec.get("level"):
                continue
            if rec.get("option") is not None:
                if q.option is not None and q.options[q.option] == choices.get(rec["option"]):
                    return {"system": q.system, "text": q.text}
                continue
            text = q.text
            with contextlib.suppress(TypeError):
                text = text.replace(format_options(q.options), format_options(tuple(map(str, choices.values()))))
            return {"system": q.system, "text": text}
        return {"note": "this level is not among the item's questions any more"}

    def image_urls(self, image: str | None) -> dict | None:
        loc = images.locate(image, self.roots)
        if loc is None:
            return None
        q = urlencode({"run": self.id, "root": loc[0], "path": loc[1]})
        return {"url": f"/img?{q}", "thumb": f"/img?{q}&thumb=1"}

    def row(self, rec: dict, *, render: bool = True) -> dict:
        """A result line as the page shows it."""
        meta = rec.pop("_", {})
        item = rec.get("item")
        info = self.index.item_info(str(item)) if item is not None else None
        out = {
            "run": self.id, "qid": rec.get("qid"), "item": item, "level": rec.get("level"),
            "level_name": self.level_name(rec.get("level")), "truth": rec.get("truth"),
            "choices": rec.get("choices"), "letter": rec.get("letter"), "prediction": rec.get("prediction"),
            "raw": rec.get("raw"), "error": rec.get("error"), "status": meta.get("status"),
            "shown": meta.get("shown"), "scored": rec.get("scored", True), "auto": rec.get("auto", False),
            "option": rec.get("option"), "yes": rec.get("yes"),
            "distribution": rec.get("letter_logprobs") or rec.get("scores"),
            "distribution_kind": "logprob" if rec.get("letter_logprobs") else "prob" if rec.get("scores") else None,
            "lraw": bool(info and info.get("lraw")),
            "image": self.image_urls(info.get("image") if info else None),
        }
        if render:
            out["question"] = self.question(rec)
        return out

    def questions(self, f: Filters, page: int, per: int) -> dict:
        total = self.index.count(f)
        rows = [self.row(r) for r in self.index.page(f, page, per)]
        return {"total": total, "page": page, "per": per, "rows": rows}

    def item(self, item_id: str) -> dict:
        lines = self.index.item_lines(item_id)
        it = self._item(item_id) if self.kind == "hierarchy" else None
        rows = []
        for rec in lines:
            row = self.row(rec, render=False)
            row["question"] = self.question(rec | {}, it) if self.kind == "hierarchy" else self.question(rec)
            rows.append(row)
        info = self.index.item_info(item_id) or {}
        return {"run": self.id, "name": self.name, "lines": rows, "leaf_ok": info.get("leaf_ok"),
                "anc_ok": info.get("anc_ok"), "lraw": bool(info.get("lraw")),
                "image": self.image_urls(info.get("image"))}

    def tree(self) -> dict:
        """Accuracy per taxonomy node (the questions whose truth is that node), as a flat list with parents."""
        nodes = self.index.nodes()
        ids = {(n["level"], n["truth"]): k for k, n in enumerate(nodes)}
        out = []
        for k, n in enumerate(nodes):
            lv = n["level"]
            parent = ids.get((lv - 1, n["parent"])) if isinstance(lv, int) and n["parent"] is not None else None
            out.append({"id": k, "name": n["truth"], "level": lv, "level_name": self.level_name(lv),
                        "parent": parent, "n": n["n"], "right": n["right"], "scored": bool(n["scored"]),
                        "acc": 100.0 * n["right"] / n["n"] if n["n"] else None})
        return {"run": self.id, "name": self.name, "nodes": out}


def status_names() -> tuple[str, ...]:
    return STATUSES
