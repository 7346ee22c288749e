"""What keeping freed memory saves: a recipe trained with glibc's malloc as it comes and with the
memory a step frees kept for the next (device.keep_freed_memory), each in a fresh process.

    PYTHONPATH=src python benchmarks/malloc_reuse.py [--recipe fast] [--repeats 3] [--threads N]
    PYTHONPATH=src python benchmarks/malloc_reuse.py --plain    # one epoch of the plain reference
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 PYTHONPATH=src python benchmarks/malloc_reuse.py

The setting is process-wide and cannot be undone, so every run is its own process, as a
`fashionlab train` command is (FASHIONLAB_KEEP_FREED_MEMORY=0 turns it off); the two kinds alternate
so that a slow spell of a shared machine hits both alike. Each run prints its training seconds and
the page faults and system CPU seconds between its first timed step and the end of its last epoch.
Both kinds train the same seed and must reach the same accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_kind, machine, table  # noqa: E402
from time_to_accuracy import PLAIN, REFERENCE  # noqa: E402

KINDS = {"malloc as it comes": "0", "freed memory kept": "1"}


def child(recipe: str | None, seed: int, threads: int | None) -> None:
    """One training run in this process; prints its figures as one line of JSON."""
    from fashionlab import data
    from fashionlab.config import make_config
    from fashionlab.run import train_run
    from fashionlab.training import Callback

    class Counts(Callback):
        def on_train_start(self, trainer) -> None:
            self.start, self.seconds = resource.getrusage(resource.RUSAGE_SELF), 0.0

        def on_epoch_end(self, trainer, row) -> None:
            self.seconds += row["seconds"]
            if row["epoch"] == trainer.cfg.epochs:
                self.end = resource.getrusage(resource.RUSAGE_SELF)

    counts = Counts()
    settings = {} if recipe else dict(REFERENCE, epochs=1)
    cfg = make_config(recipe, seed=seed, val_split=0.0, threads=threads, **settings)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train_run(cfg, Path(tmp) / "run", dataset=data.load(data.FASHION_MNIST), quiet=True,
                            callbacks=[counts], calibrate=False).metrics
    print(json.dumps({"seconds": counts.seconds, "accuracy": metrics["test_accuracy"],
                      "faults": counts.end.ru_minflt - counts.start.ru_minflt,
                      "system": counts.end.ru_stime - counts.start.ru_stime}))


def one_run(args, keep: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--seed", str(args.seed)]
    cmd += ["--plain"] if args.plain else ["--recipe", args.recipe]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, FASHIONLAB_KEEP_FREED_MEMORY=keep)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the run with FASHIONLAB_KEEP_FREED_MEMORY={keep} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--plain", action="store_true", help=f"time one epoch of the {PLAIN} reference instead")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(None if args.plain else args.recipe, args.seed, args.threads)
        return 0
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for i in range(args.repeats):
        order = list(KINDS) if i % 2 == 0 else list(reversed(KINDS))
        for kind in order:
            runs[kind].append(one_run(args, KINDS[kind]))
    rows = []
    for kind, done in runs.items():
        figure = lambda key, fmt: fmt.format(statistics.median(r[key] for r in done)) + " (" + ", ".join(
            fmt.format(r[key]) for r in done) + ")"
        rows.append([kind, figure("seconds", "{:.2f}"), figure("faults", "{:,.0f}"), figure("system", "{:.2f}"),
                     ", ".join(f"{r['accuracy']:.4f}" for r in done)])
    what = f"{PLAIN}, 1 epoch" if args.plain else f"recipe {args.recipe}"
    title = (f"# {machine()}; {cpu_kind()}; {what}, seed {args.seed}, {args.repeats} runs each, alternating; "
             "median (each run)")
    print(table(["malloc", "training s", "page faults in training", "system CPU s in training", "test accuracy"],
                rows, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
