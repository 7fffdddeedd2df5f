"""`harness report`: metrics of one or more runs, side by side (rich table, JSON, CSV, markdown)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.metrics.hierarchy import Summary
from harness.metrics.readers import results_files, summarize_reference, summarize_results

COLUMNS = ["n_items", "hca", "leaf_acc", "por", "strict_por", "tor", "por_f1", "hf1",
           "leaf_right_ancestor_wrong", "ancestors_right_leaf_wrong", "n_questions", "n_unanswered"]


def resolve(path: str | Path) -> Path:
    """A result file as given; for a run folder its results.jsonl, or the folder itself when it holds
    shards' results.shard-I-of-N.jsonl (every results file is then read as one run)."""
    p = Path(path)
    if p.is_dir():
        files = results_files(p)
        if not files:
            raise FileNotFoundError(f"{p}: no results.jsonl (nor results.shard-I-of-N.jsonl) in this folder")
        return files[0] if files == [p / "results.jsonl"] else p
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    return p


def summarize_path(path: str | Path, score_from: int | None = None) -> Summary:
    """Dispatch on content: a run folder (every results file as one run), a JSON list (reference output
    format) or results.jsonl lines."""
    p = resolve(path)
    if p.is_dir():
        return summarize_results(p)
    with p.open("rb") as f:
        # skip leading whitespace byte by byte: a reference JSON list may start with a newline
        head = f.read(1)
        while head in (b" ", b"\n", b"\r", b"\t"):
            head = f.read(1)
    if head == b"[":
        return summarize_reference(p, score_from)
    return summarize_results(p)


def rows(paths: list[str], score_from: int | None = None) -> list[tuple[str, Summary]]:
    return [(_name(p), summarize_path(p, score_from)) for p in paths]


def _name(p: str | Path) -> str:
    """Run folder name for results.jsonl inside a run folder, else the path as given."""
    p = Path(p)
    if p.name == "results.jsonl":
        p = p.parent
    return str(p).rstrip("/") or str(p)


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def render_table(results: list[tuple[str, Summary]], console: Console | None = None) -> None:
    # piped output (logs, CI) gets a wide table instead of rich's 80-column default
    console = console or Console(width=None if sys.stdout.isatty() else 220)
    levels = sorted({lv for _, s in results for lv in s.per_level}, key=int)
    t = Table(title="Hierarchical consistency", show_lines=False)
    t.add_column("run", overflow="fold")
    for c in ("items", "HCA [95% CI]", "leaf", "POR", "sPOR", "TOR", "hF1", "leaf ok, anc. wrong", "unanswered"):
        t.add_column(c, justify="right")
    for lv in levels:
        t.add_column(f"L{lv}", justify="right")
    for name, s in results:
        ci = f"{s.hca:.2f} [{s.hca_ci[0]:.1f}, {s.hca_ci[1]:.1f}]" if s.n_items else "-"
        t.add_row(name, str(s.n_items), ci, _fmt(s.leaf_acc), _fmt(s.por), _fmt(s.strict_por), _fmt(s.tor),
                  _fmt(s.hf1), _fmt(s.leaf_right_ancestor_wrong), str(s.n_unanswered),
                  *[_fmt(s.per_level[lv]) if lv in s.per_level else "-" for lv in levels])
    console.print(t)


def to_csv(results: list[tuple[str, Summary]]) -> str:
    levels = sorted({lv for _, s in results for lv in s.per_level}, key=int)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", *COLUMNS, "hca_ci_lo", "hca_ci_hi", *[f"level{lv}" for lv in levels]])
    for name, s in results:
        w.writerow([name, *[getattr(s, c) for c in COLUMNS], *s.hca_ci,
                    *[s.per_level.get(lv, "") for lv in levels]])
    return buf.getvalue()


def to_markdown(results: list[tuple[str, Summary]]) -> str:
    levels = sorted({lv for _, s in results for lv in s.per_level}, key=int)
    head = ["run", "items", "HCA", "95% CI", "leaf", "POR", "strict POR", "TOR", *[f"L{lv}" for lv in levels]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in results:
        cells = [name, str(s.n_items), _fmt(s.hca), f"{s.hca_ci[0]:.2f}-{s.hca_ci[1]:.2f}", _fmt(s.leaf_acc),
                 _fmt(s.por), _fmt(s.strict_por), _fmt(s.tor), *[_fmt(s.per_level.get(lv, float("nan"))) for lv in levels]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
