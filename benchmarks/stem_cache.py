"""What the frozen stem cache saves: the fast recipe trained with and without it, in the same run.

    PYTHONPATH=src python benchmarks/stem_cache.py [--epochs 3] [--repeats 2] [--threads N]

Each repeat trains the recipe once with the cache and once without (alternating which goes first,
so a slow spell of a shared machine hits both alike) on all 60,000 training images, and prints the
training seconds of the first epoch (which fills the cache) and of the later ones (which read it),
wall-clock and CPU. The test accuracy of both runs is printed too: they should agree to rounding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, parse_overrides, table  # noqa: E402
from time_to_accuracy import CPU, WALL, run_one  # noqa: E402

from fashionlab import data  # noqa: E402
from fashionlab.config import make_config  # noqa: E402


def one_run(ds, cached: bool, epochs: int, overrides: dict) -> dict:
    """Per-epoch training seconds (wall-clock and CPU) and the final test accuracy, from
    time_to_accuracy's cumulative curve (the per-epoch test scoring is outside both clocks)."""
    cfg = make_config("fast", epochs=epochs, cache_stem=cached, **overrides)
    curve = run_one(cfg, ds, targets=(), max_seconds=float("inf"))["curve"]
    per_epoch = lambda clock: [b[clock] - a[clock] for a, b in zip([(0.0, 0.0, 0.0)] + curve, curve)]
    return {"wall": per_epoch(WALL), "cpu": per_epoch(CPU), "accuracy": curve[-1][2]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a setting of the fast recipe, e.g. --set batch_size=128")
    args = ap.parse_args()
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2: the cache is read from the second epoch on")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    ds = data.load(data.FASHION_MNIST)
    runs = {True: [], False: []}
    for rep in range(args.repeats):
        for cached in ((True, False) if rep % 2 == 0 else (False, True)):
            r = one_run(ds, cached, args.epochs, overrides)
            runs[cached].append(r)
            print(f"  repeat {rep + 1}, cache {'on ' if cached else 'off'}: epochs "
                  + ", ".join(f"{s:.2f}" for s in r["wall"]) + f" s; test accuracy {r['accuracy']:.4f}",
                  file=sys.stderr, flush=True)

    def mean(values):
        return f"{statistics.mean(values):.2f}"

    rows = []
    for cached in (False, True):
        rs = runs[cached]
        rows.append(["on" if cached else "off (baseline)",
                     mean([r["wall"][0] for r in rs]), mean([w for r in rs for w in r["wall"][1:]]),
                     mean([r["cpu"][0] for r in rs]), mean([c for r in rs for c in r["cpu"][1:]]),
                     mean([sum(r["wall"]) for r in rs]),
                     ", ".join(f"{r['accuracy'] * 100:.2f}%" for r in rs)])
    off, on = (statistics.mean(sum(r["wall"]) for r in runs[c]) for c in (False, True))
    print(f"# {machine()}; fast recipe, {args.epochs} epochs, {args.repeats} repeat(s) each, "
          f"overrides {overrides or 'none'}")
    print(table(["stem cache", "epoch 1 s", "later epochs s", "epoch 1 CPU s", "later CPU s",
                 f"{args.epochs} epochs s", "test accuracy"], rows))
    print(f"\n# the cache saves {(1 - on / off) * 100:.1f}% of the training time over {args.epochs} epochs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
