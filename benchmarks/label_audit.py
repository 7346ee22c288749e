"""The label audit on planted label errors: how many does it find (recall), and how many of its
suspects are planted (precision)?

Copies Fashion-MNIST's training set with 3% of its labels flipped, half to a uniformly drawn other
class and half between look-alike classes (T-shirt/top <-> Shirt, Pullover <-> Coat, a quarter of them
each way), writes the copy as an IDX dataset in the output folder, audits it as any custom dataset is
audited (`fashionlab audit --data-dir COPY --class-names ...`: K-fold cross-validation with a recipe,
then confident learning), and prints recall and precision on the planted flips, overall and per kind
of flip, with the audit's time. The data's own label errors count against precision, so it is a lower
bound. Finished folds in the output folder are reused: a second run only recounts.

    PYTHONPATH=src python benchmarks/label_audit.py [--recipe fast-full] [--epochs N] [--folds 5] [--rate 0.03] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table  # noqa: E402
from fashionlab import api, data as data_mod  # noqa: E402

LOOK_ALIKE_PAIRS = (("T-shirt/top", "Shirt"), ("Pullover", "Coat"))


def plant_flips(labels: np.ndarray, class_names: list[str], rate: float, seed: int) -> tuple[np.ndarray, dict]:
    """A copy of labels with round(rate * N) flipped, and the flipped indices by kind: half "uniform" (any
    image, a new label drawn uniformly from the other classes), half "look-alike" (images of a pair's
    classes, relabelled as the other class of the pair; equal numbers each way)."""
    rng = np.random.default_rng(seed)
    n_flips = int(round(rate * len(labels)))
    n_pair = n_flips // 2
    names = {n: i for i, n in enumerate(class_names)}
    new = labels.copy()
    pair_idx: list[np.ndarray] = []
    directions = [(names[a], names[b]) for a, b in LOOK_ALIKE_PAIRS] + [(names[b], names[a]) for a, b in LOOK_ALIKE_PAIRS]
    for d, (src, dst) in enumerate(directions):
        k = n_pair // len(directions) + (d < n_pair % len(directions))
        chosen = rng.choice(np.flatnonzero(labels == src), size=k, replace=False)
        new[chosen] = dst
        pair_idx.append(chosen)
    pair = np.sort(np.concatenate(pair_idx))
    free = np.setdiff1d(np.arange(len(labels)), pair)
    uniform = np.sort(rng.choice(free, size=n_flips - n_pair, replace=False))
    shift = rng.integers(1, len(class_names), size=len(uniform))  # never the label it had
    new[uniform] = (labels[uniform] + shift) % len(class_names)
    return new, {"uniform": uniform, "look-alike": pair}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="fast-full")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, help="override the recipe's epochs (better probabilities, longer audit)")
    p.add_argument("--rate", type=float, default=0.03, help="share of training labels flipped (default 0.03)")
    p.add_argument("--seed", type=int, default=0, help="seed of the flips (the audit uses the recipe's seed)")
    p.add_argument("--out", default="runs/bench-label-audit", help="the flipped copy and the audit go here")
    p.add_argument("--data-dir", help="where Fashion-MNIST is (default: found as usual)")
    args = p.parse_args(argv)
    out = Path(args.out)

    ds = api.load_data(args.data_dir)
    flipped, planted = plant_flips(ds.train_labels, ds.class_names, args.rate, args.seed)
    copy = data_mod.Dataset(ds.train_images, flipped, ds.test_images, ds.test_labels, list(ds.class_names),
                            "", "")
    data_mod.write_idx_folder(out / "data", copy)
    started = time.perf_counter()
    result = api.audit(args.recipe, out=out / "audit", folds=args.folds, data_dir=out / "data",
                       class_names=ds.class_names, log=lambda m: print(m, file=sys.stderr, flush=True),
                       epochs=args.epochs)
    seconds = time.perf_counter() - started

    suspects = {row["index"] for row in result.suspects if row["split"] == "train"}
    every = np.concatenate(list(planted.values()))
    rows = []
    for kind, idx in [*planted.items(), ("all", every)]:
        found = len(suspects & set(idx.tolist()))
        rows.append([kind, f"{len(idx):,}", f"{found:,}", f"{found / len(idx):.3f}"])
    hits = len(suspects & set(every.tolist()))
    s = result.summary
    print(table(["planted flips", "planted", "found", "recall"], rows,
                f"Label audit on planted flips: {args.rate:.0%} of {len(flipped):,} training labels, recipe "
                f"{args.recipe}{f' at {args.epochs} epochs' if args.epochs else ''}, {args.folds} folds"))
    print(f"\nsuspects {len(suspects):,}, of which planted {hits:,}: precision {hits / max(len(suspects), 1):.3f} "
          f"(a lower bound: the data's own label errors count against it); recall {hits / len(every):.3f}")
    print(f"out-of-sample accuracy on the flipped labels {s['out_of_sample_accuracy']['train']:.4f}; "
          f"{s['folds_trained']} of {args.folds} folds trained in this call")
    fold_seconds = [run.metrics["train_seconds"] + run.metrics.get("warmup_seconds", 0.0) for run in result.folds]
    print(f"audit time {seconds:,.0f} s in this call (folds trained or resumed now, and predictions); the folds' "
          f"training took {sum(fold_seconds):,.0f} s in all ({', '.join(f'{t:.0f}' for t in fold_seconds)} s)")
    print(f"machine: {machine()}")
    print(f"page: {result.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
