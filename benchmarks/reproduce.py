"""Train (or reuse) every reference recipe over several seeds, then write the results tables into
README.md and docs/records.md (between their `<!-- reproduce:NAME:begin/end -->` markers).

    PYTHONPATH=src python benchmarks/reproduce.py [--seeds 3] [--runs runs/reproduce] [--recipes fast,best]
    PYTHONPATH=src python benchmarks/reproduce.py --no-train          # only render what has finished

Each run is `<runs>/<recipe>/<model>-s<seed>`, seeds the recipe's seed and the next ones, trained with
the recipe's settings and nothing else: a finished run is reused and an interrupted one resumed, so
the command can be stopped and started again, and runs trained by another process into the same
folder are reused. --recipes chooses what to train; the tables always show every recipe, those
without finished runs as "not run" with the command that runs them. The full set (3 seeds of 8
recipe-model pairs, `best` among them) takes hours on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware  # noqa: E402

from fashionlab import load_data, tables  # noqa: E402
from fashionlab.atomic import check_writable  # noqa: E402
from fashionlab.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = "runs/reproduce"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per recipe and model (default 3)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"the runs' folder (default {DEFAULT_RUNS})")
    ap.add_argument("--recipes", help="comma-separated recipes to train (default: every reference recipe)")
    ap.add_argument("--no-train", action="store_true", help="train nothing; render the runs that have finished")
    ap.add_argument("--root", default=str(ROOT), help="the folder holding README.md and docs/ (default: this checkout)")
    args = ap.parse_args(argv)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    try:
        chosen = tables.check_request(args.recipes.split(",") if args.recipes else tables.BLOCKS["recipes"],
                                      args.seeds)
        tables.check_targets(args.root)  # before hours of training: the tables have somewhere to go
        if not args.no_train:
            check_writable(args.runs, folder=True)
            tables.train_all(args.runs, chosen, args.seeds, functools.cache(load_data), log)
        rows = tables.collect(args.runs, tables.BLOCKS["recipes"], args.seeds)
        hw = hardware()
        shown_runs = None if args.runs == DEFAULT_RUNS else args.runs
        bodies = {name: tables.render_block(name, rows, args.seeds, f"{hw['cpu']} ({hw['cores']} cores)",
                                            datetime.date.today().isoformat(), shown_runs) for name in tables.BLOCKS}
        changed = tables.write_blocks(args.root, bodies)
    except UserError as e:
        print(f"reproduce.py: error: {e}", file=sys.stderr)
        return 2
    print(bodies["recipes"])
    log(f"rewrote {', '.join(str(p) for p in changed)}" if changed else "the tables were up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
