"""Training throughput of `harness finetune train` (LoRA r 64 on every language-model Linear, the
Trainer, assistant-only labels) on tiny random VLMs: tokens/s on this machine.

Builds the tiny LLaVA and Qwen2-VL (tests.support.tiny_models), draws stand-in images for the first CUB
items, renders their image and text-only SFT conversations (finetune.data), and times `train()` for
each configuration. The first optimizer step (allocations, lazy init) is left out of the steady-state
figures. Reports input tokens/s (non-padding, image tokens included), assistant (labelled) tokens/s,
seconds per optimizer step and examples/s. Not a test: a measurement.

    python bench/finetune_throughput.py [--families llava,qwen2vl] [--modes image,text] [--steps 8]
        [--batch 8] [--threads 1] [--checkpointing on,off] [--json]

The default run takes about a minute on the 2-core dev machine.

On a shared CPU, OpenMP threads that spin against other processes can make more threads slower:
compare `--threads 1,2` and look at the load average printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CUB = ROOT / "data" / "hierarchy" / "CUB200_with_similar_choice.jsonl"
AUTHORS_PREFIX = "/projectnb/ivc-ml/yuwentan/dataset"


def _timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time and tokens seen at the end of every optimizer step."""

        def __init__(self):
            self.marks: list[tuple[float, int]] = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks = [(time.perf_counter(), int(state.num_input_tokens_seen or 0))]

        def on_step_end(self, args, state, control, **kw):
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen or 0)))

    return StepTimer()


def _labelled_per_example(sft: Path, model_dir: Path, n: int) -> float:
    from finetune.data import read_conversations
    from finetune.encode import Encoder
    from finetune.model import load_processor

    enc = Encoder(load_processor(str(model_dir)))
    convs = read_conversations(sft)[:n]
    return sum(int((enc.encode(c)["labels"] != -100).sum()) for c in convs) / len(convs)


def measure(model_dir: Path, sft: Path, out: Path, *, steps: int, batch: int, threads: int, checkpointing: bool) -> dict:
    import torch

    from finetune.train import TrainConfig, train

    torch.set_num_threads(threads)
    timer = _timer()
    cfg = TrainConfig(model=str(model_dir), data=[str(sft)], out=str(out), global_batch=batch, per_device_batch=batch,
                      max_steps=steps, warmup_ratio=0.03, logging_steps=steps, save_steps=10_000, dtype="fp32",
                      gradient_checkpointing=checkpointing)
    r = train(cfg, callbacks=[timer], quiet=True)
    (t0, _), (t1, k1), (tn, kn) = timer.marks[0], timer.marks[1], timer.marks[-1]
    steady_s, steady_tok = tn - t1, kn - k1
    n_steady = len(timer.marks) - 2
    labelled = _labelled_per_example(sft, model_dir, batch * 4)
    return {
        "steps": r.steps, "batch": batch, "threads": threads, "checkpointing": checkpointing,
        "tokens_per_example": round(kn / (r.steps * batch), 1), "labelled_per_example": round(labelled, 2),
        "first_step_s": round(t1 - t0, 3),
        "s_per_step": round(steady_s / max(n_steady, 1), 3),
        "tokens_per_s": round(steady_tok / steady_s, 1) if steady_s > 0 else None,
        "labelled_tokens_per_s": round(labelled * batch * n_steady / steady_s, 1) if steady_s > 0 else None,
        "examples_per_s": round(batch * n_steady / steady_s, 2) if steady_s > 0 else None,
        "trainer_tokens_per_s_all_steps": round(r.tokens_per_second, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="llava,qwen2vl")
    ap.add_argument("--modes", default="image,text")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per configuration (first one excluded)")
    ap.add_argument("--batch", type=int, default=8, help="examples per step (no accumulation)")
    ap.add_argument("--threads", default="1", help="comma list of torch thread counts, e.g. 1,2")
    ap.add_argument("--checkpointing", default="on,off", help="gradient checkpointing: on, off or both")
    ap.add_argument("--items", type=int, default=24, help="CUB items to render SFT data from")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    import transformers

    from finetune.data import DataConfig, conversations_from_items, write_jsonl
    from harness.demo import draw_images
    from harness.data.items import read_items
    from tests.support.tiny_models import build_tiny_llava, build_tiny_qwen2vl, has_torchvision

    transformers.logging.set_verbosity_error()
    load = os.getloadavg()
    header = (f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPUs, "
              f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, CUDA {torch.cuda.is_available()}")
    print(header, file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-ft-") as tmp:
        tmp = Path(tmp)
        items = tmp / "items.jsonl"
        with CUB.open("rb") as f:
            items.write_bytes(b"".join(islice(f, args.items)))
        draw_images(items, tmp / "images", args.items)
        sft = {}
        for mode in args.modes.split(","):
            convs = conversations_from_items(read_items(items, root_map=[f"{AUTHORS_PREFIX}={tmp / 'images'}"]),
                                             DataConfig(taxonomy="cub", modes=(mode,)))
            sft[mode] = tmp / f"sft_{mode}.jsonl"
            write_jsonl(sft[mode], convs)
        builders = {"llava": build_tiny_llava, "qwen2vl": build_tiny_qwen2vl}
        for fam in args.families.split(","):
            if fam == "qwen2vl" and not has_torchvision():
                print("skipping qwen2vl: torchvision is not importable", file=sys.stderr)
                continue
            model_dir = builders[fam](tmp / fam)
            for mode, path in sft.items():
                for ck in args.checkpointing.split(","):
                    for th in (int(t) for t in args.threads.split(",")):
                        out = tmp / f"run-{fam}-{mode}-{ck}-{th}"
                        row = {"family": fam, "mode": mode, **measure(model_dir, path, out, steps=args.steps,
                                                                      batch=args.batch, threads=th,
                                                                      checkpointing=ck == "on")}
                        rows.append(row)
                        print(f"  {fam:8s} {mode:5s} ckpt {ck:3s} threads {th}: {row['tokens_per_s']} tokens/s",
                              file=sys.stderr)
    if args.json:
        print(json.dumps({"env": header, "rows": rows}, indent=2))
        return 0
    print(f"# finetune training throughput (tiny random models, fp32, LoRA r 64)\n{header}\n")
    cols = ["family", "mode", "checkpointing", "threads", "batch", "tokens_per_example", "labelled_per_example",
            "first_step_s", "s_per_step", "tokens_per_s", "labelled_tokens_per_s", "examples_per_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
