"""Time to a target test accuracy: the fast recipe against the plain reference CNN, in the same run.

    PYTHONPATH=src python benchmarks/time_to_accuracy.py --seeds 3 --epochs 2 6 7
    PYTHONPATH=src python benchmarks/time_to_accuracy.py --seeds 5 --targets 0.9173 0.93 --also fast-93
    PYTHONPATH=src python benchmarks/time_to_accuracy.py --from-json runs.json   # the tables again

"Time to reach" a target is the cumulative training time (evaluation excluded) at the end of the
first epoch whose test accuracy reaches it. The test set is evaluated after every epoch through
a training callback, outside the timed part. Runs are interleaved (reference seed 0,
fast seed 0, reference seed 1, ...) so that load from other processes hits both alike. A run stops
once it has reached every target or spent --max-seconds of training. Where no run of a row reached
every target, the row also prints its whole runs (what `fashionlab train` takes, to the end of the
schedule): a target no run reaches (`--targets 0.9173 0.99`) measures whole runs for every row.

The reference is the `cnn` model trained the plain way: float32, Adam lr 1e-3, batch 128, no
augmentation. Both train on all 60,000 training images (no validation split). Its mean epoch in the
same run is the unit of the "plain epochs" table: time to a target over one plain epoch, a ratio any
machine can measure (`--reference-epochs 1` times just that epoch). `cpu_records.py` turns the
--json files of such runs into the per-CPU table of the README and docs/records.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, hardware, parse_overrides  # noqa: E402
from flops import forward_flops, host_matmul_rate  # noqa: E402

from fashionlab import data, evaluate, models  # noqa: E402
from fashionlab.config import TrainConfig, make_config  # noqa: E402
from fashionlab.run import train_run  # noqa: E402
from fashionlab.training import Callback  # noqa: E402

# 90% is a milestone the plain reference also reaches, so the two rows share a column.
DEFAULT_TARGETS = (0.90, 0.9173, 0.93, 0.94)
REFERENCE = dict(model="cnn", optimizer="adam", lr=1e-3, batch_size=128, precision="fp32", epochs=15)
PLAIN = "cnn (plain fp32 Adam)"


def reference_config(epochs: int, **settings) -> TrainConfig:
    """The plain reference for `epochs` epochs on every training image (no validation split), with
    settings such as seed, threads or subset: the unit every benchmark states its times in."""
    return make_config(**dict(REFERENCE, epochs=epochs), val_split=0.0, **settings)


WALL, CPU = 0, 1  # positions of the two clocks in a curve point (wall s, CPU s, test accuracy)


class TestCurve(Callback):
    """After each epoch (outside the timed part): test accuracy at the run's own runtime, the two
    clocks, and a stop once every target is reached or the time budget is spent."""

    def __init__(self, ds: data.Dataset, targets, max_seconds: float):
        self.test_x, self.test_y = torch.from_numpy(ds.test_images), torch.from_numpy(ds.test_labels)
        self.targets, self.max_seconds = targets, max_seconds
        self.curve: list[tuple[float, float, float]] = []
        self.elapsed = self.cpu = 0.0
        self.cpu_mark = time.process_time()

    def on_train_start(self, trainer) -> None:
        self.cpu_mark = time.process_time()  # set-up and the untimed warm-up are not training

    def on_epoch_end(self, trainer, row) -> None:
        cfg = trainer.cfg
        self.elapsed += row["seconds"]
        self.cpu += time.process_time() - self.cpu_mark  # since the last evaluation ended (or training began)
        logits = evaluate.predict_logits(trainer.eval_model(), self.test_x, trainer.runtime, cfg.eval_batch_size,
                                         cfg.tta_flip, cfg.tta_shift)
        # An exact ratio of counts: 9,173 right of 10,000 must compare equal to the target 0.9173,
        # which a float32 mean (0.91729999...) does not.
        acc = int((logits.argmax(1) == self.test_y).sum()) / len(self.test_y)
        self.curve.append((round(self.elapsed, 2), round(self.cpu, 2), acc))
        print(f"    {cfg.model} seed {cfg.seed} epoch {row['epoch']}: {self.elapsed:.1f} s ({self.cpu:.1f} CPU s), "
              f"test {acc:.4f}", file=sys.stderr, flush=True)
        self.cpu_mark = time.process_time()

    def should_stop(self, trainer, row) -> bool:
        done = bool(self.targets) and all(first_reaching(self.curve, t, WALL) is not None for t in self.targets)
        return done or min(self.elapsed, self.cpu) >= self.max_seconds  # no targets: run the whole schedule


def run_one(cfg: TrainConfig, ds: data.Dataset, targets, max_seconds: float) -> dict:
    """Train one configuration; returns the curve: per epoch, cumulative (training seconds, training
    CPU seconds, test accuracy).

    Wall-clock seconds are what the goals are stated in, but on a shared machine they grow with
    other people's load. The process CPU time of the training part (evaluation excluded) is the
    second clock: with one thread it is close to what an idle core would take.
    """
    curve = TestCurve(ds, targets, max_seconds)
    with tempfile.TemporaryDirectory() as tmp:
        train_run(cfg, Path(tmp) / "run", dataset=ds, quiet=True, callbacks=[curve], calibrate=False)
    return {"curve": curve.curve}  # everything else (times to targets, final accuracy) is read off the curve


def first_reaching(curve, target: float, clock: int) -> float | None:
    """The clock's reading at the end of the first epoch whose test accuracy reached the target."""
    return next((point[clock] for point in curve if point[2] >= target), None)


