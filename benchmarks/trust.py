"""Calibration and robustness tables of finished runs, and an augmentation's effect on robustness over seeds.

Reads what the commands wrote in each run folder (calibration.json: `fashionlab calibrate RUN`, also
written by `train`; robustness.json: `fashionlab robustness RUN`) and prints Markdown tables:

1. calibration: the temperature, ECE and NLL before and after it, on test images it was not fitted on;
2. robustness: accuracy per corruption (mean over the 5 severities), clean and mean corruption
   accuracy, ECE and the share flagged unsure, one column per run named with --show;
3. with --baseline and --candidate (runs of two recipes over the same seeds): per seed and mean, the
   mean corruption accuracy and the clean test accuracy (metrics.json: the whole test set), their
   differences and Welch's two-sided p-values (fashionlab.stats).

    python benchmarks/trust.py --show fast=runs/fast-s0 best=runs/best-s0 \
        --baseline runs/fast-s0 runs/fast-s1 runs/fast-s2 --candidate runs/light-s0 runs/light-s1 runs/light-s2

--figures DIR writes, per run named with --show, its reliability diagrams before and after
(calibration_NAME.png) and its accuracy by corruption and severity (robustness_NAME.png), and one
test image under every corruption (corruptions.png).

--write docs/trust.md puts the tables between that page's `<!-- trust:NAME -->` and
`<!-- /trust:NAME -->` markers (NAME: machine, calibration, robustness, study) instead of printing them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine  # noqa: E402

from fashionlab import stats  # noqa: E402
from fashionlab.run import RunFolder  # noqa: E402
from fashionlab.tables import replace_between  # noqa: E402


def _runs(paths: list[str]) -> list[RunFolder]:
    folders = [RunFolder(p).require_finished() for p in paths]
    for f in folders:
        for needed, command in ((f.calibration_path, "calibrate"), (f.robustness_path, "robustness")):
            if not needed.is_file():
                raise SystemExit(f"{needed}: not found; run `fashionlab {command} {f.path}` first")
    return folders


def _label(folder: RunFolder) -> str:
    m = folder.metrics
    return f"{m.get('recipe') or m.get('model')} seed {m.get('seed')}"


def calibration_table(named: dict[str, RunFolder]) -> str:
    rows = ["| run | test accuracy | temperature | fitted on | ECE before | ECE after | NLL before | NLL after | "
            "measured on |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for name, f in named.items():
        c = f.read_calibration()
        i = c.info
        rows.append(f"| {name} ({_label(f)}) | {f.metrics['test_accuracy']:.2%} | {c.temperature:.3f} | "
                    f"{i['fit_images']:,} {i['fitted_on']} | {i['ece_before']:.4f} | **{i['ece_after']:.4f}** | "
                    f"{i['nll_before']:.4f} | {i['nll_after']:.4f} | {i['measured_images']:,} {i['measured_on']} |")
    return "\n".join(rows) + "\n"


def robustness_table(named: dict[str, RunFolder]) -> str:
    results = {name: f.read_robustness() for name, f in named.items()}
    names = list(results)
    corruptions = list(next(iter(results.values()))["results"])
    rows = ["| accuracy (mean over severities 1-5) | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names)]
    for c in corruptions:
        rows.append(f"| {c} | " + " | ".join(
            f"{statistics.mean(r['accuracy'] for r in results[n]['results'][c]):.3f}" for n in names) + " |")

    def row(label, value):
        rows.append(f"| {label} | " + " | ".join(value(results[n]) for n in names) + " |")

    row("**clean**", lambda r: f"**{r['clean']['accuracy']:.3f}**")
    row("**mean corruption accuracy**", lambda r: f"**{r['mean_corruption_accuracy']:.3f}**")
    row("ECE clean, corrupted", lambda r: f"{r['clean']['ece']:.3f}, {r['mean_corruption_ece']:.3f}")
    row("flagged unsure: clean, corrupted",
        lambda r: "no detector" if r["mean_corruption_unsure"] is None else
        f"{r['clean']['unsure']:.1%}, {r['mean_corruption_unsure']:.1%}")
    row("images", lambda r: f"{r['images']:,} {r['measured_on']}")
    return "\n".join(rows) + "\n"


def study_table(baseline: list[RunFolder], candidate: list[RunFolder]) -> str:
    def scores(folders):
        return ([f.read_robustness()["mean_corruption_accuracy"] for f in folders],
                [f.metrics["test_accuracy"] for f in folders])

    (rb, cb), (rc, cc) = scores(baseline), scores(candidate)
    settings = [", ".join(f"{k}={v}" for k, v in f.config.augment.items()) for f in (baseline[0], candidate[0])]
    rows = ["| | augment | seeds | mean corruption accuracy, per seed | mean | clean test accuracy, per seed | mean |",
            "|---|---|---|---|---:|---|---:|"]
    for name, folders, r, c, aug in (("baseline", baseline, rb, cb, settings[0]),
                                     ("candidate", candidate, rc, cc, settings[1])):
        rows.append(f"| {name} | {aug} | {', '.join(str(f.metrics.get('seed')) for f in folders)} | "
                    f"{', '.join(f'{x:.4f}' for x in r)} | {statistics.mean(r):.4f} | "
                    f"{', '.join(f'{x:.2%}' for x in c)} | {statistics.mean(c):.2%} |")
    pr, pc = stats.welch(rc, rb), stats.welch(cc, cb)
    rows.append(f"| difference (candidate - baseline) | | | Welch p = {stats.fmt_p(pr) if pr is not None else 'n/a'} | "
                f"**{(statistics.mean(rc) - statistics.mean(rb)) * 100:+.2f} points** | "
                f"Welch p = {stats.fmt_p(pc) if pc is not None else 'n/a'} | "
                f"**{(statistics.mean(cc) - statistics.mean(cb)) * 100:+.2f} points** |")
    per = {name: [f.read_robustness()["results"] for f in folders] for name, folders in
           (("baseline", baseline), ("candidate", candidate))}
    rows += ["", "| accuracy (mean over severities and seeds) | baseline | candidate | difference |", "|---|---:|---:|---:|"]
    for c in per["baseline"][0]:
        b, k = (statistics.mean(statistics.mean(x["accuracy"] for x in r[c]) for r in per[n])
                for n in ("baseline", "candidate"))
        rows.append(f"| {c} | {b:.3f} | {k:.3f} | {k - b:+.3f} |")
    return "\n".join(rows) + "\n"


def write_figures(named: dict[str, RunFolder], out: Path) -> None:
    from fashionlab import data, report, robustness
    out.mkdir(parents=True, exist_ok=True)
    for name, f in named.items():
        report.calibration_figure(f.read_calibration().to_dict()).savefig(out / f"calibration_{name}.png", dpi=80)
        robustness.robustness_figure(f.read_robustness()).savefig(out / f"robustness_{name}.png", dpi=80)
    shoe = data.load(data.FASHION_MNIST, offline=True).test_images[0]
    robustness.examples_figure(shoe).savefig(out / "corruptions.png", dpi=70)
    print(f"figures in {out}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--show", nargs="+", metavar="NAME=RUN", default=[], help="runs for the calibration and "
                    "robustness tables, each named")
    ap.add_argument("--baseline", nargs="*", default=[], metavar="RUN", help="runs of the baseline recipe, one per seed")
    ap.add_argument("--candidate", nargs="*", default=[], metavar="RUN", help="runs of the changed recipe")
    ap.add_argument("--write", metavar="PAGE", help="write the tables between the page's markers")
    ap.add_argument("--figures", metavar="DIR", help="write the figures (PNG) into this folder")
    args = ap.parse_args()
    if any("=" not in s for s in args.show):
        ap.error("--show takes NAME=RUN pairs, e.g. fast=runs/fast-s0")
    named = {k: v for k, v in (s.split("=", 1) for s in args.show)}
    named = dict(zip(named, _runs(list(named.values()))))
    from common import hardware
    precisions = sorted({str(f.read_calibration().info.get("precision")) for f in [*named.values()]})
    blocks = {"machine": f"Measured on: {machine()}; AVX-512 BF16 "
                         f"{'yes' if hardware()['bf16_cpu'] else 'no'}; the runs' precision when predicting: "
                         f"{', '.join(precisions) or 'as recorded'} (bf16: autocast). Other work shared the machine: "
                         f"times are not speed figures, and none are given.\n"}
    if named:
        blocks.update(calibration=calibration_table(named), robustness=robustness_table(named))
    if args.baseline or args.candidate:
        blocks["study"] = study_table(_runs(args.baseline), _runs(args.candidate))
    if args.figures:
        write_figures(named, Path(args.figures))
    if not args.write:
        print("\n".join(f"## {k}\n\n{v}" for k, v in blocks.items()))
        return 0
    page = Path(args.write)
    text = page.read_text()
    for name, body in blocks.items():
        text = replace_between(text, f"<!-- trust:{name} -->", f"<!-- /trust:{name} -->", "\n" + body + "\n",
                               str(page))
    page.write_text(text)
    print(f"wrote {', '.join(blocks)} into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
