"""Linear (or MLP) probes per taxonomy level on stored features, and probe HCA.

Reference settings (protocol section 7): `nn.Linear(d, C)`, Adam lr 1e-4, cross-entropy, batch 512 in
the stored (fixed) order, 500 epochs, float32 features, no normalisation. Model selection:
  - "val" (default): the epoch with the best accuracy on a validation split carved from train by a
    stable hash of the group (image, or species in text probing: validation species are then unseen
    in training, like the test species);
  - "last": the final epoch;
  - "reference": the best *test* accuracy over epochs, per level, as the reference reported it
    ([QUIRK] selection on the test set: optimistic; use it only to reproduce published numbers).
Test predictions are written as a `results.jsonl` in the harness result format, and the metrics come
from `harness.metrics.readers.summarize_results` - the same code as `harness report` (which also reads it).
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, field_validator

from harness.metrics.hierarchy import Summary
from harness.runs.results import write_jsonl
from harness.metrics.readers import summarize_results
from probes.store import FeatureStore

Select = Literal["val", "last", "reference"]
SELECT_NOTES = {
    "val": "epoch with the best validation accuracy (validation carved from train by group hash)",
    "last": "final epoch",
    "reference": "[QUIRK] epoch with the best TEST accuracy, per level (the reference's selection on the "
                 "test set; optimistic, for reproducing published numbers only)",
}


class ProbeConfig(BaseModel):
    """Everything that decides a probe's numbers (written to probe.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    probe: Literal["linear", "mlp"] = "linear"
    """linear: nn.Linear(d, C); mlp: Linear(d, d) -> ReLU -> Linear(d, C) (the reference MLPProbing)."""
    epochs: int = 500
    lr: float = 1e-4
    batch_size: int = 512
    select: Select = "val"
    val_fraction: float = 0.1
    """Share of training groups held out for validation (select="val" only)."""
    seed: int = 42
    train_split: str = "train"
    test_split: str = "test"
    levels: tuple[int, ...] | None = None
    """Levels (1-based) to probe; None = every level with at least two classes."""
    device: str = "auto"

    @field_validator("epochs", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be in [0, 1)")
        return v


def _hash01(seed: int, group: str) -> float:
    h = hashlib.blake2b(f"{seed}\x1f{group}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def validation_groups(groups: Sequence[str], fraction: float, seed: int) -> set[str]:
    """A stable, order-independent share of the groups (at least one when fraction > 0 and >= 2 groups)."""
    uniq = sorted(set(groups))
    if fraction <= 0 or len(uniq) < 2:
        return set()
    scored = sorted((_hash01(seed, g), g) for g in uniq)
    chosen = {g for h, g in scored if h < fraction}
    if not chosen:
        chosen = {scored[0][1]}
    if len(chosen) == len(uniq):
        chosen.discard(scored[-1][1])
    return chosen


@dataclass
class LevelTask:
    """The rows and labels of one level's probe."""

    level: int
    name: str
    classes: list[str]
    train: np.ndarray  # row indices into the store
    val: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_val: np.ndarray
    y_test: np.ndarray
    test_unseen: int = 0
    skipped: str | None = None


def level_tasks(rows: list[dict], names: Sequence[str], cfg: ProbeConfig) -> list[LevelTask]:
    """Split rows per level. A row with a `level` field (text probing) serves only that level."""
    depth = max((len(r["labels"]) for r in rows), default=0)
    val_groups: set[str] = set()
    if cfg.select == "val":
        val_groups = validation_groups([r["group"] for r in rows if r["split"] == cfg.train_split],
                                       cfg.val_fraction, cfg.seed)
        if not val_groups:
            raise ValueError("select 'val' needs a validation split: --val-fraction > 0 and at least 2 training "
                             "groups (or use --select last)")
    wanted = set(cfg.levels) if cfg.levels else None
    if wanted and (bad := sorted(n for n in wanted if not 1 <= n <= depth)):
        raise ValueError(f"levels {bad} out of range: the data has levels 1..{depth}")
    tasks = []
    for n in range(1, depth + 1):
        if wanted is not None and n not in wanted:
            continue
        parts: dict[str, list[tuple[int, str]]] = {"train": [], "val": [], "test": []}
        for i, r in enumerate(rows):
            if r.get("level", n) != n or len(r["labels"]) < n or r["labels"][n - 1] is None:
                continue
            lab = r["labels"][n - 1]
            if r["split"] == cfg.train_split:
                parts["val" if r["group"] in val_groups else "train"].append((i, lab))
            elif r["split"] == cfg.test_split:
                parts["test"].append((i, lab))
        classes = sorted({lab for p in parts.values() for _, lab in p})  # reference: sorted over all splits
        cid = {c: k for k, c in enumerate(classes)}
        arrays = {}
        for s, p in parts.items():
            arrays[s] = np.array([i for i, _ in p], dtype=np.int64)
            arrays["y_" + s] = np.array([cid[lab] for _, lab in p], dtype=np.int64)
        seen = set(arrays["y_train"].tolist())
        task = LevelTask(n, names[n - 1] if n - 1 < len(names) else f"level {n}", classes, **arrays)
        task.test_unseen = int(sum(y not in seen for y in arrays["y_test"].tolist()))
        if len(seen) < 2:
            task.skipped = "fewer than 2 classes in training (e.g. the taxonomy root, never scored)"
        elif not len(task.test):
            task.skipped = f"no {cfg.test_split} rows"
        elif task.test_unseen == len(task.test):
            task.skipped = "no test class occurs in training (e.g. species in species-disjoint text probing)"
        if task.skipped and wanted is not None:
            raise ValueError(f"level {n} ({task.name}) cannot be probed: {task.skipped}")
        tasks.append(task)
    return tasks


@dataclass
class LevelResult:
    level: int
    name: str
    n_classes: int
    n_train: int
    n_val: int
    n_test: int
    test_unseen: int
    epoch: int | None = None  # 0-based epoch of the selected probe
    train_acc: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    skipped: str | None = None
    curves: dict[str, list[float]] = field(default_factory=dict, repr=False)
    test_pred: np.ndarray | None = field(default=None, repr=False)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _build(d: int, c: int, kind: str):
    import torch

    if kind == "linear":
        return torch.nn.Linear(d, c)
    return torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, c))


