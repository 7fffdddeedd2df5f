"""`harness report --html OUT.html`: one self-contained file to share - the numbers of `harness report
--json`, figures as inline SVG, a taxonomy map, and a sampled gallery of failures per category with
small embedded thumbnails. No script, no external request: it reads in any browser, without the harness.
Every text from results or models is HTML-escaped."""

from __future__ import annotations

import base64
import math
from datetime import UTC, datetime
from html import escape
from pathlib import Path

from harness import __version__
from harness.view import images
from harness.view.index import Filters
from harness.view.runs import ViewRun

MAIN_KEYS = [
    ("n_items", "items"), ("hca", "HCA"), ("leaf_acc", "leaf accuracy"), ("por", "POR"),
    ("strict_por", "strict POR"), ("tor", "TOR"), ("por_f1", "POR F1"), ("hf1", "hierarchical F1"),
    ("leaf_right_ancestor_wrong", "leaf right, an ancestor wrong (%)"),
    ("ancestors_right_leaf_wrong", "ancestors right, leaf wrong (%)"),
    ("n_questions", "questions"), ("n_unanswered", "unanswered"), ("n_errors", "failed"), ("n_unparsed", "unparsed"),
]
CATEGORIES = [("wrong", "Wrong answers", Filters(status="wrong")),
              ("lraw", "Leaf right, an ancestor wrong", Filters(lraw=True, status="wrong")),
              ("unparsed", "Unparsed answers", Filters(status="unparsed")),
              ("failed", "Failed requests", Filters(status="failed"))]

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:20px;color:#1f2328}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{padding:8px 12px;margin:8px 0;border-radius:6px;background:#fff4e5;border:1px solid #f0c36d}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(380px,1fr));gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px;display:grid;grid-template-columns:100px 1fr;gap:10px}
.card img{max-width:96px;max-height:96px}pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;
padding:4px 6px;margin:3px 0;font-size:12px}.muted{color:#666}.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828}
ul{list-style:none;padding:0;margin:2px 0}h2{margin-top:28px}
"""


def _e(v) -> str:
    return escape("" if v is None else str(v), quote=True)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.2f}"
    return "–" if v is None else str(v)


def _num(run: int, key: str, v, extra: str = "") -> str:
    return (f'<td class="num" data-run="{run}" data-key="{_e(key)}" data-value="{_e(repr(v) if isinstance(v, float) else v)}">'
            f"{_e(_fmt(v))}{extra}</td>")


def _color(acc: float | None) -> str:
    """Red (0 %) - yellow (50 %) - green (100 %)."""
    if acc is None:
        return "#cccccc"
    a = max(0.0, min(1.0, acc / 100))
    r, g = (215, int(48 + 2 * a * (200 - 48))) if a < 0.5 else (int(215 - (2 * a - 1) * (215 - 26)), 200 - int((2 * a - 1) * 48))
    return f"#{r:02x}{g:02x}40"


def _level_bars(runs: list[ViewRun], summaries: list[dict]) -> str:
    levels = sorted({lv for s in summaries for lv in (s.get("per_level") or {})}, key=int)
    if not levels:
        return ""
    bw, gap, h = 14, 10, 160
    width = 40 + len(levels) * (len(runs) * bw + gap)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h + 40}" role="img" '
           'aria-label="accuracy per level">']
    for y in (0, 50, 100):
        yy = 10 + h - h * y / 100
        out.append(f'<line x1="30" x2="{width}" y1="{yy}" y2="{yy}" stroke="#ddd"/>'
                   f'<text x="0" y="{yy + 4}" font-size="10">{y}%</text>')
    x = 35
    palette = ["#4c8bf5", "#f5a623", "#7ed321", "#bd10e0", "#d0021b", "#50e3c2"]
    for lv in levels:
        for k, s in enumerate(summaries):
            v = (s.get("per_level") or {}).get(lv)
            if v is None:
                continue
            bh = h * v / 100
            out.append(f'<rect x="{x + k * bw}" y="{10 + h - bh:.1f}" width="{bw - 2}" height="{bh:.1f}" '
                       f'fill="{palette[k % len(palette)]}"><title>{_e(runs[k].name)} level {_e(lv)}: '
                       f'{v:.2f} %</title></rect>')
        out.append(f'<text x="{x}" y="{h + 25}" font-size="10">{_e(lv)} {_e(runs[0].level_name(int(lv)))}</text>')
        x += len(runs) * bw + gap
    out.append("</svg>")
    legend = " ".join(f'<span style="color:{palette[k % len(palette)]}">■</span> {_e(r.name)}' for k, r in enumerate(runs))
    return "".join(out) + f'<div class="muted">{legend}</div>'


def _icicle(run: ViewRun, width: int = 1000, row: int = 26) -> str:
    """The taxonomy map as an icicle: one row a level, a node's width its number of leaf questions,
    its colour its accuracy (the questions whose truth is that node)."""
    nodes = run.tree()["nodes"]
    if not nodes:
        return '<p class="muted">No questions with a truth in this run.</p>'
    kids: dict[int | None, list[dict]] = {}
    by_id = {n["id"]: n for n in nodes}
    for n in nodes:
        p = n["parent"] if n["parent"] in by_id else None
        kids.setdefault(p, []).append(n)
    size: dict[int, int] = {}

    def total(n: dict) -> int:
        if n["id"] not in size:
            ch = kids.get(n["id"], [])
            size[n["id"]] = sum(total(c) for c in ch) if ch else n["n"]
        return size[n["id"]]

    roots = kids.get(None, [])
    grand = sum(total(r) for r in roots) or 1
    depth = max(1, max((n["level"] or 0) for n in nodes) - min((n["level"] or 0) for n in nodes) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{depth * row}" role="img" '
           f'aria-label="taxonomy map of {_e(run.name)}">']
    stack = [(r, 0, 0.0) for r in roots]
    x0 = 0.0
    placed = []
    for r in sorted(roots, key=lambda n: -total(n)):
        placed.append((r, 0, x0))
        x0 += width * total(r) / grand
    stack = placed
    while stack:
        n, d, x = stack.pop()
        w = width * total(n) / grand
        if w < 0.4:
            continue
        acc = n["acc"]
        label = _e(n["name"]) if w > 7 * len(n["name"]) else ""
        out.append(f'<g><rect x="{x:.2f}" y="{d * row}" width="{max(w - 0.5, 0.3):.2f}" height="{row - 1}" '
                   f'fill="{_color(acc)}"><title>{_e(n["name"])} ({_e(n["level_name"])}): {_fmt(acc)} % of '
                   f'{n["n"]:,} questions right</title></rect>'
                   + (f'<text x="{x + 3:.1f}" y="{d * row + 17}" font-size="11">{label}</text>' if label else "")
                   + "</g>")
        cx = x
        for c in sorted(kids.get(n["id"], []), key=lambda c: -total(c)):
            stack.append((c, d + 1, cx))
            cx += width * total(c) / grand
    out.append("</svg>")
    return "".join(out)


def _weakest(run: ViewRun, k: int = 12) -> str:
    nodes = [n for n in run.tree()["nodes"] if n["scored"] and n["n"] >= 3]
    nodes.sort(key=lambda n: (n["acc"], -n["n"]))
    if not nodes:
        return ""
    rows = "".join(f'<tr><td>{_e(n["name"])}</td><td>{_e(n["level"])} · {_e(n["level_name"])}</td>'
                   f'<td class="num">{n["n"]:,}</td><td class="num">{_fmt(n["acc"])}</td></tr>' for n in nodes[:k])
    return ("<h3>Weakest nodes (at least 3 questions)</h3><table><tr><th>node</th><th>level</th><th>questions</th>"
            f"<th>accuracy %</th></tr>{rows}</table>")


def _thumb(run: ViewRun, image: str | None, side: int) -> str:
    loc = images.locate(image, run.roots)
    if loc is None:
        return '<div class="muted">no image</div>'
    try:
        data = images.thumbnail(images.resolve(run.roots, *loc), side)
    except (images.Refused, OSError, ValueError):
        return '<div class="muted">image not available</div>'
    return f'<img alt="{_e(image)}" src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">'


def _card(run: ViewRun, rec: dict, side: int) -> str:
    row = run.row(rec)
    info = run.index.item_info(str(row["item"])) or {}
    q = row["question"] or {}
    opts = []
    for L, text in (row["choices"] or {}).items() if isinstance(row["choices"], dict) else []:
        truth = str(text).lower() == str(row["truth"] or "").lower()
        pred = L == (row["option"] or row["letter"])
        opts.append(f'<li class="{"ok" if truth else "bad" if pred else ""}">{_e(L)}. {_e(text)}'
                    f'{" ✓" if truth else ""}{" ← predicted" if pred and not row["option"] else ""}'
                    f'{" ← statement: " + _e(row["shown"]) if pred and row["option"] else ""}</li>')
    return (f'<div class="card" data-qid="{_e(row["qid"])}"><div>{_thumb(run, info.get("image"), side)}</div><div>'
            f'<div><b>{_e(row["level_name"])}</b> · <span class="muted">{_e(row["item"])}</span></div>'
            f'<div>truth <span class="ok">{_e(row["truth"])}</span> · prediction {_e(_fmt(row["shown"]))}</div>'
            + (f'<pre>{_e(q["text"])}</pre>' if q.get("text") else "")
            + (f"<ul>{''.join(opts)}</ul>" if opts else "")
            + f'<div class="muted">raw answer</div><pre class="raw">{_e(row["raw"] if row["raw"] is not None else "(none)")}</pre>'
            + (f'<div class="bad">error: {_e(row["error"])}</div>' if row["error"] else "")
            + "</div></div>")


def _gallery(run: ViewRun, per_category: int, side: int) -> str:
    out = []
    for key, title, f in CATEGORIES:
        if key == "lraw" and run.kind != "hierarchy":
            continue
        n = run.index.count(f)
        if not n:
            continue
        k = min(per_category, n)
        picks = sorted({int(i * n / k) for i in range(k)})  # evenly spread over the run, deterministic
        cards = [_card(run, rec, side) for p in picks for rec in run.index.page(f, p, 1)]
        out.append(f'<h3 data-category="{key}">{_e(title)} <span class="muted">({n:,}; {len(cards)} shown)</span></h3>'
                   f'<div class="gallery">{"".join(cards)}</div>')
    return "".join(out)


def render_html(paths: list[str | Path], *, per_category: int = 6, thumb_side: int = 96,
                image_roots: list[str | Path] = ()) -> str:
    runs = [ViewRun(p, k, image_roots=image_roots) for k, p in enumerate(paths)]
    summaries = [r.index.summary for r in runs]
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>harness report</title>"
             f"<style>{CSS}</style></head><body><h1>harness report</h1>"
             f'<p class="muted">{len(runs)} run(s) · generated {datetime.now(UTC).isoformat(timespec="seconds")} '
             f"by harness {_e(__version__)}</p>"]
    parts.append("<table><tr><th>run</th><th>kind</th><th>model</th><th>taxonomy</th><th>status</th><th>path</th></tr>")
    for r in runs:
        d = r.describe()
        parts.append("<tr>" + "".join(f"<td>{_e(_fmt(d[k]))}</td>" for k in ("name", "kind", "model", "taxonomy", "status", "path"))
                     + "</tr>")
    parts.append("</table>")
    for r, s in zip(runs, summaries):
        d = r.describe()
        if d["complete"] is False:
            parts.append(f'<div class="banner">{_e(r.name)}: this run is incomplete (status {_e(d["status"])}); '
                         "its numbers cover the questions answered so far.</div>")
    hier = [(r, s) for r, s in zip(runs, summaries) if s.get("kind") == "hierarchy"]
    if hier:
        parts.append("<h2>Hierarchical consistency</h2><table><tr><th>metric</th>"
                     + "".join(f"<th>{_e(r.name)}</th>" for r, _ in hier) + "</tr>")
        for key, label in MAIN_KEYS:
            if not any(key in s for _, s in hier):
                continue
            cells = []
            for r, s in hier:
                if key not in s:
                    cells.append("<td>–</td>")
                    continue
                ci = s.get(key + "_ci")
                extra = (f' <span class="muted">[{ci[0]:.2f}, {ci[1]:.2f}]</span>'
                         if isinstance(ci, list) and len(ci) == 2 and None not in ci else "")
                cells.append(_num(r.id, key, s[key], extra))
            parts.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}</tr>")
        levels = sorted({lv for _, s in hier for lv in (s.get("per_level") or {})}, key=int)
        for lv in levels:
            parts.append(f"<tr><th>level {_e(lv)} · {_e(hier[0][0].level_name(int(lv)))}</th>"
                         + "".join(_num(r.id, f"per_level.{lv}", s["per_level"][lv]) if lv in (s.get("per_level") or {})
                                   else "<td>–</td>" for r, s in hier) + "</tr>")
        parts.append("</table><h3>Accuracy per level</h3>")
        parts.append(_level_bars([r for r, _ in hier], [s for _, s in hier]))
    for r, s in zip(runs, summaries):
        if s.get("kind") != "hierarchy":
            parts.append(f"<h2>{_e(r.name)} ({_e(r.kind)})</h2><table><tr><th>metric</th><th>value</th></tr>")
            for k, v in _flatten(s):
                if k != "kind" and isinstance(v, int | float | bool):
                    parts.append(f"<tr><th>{_e(k)}</th>{_num(r.id, k, v)}</tr>")
            parts.append("</table>")
    for r in runs:
        parts.append(f"<h2>{_e(r.name)}</h2>")
        if r.kind == "hierarchy":
            parts.append("<h3>Taxonomy map</h3><p class=muted>One row a level; width: questions; colour: accuracy "
                         "of the questions whose truth is that node (red 0 %, green 100 %).</p>")
            parts.append(_icicle(r))
            parts.append(_weakest(r))
        parts.append(_gallery(r, per_category, thumb_side))
    parts.append("</body></html>")
    return "".join(parts)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out += _flatten(v, key)
        else:
            out.append((key, v))
    return out


def write_html(paths: list[str | Path], out: str | Path, **kw) -> Path:
    out = Path(out)
    out.write_text(render_html(paths, **kw), encoding="utf-8")
    return out

