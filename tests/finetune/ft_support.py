"""Constants and helpers shared by the finetune tests (imported as a plain module: the test folders are
not packages)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CUB = REPO / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"
N_ITEMS = 6



def short_run(model_dir: Path, sft: Path, out: Path, **kw):
    """A few optimizer steps with a large learning rate: enough to move a random model visibly."""
    from finetune.train import TrainConfig, train

    cfg = {"model": str(model_dir), "data": [str(sft)], "out": str(out), "global_batch": 6, "per_device_batch": 6,
           "learning_rate": 5e-3, "max_steps": 6, "warmup_ratio": 0.0, "logging_steps": 1, "save_steps": 100,
           "dtype": "fp32", "limit": 12}
    cfg.update(kw)
    return train(TrainConfig(**cfg), quiet=True)
