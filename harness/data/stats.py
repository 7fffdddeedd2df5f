"""`harness data stats FILE`: what an annotation file holds."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.data.items import ReadReport, read_items


def stats(path: str | Path, strict: bool = False) -> dict:
    report = ReadReport()
    n_items = 0
    questions: Counter[int] = Counter()
    truths: dict[int, set[str]] = defaultdict(set)
    options: dict[int, Counter[int]] = defaultdict(Counter)
    none_truths: Counter[int] = Counter()
    roots: Counter[int] = Counter()
    depths: Counter[int] = Counter()
    for item in read_items(path, strict=strict, report=report):
        n_items += 1
        depths[len(item.levels)] += 1
        for lv in item.levels:
            if lv.truth is None:
                none_truths[lv.n] += 1
                continue
            questions[lv.n] += 1
            truths[lv.n].add(lv.truth.lower())
            options[lv.n][len(lv.choices)] += 1
            roots[lv.n] += lv.root
    levels = sorted(questions)
    return {
        "file": str(path),
        "items": n_items,
        "questions": sum(questions.values()),
        "scored_questions": sum(questions.values()) - sum(roots.values()),
        "depths": dict(sorted(depths.items())),
        "levels": {
            str(n): {
                "questions": questions[n],
                "distinct_truths": len(truths[n]),
                "options": dict(sorted(options[n].items())),
                "none_truths": none_truths[n],
                "root": roots[n] == questions[n] and roots[n] > 0,
            }
            for n in levels
        },
        "skipped_lines": [str(e) for e in report.errors],
    }


def print_stats(s: dict, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]{s['file']}[/]: {s['items']:,} items, {s['questions']:,} questions "
                  f"({s['scored_questions']:,} scored), depths {s['depths']}")
    t = Table()
    for c in ("level", "questions", "distinct truths", "options (count: questions)", "None truths", "root"):
        t.add_column(c, justify="right")
    for n, lv in s["levels"].items():
        t.add_row(n, f"{lv['questions']:,}", f"{lv['distinct_truths']:,}",
                  ", ".join(f"{k}: {v:,}" for k, v in lv["options"].items()), str(lv["none_truths"]),
                  "yes" if lv["root"] else "")
    console.print(t)
    console.print("distinct truths per level: " + "/".join(str(lv["distinct_truths"]) for lv in s["levels"].values()))
    if s["skipped_lines"]:
        console.print(f"[red]{len(s['skipped_lines'])} invalid line(s) skipped:[/]")
        for e in s["skipped_lines"][:20]:
            console.print(f"  {e}")