def summarise(runs: list[dict], targets, clock: int = WALL) -> list[str]:
    cells = []
    for t in targets:
        times = [x for x in (first_reaching(r["curve"], t, clock) for r in runs) if x is not None]
        frac = f"{len(times)}/{len(runs)}"
        if not times:
            cells.append(f"{'not reached':>20s} {frac:>4s}")
            continue
        mean = statistics.mean(times)
        sd = statistics.stdev(times) if len(times) > 1 else 0.0
        cells.append(f"{mean:7.1f} ± {sd:5.1f} s [{min(times):.0f}-{max(times):.0f}] {frac:>4s}")
    return cells


def plain_epoch_seconds(results: dict[str, list[dict]]) -> float | None:
    """The plain reference's mean epoch (training wall-clock seconds) in this run, if it ran."""
    epochs = [b[WALL] - a[WALL] for r in results.get(PLAIN, [])
              for a, b in zip([(0.0, 0.0, 0)] + r["curve"], r["curve"])]
    return statistics.mean(epochs) if epochs else None


def mean_sd(values: list[float], digits: int) -> str:
    """Mean ± sample standard deviation (0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def whole_run_seconds(runs: list[dict], targets) -> list[float] | None:
    """Each run's training wall-clock seconds to the end of its schedule (what `fashionlab train` would
    take), or None where a run may have stopped early: its last test accuracy reached every target."""
    if not runs or any(r["curve"][-1][2] >= max(targets) for r in runs):
        return None
    return [r["curve"][-1][WALL] for r in runs]


def in_plain_epochs(runs: list[dict], target: float, plain: float) -> list[float]:
    """Each seed's time to the target in plain epochs (the seeds that reached it)."""
    return [t / plain for t in (first_reaching(r["curve"], target, WALL) for r in runs) if t is not None]


