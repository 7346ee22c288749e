"""Where a whole training run's time goes: torch.profiler over every epoch, by kind of operation.

    PYTHONPATH=src python benchmarks/profile_run.py fast                # the recipe, seed 0, 2 threads
    PYTHONPATH=src python benchmarks/profile_run.py fast-full --threads 1
    PYTHONPATH=src python benchmarks/profile_run.py fast --ops 12   # and the 12 costliest operations
    PYTHONPATH=src python benchmarks/profile_run.py fast --set model='"fast_lean"'

The operations' own CPU time (self time) summed into convolution backward and forward, max-pool,
BatchNorm and the rest, beside the run's training seconds (the profiler's own overhead included, so
one run profiled takes a little longer than unprofiled). The before-and-after tables of
docs/records.md are two recipes profiled the same hour; with ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 the kernels are held to AVX2 and training runs in fp32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, parse_overrides  # noqa: E402

from fashionlab import data  # noqa: E402
from fashionlab.config import make_config  # noqa: E402
from fashionlab.run import train_run  # noqa: E402
from fashionlab.training import Callback  # noqa: E402

KINDS = {  # operation name -> kind; anything else is "the rest"
    "aten::convolution_backward": "convolution backward",
    "aten::mkldnn_convolution": "convolution forward",
    "aten::_convolution": "convolution forward",
    "aten::convolution": "convolution forward",
    "aten::conv2d": "convolution forward",
}


def kind_of(name: str) -> str:
    if name in KINDS:
        return KINDS[name]
    if "max_pool" in name:
        return "max-pool"
    return "BatchNorm" if "batch_norm" in name else "the rest"


class WholeRun(Callback):
    """Profiles from the first timed step to the end of the last epoch."""

    def __init__(self):
        self.profiler, self.seconds = profile(activities=[ProfilerActivity.CPU]), 0.0

    def on_train_start(self, trainer) -> None:
        self.profiler.__enter__()

    def on_epoch_end(self, trainer, row) -> None:
        self.seconds += row["seconds"]
        if row["epoch"] == trainer.cfg.epochs:
            self.profiler.__exit__(None, None, None)

    def top(self, n: int) -> list:
        """The n operations of most own (self) CPU time."""
        return sorted(self.profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)[:n]

    def table(self) -> dict[str, float]:
        kinds = dict.fromkeys(["convolution backward", "convolution forward", "max-pool", "BatchNorm", "the rest"], 0.0)
        for event in self.profiler.key_averages():
            kinds[kind_of(event.key)] += event.self_cpu_time_total / 1e6
        return kinds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", type=int, default=0, metavar="N", help="also list the N operations of most own time")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a recipe setting")
    args = ap.parse_args(argv)
    cfg = make_config(args.recipe, seed=args.seed, val_split=0.0, threads=args.threads, **parse_overrides(args.set))
    prof = WholeRun()
    with tempfile.TemporaryDirectory() as tmp:
        train_run(cfg, Path(tmp) / "run", dataset=data.load(data.FASHION_MNIST), quiet=True, callbacks=[prof],
                  calibrate=False)
    kinds = prof.table()
    total = sum(kinds.values())
    print(f"# {machine()}; recipe {args.recipe} (model {cfg.model}), seed {args.seed}, {args.threads} threads, "
          f"{cfg.epochs} epochs: {prof.seconds:.2f} s of training")
    for kind, seconds in kinds.items():
        print(f"{kind:22s} {seconds:6.2f} s ({100 * seconds / total:.0f}%)")
    for event in prof.top(args.ops):
        print(f"  {event.key:40s} {event.self_cpu_time_total / 1e6:6.2f} s in {event.count:,} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
