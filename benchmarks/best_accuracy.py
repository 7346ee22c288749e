"""Test accuracy of the best recipe over several seeds: mean, spread, training time.

    PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 3 [--set epochs=8] [--out runs/best]

The recipe trains a fixed number of epochs on all 60,000 training images and is scored once on the
test set at the end (nothing is selected on the test set). The per-epoch test accuracy printed on
stderr is for watching progress only (scored with flips alone, whatever the recipe's test-time
augmentation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, parse_overrides  # noqa: E402
from flops import forward_flops  # noqa: E402

from fashionlab import data, evaluate, models  # noqa: E402
from fashionlab.config import make_config  # noqa: E402
from fashionlab.run import train_run  # noqa: E402
from fashionlab.training import Callback  # noqa: E402


class Progress(Callback):
    """Test accuracy after each epoch, for watching a long run (not the reported score)."""

    def __init__(self, test_x, test_y, seed: int):
        self.test_x, self.test_y, self.seed = test_x, test_y, seed

    def on_epoch_end(self, trainer, row) -> None:
        cfg = trainer.cfg
        # Flips alone: the recipe's 1- and 2-pixel moves would make this 9x dearer, about an epoch of
        # training each time for `best`. The reported score uses the full setting.
        logits = evaluate.predict_logits(trainer.eval_model(), self.test_x, trainer.runtime, cfg.eval_batch_size,
                                         cfg.tta_flip)
        acc = float((logits.argmax(1) == self.test_y).float().mean())
        print(f"    seed {self.seed} epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
              f"test {acc:.4f} ({row['seconds']:.0f} s)", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="best")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe setting, e.g. --set epochs=8")
    ap.add_argument("--out", help="keep the run folders under this folder (default: discard)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"threads": torch.get_num_threads(), **parse_overrides(args.set)}  # one thread count for every run

    ds = data.load(data.FASHION_MNIST)
    test_x, test_y = torch.from_numpy(ds.test_images), torch.from_numpy(ds.test_labels)
    hw = hardware()
    cfg0 = make_config(args.recipe, **overrides)
    flops = forward_flops(models.build_model(cfg0.model, **cfg0.model_args))
    print(f"# {hw['cpu']} | {hw['cores']} cores | torch {hw['torch']} | {hw['threads']} threads | "
          f"load average {hw['load_average']}")
    print(f"# recipe {args.recipe}: model {cfg0.model}, {flops / 1e6:.1f} MFLOP forward per image, "
          f"{cfg0.epochs} epochs, overrides {overrides or 'none'}")

    results = []
    keep = Path(args.out) if args.out else None
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        cfg = make_config(args.recipe, seed=seed, **overrides)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = (keep / f"seed{seed}") if keep else Path(tmp) / "run"
            m = train_run(cfg, run_dir, dataset=ds, quiet=True, callbacks=[Progress(test_x, test_y, seed)],
                          calibrate=keep is not None).metrics  # a kept run is a whole run
        results.append({"seed": seed, "test_accuracy": m["test_accuracy"], "train_seconds": m["train_seconds"],
                        "wall_seconds": time.perf_counter() - t0})
        print(f"  seed {seed}: test accuracy {m['test_accuracy']:.4f}, {m['train_seconds']:.0f} s training",
              flush=True)

    accs = [r["test_accuracy"] for r in results]
    secs = [r["train_seconds"] for r in results]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\n# {args.recipe}: test accuracy {statistics.mean(accs) * 100:.2f}% ± {sd * 100:.2f} "
          f"[{min(accs) * 100:.2f}-{max(accs) * 100:.2f}] over {len(accs)} seed(s); "
          f"{statistics.mean(secs):.0f} s training per run; load average at end {hardware()['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw, "recipe": args.recipe, "overrides": overrides,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