def train_level(x, task: LevelTask, cfg: ProbeConfig) -> LevelResult:
    """Train one level's probe on `x` (a float32 torch tensor of all store rows, on the device)."""
    import torch

    res = LevelResult(task.level, task.name, len(task.classes), len(task.train), len(task.val), len(task.test),
                      task.test_unseen, skipped=task.skipped)
    if task.skipped:
        return res
    dev = x.device
    xs = {s: x[torch.as_tensor(getattr(task, s), device=dev)] for s in ("train", "val", "test")}
    ys = {s: torch.as_tensor(getattr(task, "y_" + s), device=dev) for s in ("train", "val", "test")}
    torch.manual_seed(cfg.seed)
    model = _build(x.shape[1], len(task.classes), cfg.probe).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    bs = cfg.batch_size
    curves: dict[str, list[float]] = {"train_loss": [], "train_acc": [], "val_acc": [], "test_acc": []}
    best = -1.0
    chosen_pred = None
    n_train = len(task.train)

    def predict(s: str):
        out = [model(xs[s][i:i + 8192]).argmax(1) for i in range(0, len(xs[s]), 8192)]
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=dev)

    def acc(pred, s: str) -> float:
        return float((pred == ys[s]).float().mean().item() * 100) if len(pred) else float("nan")

    for epoch in range(cfg.epochs):
        model.train()
        total = torch.zeros((), device=dev)
        for i in range(0, n_train, bs):  # fixed order, as the reference
            opt.zero_grad()
            loss = loss_fn(model(xs["train"][i:i + bs]), ys["train"][i:i + bs])
            loss.backward()
            opt.step()
            total += loss.detach() * min(bs, n_train - i)
        model.eval()
        with torch.no_grad():
            preds = {s: predict(s) for s in ("train", "val", "test")}
        accs = {s: acc(preds[s], s) for s in preds}
        curves["train_loss"].append(float(total) / n_train)
        for s in ("train", "val", "test"):
            curves[f"{s}_acc"].append(accs[s])
        score = {"val": accs["val"], "reference": accs["test"], "last": float(epoch)}[cfg.select]
        if score > best:  # strictly better: the earliest epoch wins ties (reference `>`)
            best = score
            res.epoch, res.train_acc, res.val_acc, res.test_acc = epoch, accs["train"], accs["val"], accs["test"]
            chosen_pred = preds["test"].cpu().numpy()
    res.curves = curves
    res.test_pred = chosen_pred
    if res.val_acc is not None and res.val_acc != res.val_acc:  # nan: no validation rows
        res.val_acc = None
    return res