def print_tables(results: dict[str, list[dict]], targets, load_average) -> None:
    seeds = max(len(runs) for runs in results.values())
    header = f"{'recipe':26s}" + "".join(f"{t * 100:>34.2f}%" for t in targets)
    for clock, name in ((WALL, "training wall-clock seconds"), (CPU, "training CPU seconds")):
        print(f"\n# time to test accuracy ({name}; mean ± sd [min-max] reached/seeds), "
              f"{seeds} seeds, load average at end {load_average}")
        print(header)
        for label, runs in results.items():
            print(f"{label:26s}" + "".join(f"{c:>35s}" for c in summarise(runs, targets, clock)))
    plain = plain_epoch_seconds(results)
    if plain:
        print(f"\n# time to test accuracy in plain epochs (one plain epoch: {plain:.2f} s in this run; "
              f"mean ± sd reached/seeds)")
        print(f"{'recipe':26s}" + "".join(f"{t * 100:>20.2f}%" for t in targets))
        for label, runs in results.items():
            cells = []
            for t in targets:
                ratios = in_plain_epochs(runs, t, plain)
                sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
                cells.append(f"{statistics.mean(ratios):6.2f} ± {sd:4.2f} {len(ratios)}/{len(runs)}" if ratios
                             else f"not reached {len(ratios)}/{len(runs)}")
            print(f"{label:26s}" + "".join(f"{c:>21s}" for c in cells))
    print()
    for label, runs in results.items():
        print(f"# {label} final test accuracy per seed: "
              + ", ".join(f"{r['curve'][-1][2] * 100:.2f}%" for r in runs if r["curve"]))
    for label, runs in results.items():
        whole = whole_run_seconds(runs, targets) if label != PLAIN else None
        if whole:  # the time to a target stops at the first epoch reaching it; a whole run trains on
            in_plain = f", {mean_sd([w / plain for w in whole], 2)} plain epochs" if plain else ""
            print(f"# {label}: a whole run {mean_sd(whole, 1)} s{in_plain}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fast", help="recipe to time (default: fast)")
    ap.add_argument("--epochs", type=int, nargs="+", default=None,
                    help="time the recipe at each of these schedule lengths, one row each (default: the "
                         "recipe's own). A one-cycle schedule peaks at its end, so each target has its own "
                         "best length: e.g. --epochs 4 5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from this one (more seeds for a row, later)")
    ap.add_argument("--targets", type=float, nargs="+", default=list(DEFAULT_TARGETS))
    ap.add_argument("--max-seconds", type=float, default=150.0,
                    help="stop a run once both its training wall-clock and CPU seconds exceed this")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-reference", action="store_true", help="skip the plain cnn reference")
    ap.add_argument("--reference-epochs", type=int, default=REFERENCE["epochs"],
                    help="epochs of the plain reference (1 measures the plain epoch alone)")
    ap.add_argument("--subset", type=int, default=None,
                    help="every row, the reference too, on a stratified subset of N training images (a quick check)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a setting of the timed recipe, e.g. --set epochs=6 --set lr=0.2")
    ap.add_argument("--variant", action="append", nargs="+", default=[], metavar="LABEL [KEY=JSON ...]",
                    help="one more row: the recipe with these settings changed, labelled LABEL, e.g. --variant "
                         "for-93 'model=\"fast\"' epochs=6 hard_fraction=0.3")
    ap.add_argument("--also", nargs="+", default=[], metavar="RECIPE",
                    help="more recipes, a row each, labelled by name: each as it resolves on this machine "
                         "(its rule per device and precision), with --set's overrides, e.g. --also fast-93")
    ap.add_argument("--json", help="also write all runs as JSON to this file")
    ap.add_argument("--from-json", metavar="PATH",
                    help="train nothing: print the tables again from the curves a --json run saved")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        hw = saved["hardware"]
        kind = saved.get("matmul_precision", "bf16")  # files written before it was recorded measured bf16
        wall = saved.get("matmul_flops_wall", saved.get("bf16_matmul_flops_wall", 0.0))
        print(f"# {args.from_json}: {hw['cpu']} | {hw['cores']} cores | torch {hw['torch']} | {hw['threads']} threads"
              f" | {kind} matmul {wall / 1e9:.0f} GFLOP/s wall-clock")
        print_tables(saved["results"], saved["targets"], saved.get("load_average_end", "not saved"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    # Every run at the same thread count, whatever else the machine does when it starts (training would
    # otherwise take the cores it finds free: device.training_threads).
    overrides = {"threads": torch.get_num_threads(), **parse_overrides(args.set)}
    ds = data.load(data.FASHION_MNIST)
    configs = {}
    for epochs in args.epochs or [None]:
        kw = dict(overrides, **({"epochs": epochs} if epochs else {}))
        label = f"{args.recipe} ({epochs} epochs)" if epochs else args.recipe
        configs[label] = lambda seed, kw=kw: make_config(args.recipe, seed=seed, val_split=0.0, subset=args.subset,
                                                         **kw)
    for label, *items in args.variant:
        kw = dict(overrides, **parse_overrides(items))
        configs[f"{args.recipe} {label}"] = lambda seed, kw=kw: make_config(args.recipe, seed=seed, val_split=0.0,
                                                                            subset=args.subset, **kw)
    for name in args.also:
        configs[name] = lambda seed, name=name: make_config(name, seed=seed, val_split=0.0, subset=args.subset,
                                                            **overrides)
    if not args.no_reference:
        configs = {PLAIN: lambda seed: reference_config(args.reference_epochs, threads=overrides["threads"],
                                                        seed=seed, subset=args.subset),
                   **configs}

    hw = hardware()
    kind, wall_rate, rate = host_matmul_rate()  # about a second, in the precision the CPU trains at
    print(f"# {hw['cpu']} | {hw['cores']} cores | torch {hw['torch']} | {hw['threads']} threads | "
          f"load average {hw['load_average']} | {kind} matmul {wall_rate / 1e9:.0f} GFLOP/s wall-clock, "
          f"{rate / 1e9:.0f} GFLOP per CPU second")
    print(f"# floor = 3 x forward FLOPs x 60,000 images / host {kind} matmul FLOP per CPU second (one epoch, "
          f"CPU seconds; on a GPU only a scale)")
    floors = {}  # label -> CPU seconds per epoch at the matmul rate
    nets = {}  # label -> the net it trains here: a recipe's rule per CPU picks it, and rules change
    for label, make in configs.items():
        cfg = make(0)
        nets[label] = cfg.model
        f = forward_flops(models.build_model(cfg.model, **cfg.model_args))
        floors[label] = 3 * f * 60000 / rate
        print(f"#   {label}: model {cfg.model}, {f / 1e6:.1f} MFLOP forward per image, "
              f"floor {floors[label]:.1f} CPU s per epoch")

    results: dict[str, list[dict]] = {k: [] for k in configs}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for label, make in configs.items():
            cfg = make(seed)
            t0 = time.perf_counter()
            r = run_one(cfg, ds, args.targets, args.max_seconds)
            r["seed"], r["wall"] = seed, time.perf_counter() - t0
            results[label].append(r)
            print(f"  {label} seed {seed}: {r['curve']}", flush=True)

    load_end = [round(x, 2) for x in os.getloadavg()]
    print_tables(results, args.targets, load_end)
    for label, runs in results.items():
        per_epoch = [b[CPU] - a[CPU] for r in runs for a, b in zip([(0.0, 0.0, 0)] + r["curve"], r["curve"])]
        floor = floors[label]
        if per_epoch:
            mean_epoch = statistics.mean(per_epoch)
            print(f"# {label}: {mean_epoch:.1f} CPU s per epoch measured vs {floor:.1f} s floor "
                  f"({mean_epoch / floor:.1f}x the floor)")
    if args.json:
        Path(args.json).write_text(json.dumps({"hardware": hw, "matmul_precision": kind, "matmul_flops_wall": wall_rate,
                                               "matmul_flops_per_cpu_s": rate, "targets": args.targets,
                                               "overrides": overrides, "models": nets, "load_average_end": load_end,
                                               "command": command_line("time_to_accuracy.py", argv),
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
