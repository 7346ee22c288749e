"""Seconds per training epoch for every registered model at fp32 and at bf16 (autocast, with
channels_last for conv nets), measured through the real training loop on real data.

Each measurement trains 2 epochs on a stratified subset and takes the second epoch's rate (the
first includes one-off kernel set-up), then states it per epoch of 51,000 images (the
dense-vs-conv split). Evaluation time is excluded, as in every run's train_seconds.

    python benchmarks/epoch_time.py [--models cnn,mlp] [--subset 12800] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

from fashionlab import data, models  # noqa: E402
from fashionlab.config import make_config  # noqa: E402
from fashionlab.run import train_run  # noqa: E402
from fashionlab.device import cpu_has_bf16  # noqa: E402

EPOCH_IMAGES = 51_000
BATCH = {"cnn_dropout": 300, "cnn_small": 256, "lstm": 256}  # each model's reference recipe batch size


def seconds_per_epoch(ds, model: str, precision: str, subset: int, batch: int) -> float:
    cfg = make_config(model=model, epochs=2, subset=subset, batch_size=batch, val_split=0.0,
                            precision=precision, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        history = train_run(cfg, Path(tmp) / "run", dataset=ds, quiet=True, calibrate=False).history
    return EPOCH_IMAGES / history[-1]["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models.MODELS))
    ap.add_argument("--subset", type=int, default=12800)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    ds = data.load(offline=True)
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    rows = []
    for name in args.models.split(","):
        batch = BATCH.get(name, 128)
        result = {}
        for p in precisions:
            runs = [seconds_per_epoch(ds, name, p, args.subset, batch) for _ in range(args.repeats)]
            result[p] = runs
            print(f"  {name} {p}: " + ", ".join(f"{r:.2f}" for r in runs) + " s/epoch", file=sys.stderr, flush=True)
        fmt = lambda v: f"{statistics.median(v):.2f}" + (f" ({min(v):.2f}..{max(v):.2f})" if len(v) > 1 else "")
        row = [name, batch, f"{models.count_params(models.build_model(name)):,}", fmt(result["fp32"])]
        if "bf16" in result:
            row += [fmt(result["bf16"]), f"{statistics.median(result['fp32']) / statistics.median(result['bf16']):.2f}x"]
        rows.append(row)
    print(f"machine: {machine()}; subset {args.subset} images, 2nd epoch rate, {args.repeats} repeat(s); "
          f"seconds per {EPOCH_IMAGES:,}-image epoch")
    headers = ["model", "batch", "params", "fp32 s/epoch", "bf16 s/epoch", "speed-up"][: len(rows[0])]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