@dataclass
class ProbeRun:
    feature: str
    levels: list[LevelResult]
    summary: Summary
    out: Path


def train_probes(store: FeatureStore, feature: str, out: str | Path, cfg: ProbeConfig, *, plots: bool = True) -> ProbeRun:
    """Train every level's probe on one stored feature; write results.jsonl, probe.json, CSVs, curves."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = list(store.rows())
    if not rows:
        raise ValueError(f"{store.root}: the store has no rows")
    names = store.level_names
    tasks = level_tasks(rows, names, cfg)
    x = torch.from_numpy(store.load(feature)).to(_device(cfg.device))
    results = [train_level(x, t, cfg) for t in tasks]
    del x
    lines = []
    for t, r in zip(tasks, results):
        if r.skipped or r.test_pred is None:
            continue
        for row_i, y, p in zip(t.test.tolist(), t.y_test.tolist(), r.test_pred.tolist()):
            row = rows[row_i]
            lines.append({
                "qid": f"{row['group']}|{t.level}", "item": row["group"], "level": t.level,
                "truth": t.classes[y], "choices": {}, "letter": None, "prediction": t.classes[p],
                "raw": None, "error": None, "scored": True,
            })
    write_jsonl(out / "results.jsonl", lines)
    summary = summarize_results(out / "results.jsonl")
    _write_outputs(out, store, feature, cfg, results, summary, plots=plots)
    return ProbeRun(feature, results, summary, out)


def _level_json(r: LevelResult) -> dict:
    d = {k: v for k, v in asdict(r).items() if k not in ("curves", "test_pred")}
    for k in ("train_acc", "val_acc", "test_acc"):
        if d[k] is not None:
            d[k] = round(d[k], 4)
    return d


def _write_outputs(out: Path, store: FeatureStore, feature: str, cfg: ProbeConfig, results: list[LevelResult],
                   summary: Summary, *, plots: bool) -> None:
    scored = [r.level for r in results if not r.skipped]
    doc = {
        "feature": feature,
        "store": str(store.root),
        "model": store.manifest.get("settings", {}).get("model"),
        "config": cfg.model_dump(),
        "selection": SELECT_NOTES[cfg.select],
        "scored_levels": scored,
        "levels": {str(r.level): _level_json(r) for r in results},
        "summary": summary.to_json(),
    }
    (out / "probe.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    cols = ["level", "name", "n_classes", "n_train", "n_val", "n_test", "test_unseen", "epoch",
            "train_acc", "val_acc", "test_acc", "skipped"]
    with (out / "levels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            d = _level_json(r)
            w.writerow([d[c] if d[c] is not None else "" for c in cols])
        w.writerow(["hca", "", "", "", "", summary.n_items, "", "", "", "", round(summary.hca, 4), ""])
    with (out / "curves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["level", "epoch", "train_loss", "train_acc", "val_acc", "test_acc"])
        for r in results:
            c = r.curves
            for e in range(len(c.get("train_loss", []))):
                w.writerow([r.level, e] + [f"{c[k][e]:.6g}" for k in ("train_loss", "train_acc", "val_acc", "test_acc")])
    if plots:
        plot_curves(results, out / "curves.png", title=feature)


def plot_curves(results: list[LevelResult], path: Path, *, title: str = "") -> bool:
    """Training curves (train / val / test accuracy per epoch), one panel per level. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in results if r.curves]
    if not done:
        return False
    fig, axes = plt.subplots(1, len(done), figsize=(4 * len(done), 3.2), squeeze=False)
    for ax, r in zip(axes[0], done):
        for s in ("train", "val", "test"):
            ys = r.curves[f"{s}_acc"]
            if ys and ys[0] == ys[0]:
                ax.plot(ys, label=s)
        if r.epoch is not None:
            ax.axvline(r.epoch, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{r.name} ({r.n_classes} classes)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_sweep(rows: list[dict], path: Path) -> bool:
    """HCA and per-level accuracy against the feature (e.g. layer by layer)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(rows) + 2), 3.5))
    xs = range(len(rows))
    ax.plot(xs, [r["hca"] for r in rows], marker="o", label="probe HCA", lw=2)
    levels = sorted({k for r in rows for k in r["per_level"]}, key=int)
    for lv in levels:
        ax.plot(xs, [r["per_level"].get(lv, float("nan")) for r in rows], label=f"level {lv}", lw=1)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["feature"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
