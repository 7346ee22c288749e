"""The per-CPU tables of the README and docs/records.md, generated from the benchmarks' JSON: `fast`
from time_to_accuracy.py's, `best` from best_accuracy.py's.

    PYTHONPATH=src python benchmarks/time_to_accuracy.py --seeds 5 --reference-epochs 1 \
        --targets 0.9173 0.93 --also fast-93 --json benchmarks/results/time-to-accuracy-<kind>.json
    PYTHONPATH=src python benchmarks/best_accuracy.py --seeds 3 --threads 2 \
        --json benchmarks/results/best-accuracy-<kind>.json
    python benchmarks/cpu_records.py              # rewrites the tables from benchmarks/results/*.json
    python benchmarks/cpu_records.py --check      # exit 1 when a table differs from what the files give

One row per file, so per CPU kind measured: the CPU's flags, one plain epoch in that same run, and
for each target the time to it of each timed row (`fast`, its variants, the `--also` recipes) in
plain epochs and seconds (mean ± sample sd over the seeds that reached it; in bold where every seed
did). The time to a target stops the clock at the end of the first epoch that reaches it; a `fast`
run trains on to the end of its schedule, so the table also gives `fast`'s whole runs (what
`fashionlab train --recipe fast` trains) and their accuracy at the end: a run stops early only once
it reaches every target, 93% included, and then its row says so instead.

The `best` table has one row per best_accuracy.py file: the net and schedule the recipe resolved to on
that CPU, the test accuracy of each seed, and each run's training time in plain epochs of the
reference timed between the runs, against the budget of 100.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashionlab import atomic  # noqa: E402
from time_to_accuracy import (PLAIN, first_reaching, in_plain_epochs, mean_sd, plain_epoch_seconds,  # noqa: E402
                              whole_run_seconds, WALL)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = (ROOT / "README.md", ROOT / "docs" / "records.md")
FAST_MARKERS = ("<!-- cpu-records:begin -->", "<!-- cpu-records:end -->")
BEST_MARKERS = ("<!-- best-records:begin -->", "<!-- best-records:end -->")
TARGETS = (0.9173, 0.93)
BUDGET = 100  # `best`'s budget, in plain epochs


def schedules(results: dict, target: float, plain: float, nets: dict[str, str]) -> str:
    """Each `fast` schedule's time to the target, in seconds and plain epochs, over the seeds that
    reached it; in bold where every seed did. Each named with the net it trained where the file says
    (a recipe's rule per CPU picks the net, so a row measured before a rule changed says which)."""
    cells = []
    for label, runs in results.items():
        ratios = in_plain_epochs(runs, target, plain)
        if label == PLAIN or not ratios:
            continue
        seconds = [t for t in (first_reaching(r["curve"], target, WALL) for r in runs) if t is not None]
        ratio = mean_sd(ratios, 2)
        every = len(ratios) == len(runs)
        net = f" (`{nets[label]}`)" if label in nets else ""
        cells.append(f"{label.removeprefix('fast ').strip('()')}{net}: " + (f"**{ratio}**" if every else ratio)
                     + f" ({mean_sd(seconds, 1)} s{'' if every else f', {len(ratios)}/{len(runs)} seeds'})")
    return "; ".join(cells) or "not reached"


def whole_runs(results: dict, targets: list[float], plain: float) -> str:
    """`fast`'s whole runs in plain epochs (seconds) and their test accuracy at the end."""
    runs = results.get("fast")
    if not runs:
        return "not run"
    seconds = whole_run_seconds(runs, targets)
    if seconds is None:  # stopped at the targets, maybe before its end
        return "stopped at the targets"
    ratios = [s / plain for s in seconds]
    accuracy = [r["curve"][-1][2] * 100 for r in runs]
    return f"{mean_sd(ratios, 2)} ({mean_sd(seconds, 1)} s), {min(accuracy):.2f} to {max(accuracy):.2f}%"


def cpu_label(saved: dict) -> str:
    """A results file's CPU, its kind and the precision its runs trained at: the CPU's own (`--precision
    auto`, which the file's cpu_kind names) unless the command set another (--set), which is named as set."""
    hw, precision = saved["hardware"], saved.get("overrides", {}).get("precision")  # older files: no overrides
    kind = hw.get("cpu_kind", "?")
    if precision and precision != "auto":
        kind = f"{kind.rsplit(', ', 1)[0]}, {precision} (set by the command)"
    return f"{hw['cpu']}, {hw['cores']} cores: {kind}"


def row(path: Path) -> list[str]:
    saved = json.loads(path.read_text())
    hw, results = saved["hardware"], saved["results"]
    plain = plain_epoch_seconds(results)
    if plain is None:
        raise SystemExit(f"{path}: no plain reference in this run, so no unit to state the times in")
    seeds = min(len(runs) for runs in results.values())
    return [cpu_label(saved), str(hw["threads"]),
            f"{plain:.1f} s", *(schedules(results, t, plain, saved.get("models", {})) for t in TARGETS),
            whole_runs(results, saved.get("targets", list(TARGETS)), plain), str(seeds),
            f"`{saved.get('command', '?')}`; load average {saved['load_average_end'][0]} at the end"]


def best_row(path: Path) -> list[str]:
    saved = json.loads(path.read_text())
    hw, runs, plain = saved["hardware"], saved["results"], saved.get("plain_epoch_seconds")
    if not plain:
        raise SystemExit(f"{path}: no plain reference in this run, so no unit to state the budget in")
    unit = statistics.mean(plain)
    accuracy = [r["test_accuracy"] * 100 for r in runs]
    seconds = [r["train_seconds"] for r in runs]
    ratios = [t / unit for t in seconds]
    within = sum(r <= BUDGET for r in ratios)
    schedule = f"{saved['epochs']} epochs" + (f", the last {saved['epochs'] - 1} on the hardest "
                                              f"{saved['hard_fraction']:.0%}" if saved["hard_fraction"] < 1 else "")
    if saved.get("resize_from"):  # absent from files written before progressive resizing: off
        schedule += f", training images from {saved['resize_from']} pixels a side"
    # Files written before the augmentation was saved hold it only where the command set it.
    erase = saved.get("augment", saved["overrides"].get("augment", {})).get("erase")
    if erase:
        schedule += f", random erasing on {erase:.0%} of the images"
    return [cpu_label(saved), str(hw["threads"]),
            f"{unit:.1f} s ({min(plain):.1f} to {max(plain):.1f}, {len(plain)} timed)",
            f"`{saved['model']}`, {schedule}",
            f"{mean_sd(accuracy, 2)}% ({', '.join(f'{a:.2f}' for a in accuracy)})",
            f"{mean_sd(ratios, 1)} ({mean_sd(seconds, 0)} s)", f"{within} of {len(runs)}", str(len(runs)),
            f"`{saved['command']}`; load average {saved['load_average_end'][0]} at the end"]


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def table(files: list[Path]) -> str:
    head = ["CPU: kind, precision", "threads", "one plain epoch", "`fast` to 91.73%, in plain epochs (seconds)",
            "to 93%", "`fast`, a whole run (accuracy at the end)", "seeds", "command and load"]
    return markdown(head, [row(f) for f in files])


def best_table(files: list[Path]) -> str:
    head = ["CPU: kind, precision", "threads", "one plain epoch (the runs' unit)", "`best` there: net, schedule",
            "test accuracy (mean ± sd; each seed)", "training per run, in plain epochs (seconds)",
            f"runs within {BUDGET} plain epochs", "seeds", "command and load"]
    return markdown(head, [best_row(f) for f in files])


def rewrite(page: Path, old: str, text: str, markers: tuple[str, str]) -> str:
    """The page's text `old` with `text` between its two markers."""
    begin, end = markers
    if begin not in old or end not in old:
        raise SystemExit(f"{page}: no {begin} ... {end} markers to write the table between")
    head, rest = old.split(begin, 1)
    return head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the folder of the benchmarks' --json files (default: benchmarks/results)")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a page's table is stale")
    args = ap.parse_args(argv)
    tables = [(table(sorted(args.results.glob("time-to-accuracy-*.json"))), FAST_MARKERS),
              (best_table(sorted(args.results.glob("best-accuracy-*.json"))), BEST_MARKERS)]
    stale = []
    for page in PAGES:
        old = new = page.read_text()
        for text, markers in tables:
            new = rewrite(page, new, text, markers)
        if new != old:
            stale.append(page)
            if not args.check:
                atomic.write_text(page, new)
    print("\n\n".join(text for text, _ in tables))
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; run python benchmarks/cpu_records.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
