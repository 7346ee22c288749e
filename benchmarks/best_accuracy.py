"""Test accuracy of the best recipe over several seeds: mean, spread, training time.

    PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 3 [--set epochs=8] [--out runs/best]
    PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 3 --threads 2 \
        --json benchmarks/results/best-accuracy-<kind>.json      # a row of the per-CPU `best` table

The recipe trains a fixed number of epochs on all 60,000 training images and is scored once on the
test set at the end (nothing is selected on the test set). The per-epoch test accuracy printed on
stderr is for watching progress only (scored with flips alone, whatever the recipe's test-time
augmentation); the last epoch's is reported beside each run's score, to show what the moves add.

The budget of `best` is stated in plain epochs: one epoch of the plain reference (time_to_accuracy.py's
`cnn`, fp32 Adam, batch 128) timed in the same run, before each seed's run and once after the last
(--reference-epochs 0 skips it), so that load from other processes hits both alike. `cpu_records.py`
turns the --json files of such runs into the per-CPU `best` table of the README and docs/records.md.
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
from common import command_line, hardware, parse_overrides  # noqa: E402
from flops import forward_flops  # noqa: E402
from time_to_accuracy import reference_config  # noqa: E402

from fashionlab import atomic, data, evaluate, models  # noqa: E402
from fashionlab.config import make_config  # noqa: E402
from fashionlab.run import train_run  # noqa: E402
from fashionlab.training import Callback  # noqa: E402


class Progress(Callback):
    """Test accuracy after the last epoch and every `every` epochs (0: the last alone), for watching a
    long run (not the reported score). Outside the timed part of an epoch; it changes nothing of the run."""

    def __init__(self, test_x, test_y, seed: int, every: int = 0):
        self.test_x, self.test_y, self.seed, self.every = test_x, test_y, seed, every
        self.accuracy: float | None = None  # after the last epoch: the score with flips alone, no moves

    def on_epoch_end(self, trainer, row) -> None:
        epoch, epochs = row["epoch"], trainer.cfg.epochs
        scored = epoch == epochs or (self.every and epoch % self.every == 0)
        test = f"test {self._score(trainer):.4f} " if scored else ""
        print(f"    seed {self.seed} epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f} {test}"
              f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)

    def _score(self, trainer) -> float:
        # Flips alone: the recipe's 1- and 2-pixel moves would make this 9x dearer, about an epoch of
        # training each time for `best`. The reported score uses the full setting.
        cfg = trainer.cfg
        logits = evaluate.predict_logits(trainer.eval_model(), self.test_x, trainer.runtime, cfg.eval_batch_size,
                                         cfg.tta_flip)
        self.accuracy = float((logits.argmax(1) == self.test_y).float().mean())
        return self.accuracy


def plain_epoch(ds: data.Dataset, epochs: int, overrides: dict, seed: int) -> float:
    """Seconds of one plain reference epoch (training wall-clock, the mean over `epochs`), at the runs'
    thread count and on their training images: a run on a subset (a quick check) is timed against a
    plain epoch of that subset, as time_to_accuracy.py's --subset does."""
    cfg = reference_config(epochs, threads=overrides["threads"], seed=seed, subset=overrides.get("subset"))
    with tempfile.TemporaryDirectory() as tmp:
        m = train_run(cfg, Path(tmp) / "run", dataset=ds, quiet=True, calibrate=False).metrics
    print(f"  plain reference: {m['train_seconds'] / epochs:.1f} s an epoch", flush=True)
    return m["train_seconds"] / epochs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="best")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a recipe setting, e.g. --set epochs=8")
    ap.add_argument("--out", help="keep the run folders under this folder (default: discard)")
    ap.add_argument("--reference-epochs", type=int, default=1,
                    help="epochs of the plain reference timed before each seed's run and after the last (0: none)")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    ap.add_argument("--append", action="store_true",
                    help="add these seeds to those already in the --json file (same recipe, settings and CPU)")
    ap.add_argument("--watch-every", type=int, default=0, metavar="N",
                    help="also score the test set with flips alone every N epochs, to watch the run (0: after "
                         "the last epoch only; for `best` each costs about a fifth of an epoch)")
    args = ap.parse_args(argv)
    if args.append and not args.json:
        ap.error("--append adds to the --json file: name it")
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

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    earlier = earlier_runs(Path(args.json), args.recipe, cfg0, overrides, hw, seeds) if args.append else None
    results, plain = [], []
    keep = Path(args.out) if args.out else None
    for seed in seeds:
        if args.reference_epochs:
            plain.append(plain_epoch(ds, args.reference_epochs, overrides, seed))
        cfg = make_config(args.recipe, seed=seed, **overrides)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = (keep / f"seed{seed}") if keep else Path(tmp) / "run"
            progress = Progress(test_x, test_y, seed, args.watch_every)
            m = train_run(cfg, run_dir, dataset=ds, quiet=True, callbacks=[progress],
                          calibrate=keep is not None).metrics  # a kept run is a whole run
        results.append({"seed": seed, "test_accuracy": m["test_accuracy"],
                        "flips_only_accuracy": round(progress.accuracy, 4), "train_seconds": m["train_seconds"],
                        "wall_seconds": time.perf_counter() - t0})
        print(f"  seed {seed}: test accuracy {m['test_accuracy']:.4f} (flips only {progress.accuracy:.4f}), "
              f"{m['train_seconds']:.0f} s training", flush=True)
        if args.json:  # after each seed, so that a long run stopped midway keeps the seeds it finished
            write_json(Path(args.json), args, argv, hw, cfg0, overrides, plain, results, earlier)

    if args.reference_epochs:
        plain.append(plain_epoch(ds, args.reference_epochs, overrides, seeds[-1] + 1))
    accs = [r["test_accuracy"] for r in results]
    secs = [r["train_seconds"] for r in results]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    load_end = hardware()["load_average"]
    print(f"\n# {args.recipe}: test accuracy {statistics.mean(accs) * 100:.2f}% ± {sd * 100:.2f} "
          f"[{min(accs) * 100:.2f}-{max(accs) * 100:.2f}] over {len(accs)} seed(s); "
          f"{statistics.mean(secs):.0f} s training per run; load average at end {load_end}")
    if plain:
        unit = statistics.mean(plain)
        print(f"# {statistics.mean(secs) / unit:.1f} plain epochs per run ({min(secs) / unit:.1f} to "
              f"{max(secs) / unit:.1f}) of the {unit:.1f} s measured between the runs ({min(plain):.1f} to "
              f"{max(plain):.1f} s)")
    if args.json:
        write_json(Path(args.json), args, argv, hw, cfg0, overrides, plain, results, earlier)
    return 0


