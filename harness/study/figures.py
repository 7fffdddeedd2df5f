"""PNG figures of the cross-run analyses (matplotlib, Agg backend: no display needed).

Each function takes the analysis records (harness.study.records), writes one PNG and returns its path.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from harness.data.taxonomy import TAXONOMIES
from harness.study.records import Correlation, Delta, Point, RunInfo, Spread, asked_levels, level_name

DPI = 120


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _colours(keys: Sequence[str], cmap_name: str = "tab10") -> dict[str, tuple]:
    cmap = plt.get_cmap(cmap_name)
    n = cmap.N
    return {k: cmap(i % n) for i, k in enumerate(dict.fromkeys(keys))}


def _display(taxonomy: str | None) -> str:
    info = TAXONOMIES.get(taxonomy or "")
    return info.display_name if info else (taxonomy or "-")


def text_visual_scatter(points: Sequence[Point], corr: Correlation, path: Path) -> Path:
    """Visual HCA (VLM) against text HCA (its LLM), one colour per taxonomy, with the least-squares line."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    col = _colours([p.taxonomy or "-" for p in points])
    for tax, c in col.items():
        ps = [p for p in points if (p.taxonomy or "-") == tax]
        ax.scatter([p.text_hca for p in ps], [p.visual_hca for p in ps], color=c, s=46, label=_display(tax),
                   edgecolor="black", linewidth=0.5, zorder=3)
    for p in points:
        ax.annotate(p.model, (p.text_hca, p.visual_hca), textcoords="offset points", xytext=(4, 3), fontsize=7, alpha=0.8)
    xs = np.array([p.text_hca for p in points])
    if np.isfinite(corr.slope) and len(xs):
        gx = np.linspace(xs.min(), xs.max(), 50)
        ax.plot(gx, corr.slope * gx + corr.intercept, color="black", linestyle="--", linewidth=1,
                label=f"fit: y = {corr.slope:.2f}x {corr.intercept:+.1f}", zorder=2)
    title = "Text vs visual HCA"
    if np.isfinite(corr.pearson):
        title += f"\nPearson {corr.pearson:.2f}"
        if np.isfinite(corr.pearson_ci[0]):
            title += f" [{corr.pearson_ci[0]:.2f}, {corr.pearson_ci[1]:.2f}]"
        title += f", Spearman {corr.spearman:.2f}"
        if np.isfinite(corr.spearman_ci[0]):
            title += f" [{corr.spearman_ci[0]:.2f}, {corr.spearman_ci[1]:.2f}]"
        title += f" (n={corr.n})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("text-only HCA of the LLM (%)")
    ax.set_ylabel("visual HCA of the VLM (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def per_level_curves(runs: Sequence[RunInfo], path: Path) -> Path:
    """Accuracy at each level (coarse to fine), one panel per taxonomy, one line per run (dashed:
    text mode, whose filled-in leaf is not drawn)."""
    by_tax: dict[str, list[RunInfo]] = defaultdict(list)
    for r in runs:
        if r.summary.per_level:
            by_tax[r.taxonomy or "-"].append(r)
    n = max(1, len(by_tax))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (tax, rs) in zip(axes.flat, sorted(by_tax.items())):
        per_run = len(rs) <= 20  # one colour per run when they fit, else per model
        col = _colours([r.label if per_run else r.model for r in rs], "tab20" if per_run and len(rs) > 10 else "tab10")
        levels = sorted({int(lv) for r in rs for lv in r.summary.per_level})
        for r in rs:
            pts = asked_levels(r)
            ax.plot([int(x) for x, _ in pts], [a for _, a in pts], marker="o", markersize=3,
                    color=col[r.label if per_run else r.model], linestyle="--" if r.mode == "text" else "-",
                    label=f"{r.model} ({r.mode or '?'}{', v' + r.variant if r.variant is not None else ''})")
        ax.set_xticks(levels)
        ax.set_xticklabels([level_name(None if tax == "-" else tax, str(x)) for x in levels], rotation=30, fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(_display(None if tax == "-" else tax), fontsize=10)
        ax.grid(alpha=0.3)
        if len(rs) <= 20:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for ax in list(axes.flat)[len(by_tax):]:
        ax.axis("off")
    return _save(fig, path)


def hca_leaf_bars(runs: Sequence[RunInfo], path: Path) -> Path:
    """Leaf accuracy and HCA side by side per run (non-text runs): the gap is what consistency costs."""
    rs = [r for r in runs if r.mode != "text"] or list(runs)
    labels = [f"{r.model} / {_display(r.taxonomy)}" + (f" v{r.variant}" if r.variant is not None else "") for r in rs]
    y = np.arange(len(rs))
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * len(rs)))
    ax.barh(y - 0.2, [r.leaf for r in rs], height=0.38, color="#7aa6c2", label="leaf accuracy")
    ax.barh(y + 0.2, [r.hca for r in rs], height=0.38, color="#d1495b", label="HCA")
    for i, r in enumerate(rs):
        ax.text(max(r.leaf, r.hca) + 1, i, f"gap {r.leaf - r.hca:.1f}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xlabel("%")
    ax.set_title("Leaf accuracy vs hierarchical consistent accuracy", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def variant_spread_plot(spreads: Sequence[Spread], path: Path) -> Path:
    """HCA of every prompt variant (dots), mean and min-max range, per model and taxonomy."""
    labels = [f"{s.model} / {_display(s.taxonomy)} ({s.mode})" for s in spreads]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.4 * len(spreads)))
    for i, s in enumerate(spreads):
        ax.hlines(i, s.min, s.max, color="grey", linewidth=2, zorder=1)
        ax.scatter(s.hca, [i] * len(s.hca), color="#00798c", s=22, zorder=2)
        ax.scatter([s.mean], [i], marker="|", color="black", s=200, zorder=3)
        ax.text(s.max + 1, i, f"{s.mean:.1f} ± {s.std:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(spreads)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set_xlabel("HCA (%) over prompt variants")
    ax.set_title("Prompt-variant spread (dots: variants, bar: mean)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def finetune_delta_bars(deltas: Sequence[Delta], path: Path) -> Path:
    """HCA change per benchmark, text and visual runs in separate colours."""
    labels = [f"{_display(d.taxonomy)} ({d.mode})" + (f" v{d.variant}" if d.variant is not None else "") for d in deltas]
    colours = ["#edae49" if d.mode == "text" else "#00798c" for d in deltas]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(deltas)))
    ax.barh(range(len(deltas)), [d.hca_delta for d in deltas], color=colours)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(deltas)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("HCA after - before finetuning (points)")
    ax.set_title("Finetuning deltas (orange: text, teal: visual)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