# the settings a recipe resolves per CPU; files written before one was saved lack it
RESOLVED = ("model", "epochs", "hard_fraction", "resize_from", "augment")


def resolved(cfg) -> dict:
    """The recipe's settings as they resolved on this CPU, as the JSON file holds them."""
    return {k: getattr(cfg, k) for k in RESOLVED}


def described(recipe: str, settings: dict, overrides: dict, hw: dict) -> dict:
    """What makes two files' runs one set: the recipe, its settings as they resolved, its overrides and
    the CPU."""
    return {"recipe": recipe, **settings, "overrides": overrides, "cpu": hw["cpu"], "cpu_kind": hw["cpu_kind"],
            "threads": hw["threads"]}


def earlier_runs(path: Path, recipe: str, cfg0, overrides: dict, hw: dict, seeds: range) -> dict:
    """The --json file's runs, to append to: the same recipe, settings and CPU, none of these seeds."""
    try:
        saved = json.loads(path.read_text())
        theirs = described(saved["recipe"], {k: saved.get(k, 0) for k in RESOLVED}, saved["overrides"],
                           saved["hardware"])
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: no earlier results to append to ({e})") from None
    ours = described(recipe, resolved(cfg0), overrides, hw)
    differ = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if differ:
        raise SystemExit(f"{path}: its runs differ from these in {differ} (theirs, these): write another file")
    again = sorted({r["seed"] for r in saved["results"]} & set(seeds))
    if again:
        raise SystemExit(f"{path}: already holds seed(s) {again}")
    return saved


def write_json(path: Path, args, argv, hw: dict, cfg0, overrides: dict, plain: list[float], results: list[dict],
               earlier: dict | None = None):
    """The runs so far (after those of the file appended to), with the load average now."""
    done = [str(r["seed"]) for r in results]  # each command names the seeds it ran
    command = command_line("best_accuracy.py", argv) + (
        f" ({'seeds' if len(done) > 1 else 'seed'} {', '.join(done)})" if done else "")
    if earlier:
        command = f"{earlier['command']}, then {command}"
        plain, results = earlier["plain_epoch_seconds"] + plain, earlier["results"] + results
    atomic.write_text(path, json.dumps(
        {"hardware": hw, "recipe": args.recipe, **resolved(cfg0), "overrides": overrides,
         "load_average_end": hardware()["load_average"], "command": command,
         "plain_epoch_seconds": plain, "results": results}, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
