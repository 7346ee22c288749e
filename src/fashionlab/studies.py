"""Studies: train a set of models over several seeds with one recipe, then compare them.

A study is data (a recipe and its models). Each (model, seed) run is an ordinary run folder
`<out>/<model>/seed-<seed>/` made by `run.train_or_reuse`, so a study is resumable for free: a
finished run is reused (when its settings are the ones asked for), an interrupted one is
continued, anything else is trained. Seeds are the recipe's seed + 0, 1, ..., N-1.

`compare(run_dirs)` builds the comparison page from any finished runs (grouped by model), so
`fashionlab compare RUN RUN ...` and a study share one code path.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import checkpoint, data as data_mod, models, pages, report, run as run_mod
from .config import TrainConfig, make_config
from .recipes import get_recipe
from .training import Callback


class StudyError(ValueError):
    """A study name, run folder or setting that cannot be used; the message says which."""


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    recipe: str
    models: tuple[str, ...] | None = None  # None: every registered model (the zoo)

    def model_names(self) -> tuple[str, ...]:
        return self.models if self.models is not None else tuple(models.MODELS)


STUDIES: dict[str, Study] = {}


def register(study: Study) -> Study:
    STUDIES[study.name] = study
    return study


register(Study("dense-vs-conv", "A dense network against a small CNN: where convolutions help, class by class.",
               "dense-vs-conv", get_recipe("dense-vs-conv").models))
register(Study("cnn-vs-rnn", "A small CNN against an LSTM reading image rows (the reference study's claim: the CNN "
               "wins, 88.0% vs 86.2%, and Shirt is the hardest class).", "cnn-vs-rnn", get_recipe("cnn-vs-rnn").models))
register(Study("zoo", "Every registered model under one recipe (dense-vs-conv's settings).", "dense-vs-conv", None))


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise StudyError(f"unknown study {name!r}; known studies: {', '.join(sorted(STUDIES))}") from None


def study_seeds(study: Study, n: int) -> list[int]:
    if n < 1:
        raise StudyError(f"--seeds {n}: expected an integer >= 1")
    base = get_recipe(study.recipe).settings.get("seed", TrainConfig.seed)
    return [base + i for i in range(n)]


def run_folder(out_dir: Path, model: str, seed: int) -> Path:
    return Path(out_dir) / model / f"seed-{seed}"


class StudyLog(Callback):
    """One line per epoch of a study's run, tagged with its place in the study."""

    def __init__(self, tag: str, log: Callable[[str], None]):
        self.tag, self.log = tag, log

    def on_epoch_end(self, trainer, row) -> None:
        val = f" | val acc {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""
        self.log(f"{self.tag} epoch {row['epoch']}/{trainer.cfg.epochs}: loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.4f}{val} | {row['seconds']:.1f} s, {row['images_per_s']:,.0f} img/s")


def study_plan(study: Study, out_dir: Path, seeds: int, overrides: dict[str, Any]) -> list[tuple[TrainConfig, Path]]:
    """Every (settings, run folder) of the study, seed-major: a study stopped early still has every
    model at its first seeds."""
    return [(make_config(recipe=study.recipe, model=model, seed=seed, **overrides), run_folder(out_dir, model, seed))
            for seed in study_seeds(study, seeds) for model in study.model_names()]


def run_study(name: str, out_dir: str | Path, seeds: int = 3, dataset=None, overrides: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None, run_reports: bool = True,
              data_dir=None, offline=None) -> dict[str, Any]:
    """Train (or reuse) every (model, seed) run of a study, then write `<out>/report.html`.

    Returns {"runs": [...], "trained": [...], "reused": [...], "report": path, "summary": {...}}.
    `overrides` are training settings applied on top of the recipe (epochs, subset, device...).
    """
    study = get_study(name)
    out_dir = Path(out_dir)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    plan = study_plan(study, out_dir, seeds, {k: v for k, v in (overrides or {}).items() if v is not None})
    if dataset is None:  # loaded only if some run needs training or a report
        dataset = functools.cache(lambda: data_mod.load(data_mod.FASHION_MNIST, data_dir=data_dir, offline=offline,
                                                        progress=log))
    trained, reused = [], []
    started = time.perf_counter()
    for i, (cfg, run_dir) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {cfg.model} seed {cfg.seed}"
        status = run_mod.RunFolder(run_dir).status
        if status != run_mod.FINISHED:
            log(f"{tag}: {'resuming' if status == run_mod.INTERRUPTED else 'training'} {cfg.epochs} epochs -> {run_dir}")
        folder, action = run_mod.train_or_reuse(cfg, run_dir, dataset, callbacks=[StudyLog(tag, log)])
        m = folder.metrics
        if action == "reused":
            log(f"{tag}: finished earlier (test accuracy {m['test_accuracy']:.4f}), reusing {run_dir}")
            reused.append(run_dir)
        else:
            log(f"{tag}: test accuracy {m['test_accuracy']:.4f} in {m['train_seconds']:.1f} s "
                f"({time.perf_counter() - started:.0f} s since the study started)")
            trained.append(run_dir)

    run_dirs = [d for _, d in plan]
    if run_reports:
        for d in run_dirs:
            if not run_mod.RunFolder(d).report_path.exists():
                log(f"writing {run_mod.RunFolder(d).report_path}")
                report.write_run_report(d, dataset=dataset() if callable(dataset) else dataset)
    seed_list = study_seeds(study, seeds)
    page, summary = write_comparison(run_dirs, out_dir / "report.html", title=f"Study {study.name}",
                                     subtitle=f"{study.description} Recipe {study.recipe}; seeds "
                                              f"{', '.join(map(str, seed_list))}.",
                                     references=get_recipe(study.recipe).reference, link_base=out_dir)
    return {"runs": run_dirs, "trained": trained, "reused": reused, "report": page, "summary": summary}


# --------------------------------------------------------------------------- comparison

def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's numbers as a comparison uses them."""
    folder = run_mod.RunFolder(run_dir)
    if not folder.finished:
        raise StudyError(f"{folder.path}: not a finished run (metrics.json is missing)")
    return {"dir": folder.path, "metrics": folder.metrics, "config": folder.record, "history": folder.history}


def group_runs(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs grouped by model; the recipe joins the label when runs come from several recipes."""
    recipes = {r["config"].get("recipe") for r in runs}
    groups: dict[str, list[dict]] = {}
    for r in runs:
        label = r["metrics"].get("model") or r["config"]["model"]
        if len(recipes) > 1:
            label += f" ({r['config'].get('recipe') or 'no recipe'})"
        groups.setdefault(label, []).append(r)
    return groups


def summarise(groups: dict[str, list[dict]]) -> dict[str, Any]:
    """Mean and sample standard deviation over seeds, per model, as plain JSON-able numbers."""
    out: dict[str, Any] = {}
    for label, runs in groups.items():
        ms = [r["metrics"] for r in runs]
        names = list(ms[0]["per_class"])

        def stat(values):
            v = np.asarray(values, dtype=float)
            return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "values": [float(x) for x in v]}
        per_class = {n: stat([m["per_class"][n]["recall"] for m in ms]) for n in names}
        out[label] = {
            "runs": len(runs), "seeds": [m.get("seed") for m in ms],
            "test_accuracy": stat([m["test_accuracy"] for m in ms]),
            "test_loss": stat([m["test_loss"] for m in ms]),
            "params": int(ms[0]["params"]),
            "train_seconds": stat([m["train_seconds"] for m in ms]),
            "images_per_s": stat([m.get("images_per_s", float("nan")) for m in ms]),
            "epochs_run": stat([m["epochs_run"] for m in ms]),
            "per_class_accuracy": per_class,
            "hardest_class": min(per_class, key=lambda n: per_class[n]["mean"]),
            "confusion_mean": np.mean([m["confusion_matrix"] for m in ms], axis=0).tolist(),
            "class_names": names,
            "device": sorted({str(m.get("device")) for m in ms}),
        }
    return out


def _ms(stat: dict, scale: float = 1.0, digits: int = 2) -> str:
    return pages.fmt_mean_std(stat["values"], scale, digits)


def claims(summary: dict[str, Any], references: dict[str, float]) -> list[str]:
    """Plain sentences: who wins (and whether the gap exceeds the spread), the hardest class, references."""
    labels = list(summary)
    lines = []
    if len(labels) > 1:
        ranked = sorted(labels, key=lambda k: -summary[k]["test_accuracy"]["mean"])
        a, b = summary[ranked[0]]["test_accuracy"], summary[ranked[1]]["test_accuracy"]
        gap = a["mean"] - b["mean"]
        spread = max(a["std"], b["std"])
        clear = "larger than" if gap > 2 * spread else "not clearly larger than"
        lines.append(f"{ranked[0]} wins: {a['mean']:.2%} mean test accuracy against {b['mean']:.2%} for "
                     f"{ranked[1]} (gap {gap * 100:.2f} points, {clear} twice the larger standard deviation "
                     f"{spread * 100:.2f}).")
        ref = {k: v for k, v in references.items() if k in summary}
        if len(ref) > 1:
            ref_winner = max(ref, key=ref.get)
            same = "reproduces" if ref_winner == ranked[0] else "does NOT reproduce"
            lines.append(f"The reference study reported {', '.join(f'{k} {v:.1%}' for k, v in ref.items())}: "
                         f"its winner ({ref_winner}) {same}.")
    hardest = {k: s["hardest_class"] for k, s in summary.items()}
    for k, c in hardest.items():
        acc = summary[k]["per_class_accuracy"][c]
        lines.append(f"Hardest class for {k}: {c} ({acc['mean']:.2%} mean accuracy).")
    for k, v in references.items():
        if k in summary:
            m = summary[k]["test_accuracy"]
            lines.append(f"{k}: {m['mean']:.2%} ± {m['std']:.2%} here against {v:.2%} reported "
                         f"({(m['mean'] - v) * 100:+.2f} points).")
    return lines


def comparison_figures(summary: dict[str, Any], groups: dict[str, list[dict]], figs: pages.FigureWriter,
                       references: dict[str, float]) -> dict[str, str]:
    """The comparison's figures as HTML blocks (their PNGs written by figs)."""
    return {
        "accuracy": figs.add("accuracy", accuracy_figure(summary, references),
                             "Test accuracy per model, mean and one standard deviation over seeds"),
        "per_class": figs.add("per_class", per_class_accuracy_figure(summary), "Per-class accuracy side by side"),
        "confusion": figs.add("confusion", confusion_grid_figure(summary),
                              "Confusion matrices (rows: true class; mean counts over seeds)"),
        "curves": figs.add("curves", curves_overlay_figure(summary, groups),
                           "Training curves overlaid, mean over seeds with ± one standard deviation"),
    }


def _colors(n: int) -> list[str]:
    return [f"C{i % 10}" for i in range(n)]


def accuracy_figure(summary: dict[str, Any], references: dict[str, float]):
    """Accuracy with error bars (one standard deviation), single runs as dots, reference figures as markers."""
    labels = list(summary)
    colors = _colors(len(labels))
    fig = pages.new_figure(max(6.0, 1.2 * len(labels) + 2), 3.6)
    ax = fig.add_subplot()
    means = [summary[k]["test_accuracy"]["mean"] * 100 for k in labels]
    stds = [summary[k]["test_accuracy"]["std"] * 100 for k in labels]
    ax.bar(labels, means, yerr=stds, capsize=5, color=colors, alpha=.85)
    refs = [(i, references[k] * 100) for i, k in enumerate(labels) if k in references]
    for i, k in enumerate(labels):
        for v in summary[k]["test_accuracy"]["values"]:
            ax.plot(i, v * 100, "k.", ms=4)
    for j, (i, v) in enumerate(refs):
        ax.plot(i, v, marker="_", ms=30, mew=2, color="crimson",
                label="reported by the reference study" if j == 0 else None)
    lo = min([m - s for m, s in zip(means, stds)] + [v for _, v in refs])
    hi = max([m + s for m, s in zip(means, stds)] + [v for _, v in refs])
    ax.set_ylim(max(0, lo - 3), min(100, hi + 1.5))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy: mean ± std over seeds (dots: single runs)", fontsize=9)
    if refs:
        ax.legend(loc="lower right", fontsize=8)
    ax.tick_params(axis="x", labelrotation=20 if len(labels) > 4 else 0)
    return fig


def per_class_accuracy_figure(summary: dict[str, Any]):
    """Per-class accuracy (recall) of every model side by side, mean and spread over seeds."""
    labels = list(summary)
    colors = _colors(len(labels))
    names = summary[labels[0]]["class_names"]
    fig = pages.new_figure(9, 3.8)
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    x = np.arange(len(names))
    for i, k in enumerate(labels):
        pc = summary[k]["per_class_accuracy"]
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [pc[n]["mean"] * 100 for n in names], width,
               yerr=[pc[n]["std"] * 100 for n in names], capsize=2, label=k, color=colors[i])
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("accuracy (recall, %)")
    low = min(pc["mean"] - pc["std"] for k in labels for pc in summary[k]["per_class_accuracy"].values())
    ax.set_ylim(max(0, low * 100 - 5), 100)  # room for the lowest error bar
    ax.legend(fontsize=8, ncols=min(len(labels), 4))
    ax.set_title("Per-class test accuracy, mean ± std over seeds")
    return fig


def confusion_grid_figure(summary: dict[str, Any]):
    """Every model's confusion matrix, mean counts over seeds, side by side."""
    labels = list(summary)
    names = summary[labels[0]]["class_names"]
    cols = min(len(labels), 3)
    rows = int(np.ceil(len(labels) / cols))
    fig = pages.new_figure(4.6 * cols, 4.4 * rows)
    for i, k in enumerate(labels):
        ax = fig.add_subplot(rows, cols, i + 1)
        cm = np.asarray(summary[k]["confusion_mean"])
        report.draw_confusion(ax, cm, names, f"{k} (mean of {summary[k]['runs']} runs)", small=True)
    return fig


def curves_overlay_figure(summary: dict[str, Any], groups: dict[str, list[dict]]):
    """Training curves of every model overlaid: mean over seeds with a band of one standard deviation."""
    labels = list(summary)
    colors = _colors(len(labels))
    fig = pages.new_figure(10, 3.6)
    axes = [fig.add_subplot(1, 2, j + 1) for j in range(2)]
    for i, k in enumerate(labels):
        for ax, metric in zip(axes, ("loss", "accuracy")):
            for split, style in (("train", "--"), ("val", "-")):
                key = f"{split}_{metric}"
                series = [[row[key] for row in r["history"] if key in row] for r in groups[k]]
                n = min((len(s) for s in series), default=0)
                if n == 0:
                    continue
                arr = np.asarray([s[:n] for s in series])
                epochs = np.arange(1, n + 1)
                mean = arr.mean(0)
                ax.plot(epochs, mean, style, color=colors[i], label=f"{k} {split}")
                if len(arr) > 1:
                    sd = arr.std(0, ddof=1)
                    ax.fill_between(epochs, mean - sd, mean + sd, color=colors[i], alpha=.15)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=.3)
    axes[1].legend(fontsize=7)
    axes[0].set_title("Loss (dashed: train, solid: validation)")
    axes[1].set_title("Accuracy")
    return fig


def comparison_sections(run_dirs: Sequence[str | Path], figs: pages.FigureWriter,
                        references: dict[str, float] | None = None,
                        link_base: Path | None = None) -> tuple[list[pages.Section], dict[str, Any]]:
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise StudyError("no runs to compare")
    names = list(runs[0]["metrics"]["per_class"])
    for r in runs:
        if list(r["metrics"]["per_class"]) != names:
            raise StudyError(f"{r['dir']}: its classes differ from {runs[0]['dir']}'s; only runs on one dataset compare")
    groups = group_runs(runs)
    summary = summarise(groups)
    references = {k: v for k, v in (references or {}).items() if k in summary}
    f = comparison_figures(summary, groups, figs, references)
    claims_list = "<ul>" + "".join(f"<li>{pages.esc(line)}</li>" for line in claims(summary, references)) + "</ul>"
    sections = [pages.Section("Claims", [claims_list]),
                _side_by_side_section(summary, references, f["accuracy"]),
                _per_class_section(summary, names, f["per_class"]),
                pages.Section("Confusion matrices", [f["confusion"]]),
                pages.Section("Curves", [f["curves"]]),
                _runs_section(summary, groups, link_base)]
    return sections, summary


def _side_by_side_section(summary: dict[str, Any], references: dict[str, float], figure: str) -> pages.Section:
    labels = list(summary)
    head = ["model", "runs", "test accuracy (%)", "test loss", "parameters", "train time (s)", "images/s", "epochs"]
    if references:
        head.append("reported (%)")
    rows = []
    for k in labels:
        s = summary[k]
        row = [k, s["runs"], _ms(s["test_accuracy"], 100), _ms(s["test_loss"], 1, 4), f"{s['params']:,}",
               _ms(s["train_seconds"], 1, 1), _ms(s["images_per_s"], 1, 0), _ms(s["epochs_run"], 1, 1)]
        if references:
            row.append(f"{references[k] * 100:.2f}" if k in references else "")
        rows.append(row)
    best = max(range(len(labels)), key=lambda i: summary[labels[i]]["test_accuracy"]["mean"])
    return pages.Section("Side by side", [
        pages.table(head, rows, highlight=[best] if len(labels) > 1 else [],
                    caption="Mean ± sample standard deviation over seeds; the best mean is highlighted."),
        pages.note("Devices: " + "; ".join(f"{k}: {', '.join(summary[k]['device'])}" for k in labels)
                   + ". Training time and images/s depend on the machine and its load."),
        figure])


def _per_class_section(summary: dict[str, Any], names: list[str], figure: str) -> pages.Section:
    """Per-class accuracy: the hardest class (lowest mean over models) highlighted; a gain column for two models."""
    labels = list(summary)
    overall = {n: np.mean([summary[k]["per_class_accuracy"][n]["mean"] for k in labels]) for n in names}
    hardest = min(overall, key=overall.get)
    head = ["class"] + [f"{k} (%)" for k in labels]
    if len(labels) == 2:
        head.append(f"gain of {labels[0]} over {labels[1]} (points)")
    rows = []
    for n in names:
        row = [n] + [_ms(summary[k]["per_class_accuracy"][n], 100, 1) for k in labels]
        if len(labels) == 2:
            a, b = (summary[k]["per_class_accuracy"][n]["mean"] for k in labels)
            row.append(f"{(a - b) * 100:+.1f}")
        rows.append(row)
    return pages.Section("Per-class accuracy", [
        pages.table(head, rows, highlight=[names.index(hardest)],
                    caption=f"Test accuracy (recall) per class, mean ± std over seeds; the hardest class "
                            f"({hardest}) is highlighted."),
        figure])


def _runs_section(summary: dict[str, Any], groups: dict[str, list[dict]], link_base: Path | None) -> pages.Section:
    rows = []
    for k in summary:
        for r in groups[k]:
            m = r["metrics"]
            rows.append([k, m.get("seed"), f"{m['test_accuracy'] * 100:.2f}", f"{m['test_loss']:.4f}",
                         m["epochs_run"], f"{m['train_seconds']:.1f}", f"{m.get('images_per_s', 0):,.0f}",
                         _run_link(r["dir"], link_base)])
    return pages.Section("Runs", [pages.table(
        ["model", "seed", "test accuracy (%)", "test loss", "epochs", "train time (s)", "images/s", "run"], rows,
        numeric_from=1)])


def _run_link(run_dir: Path, link_base: Path | None):
    """A link to the run's report relative to the comparison page, when both live under link_base."""
    rep = run_mod.RunFolder(run_dir).report_path
    if link_base is not None and rep.exists():
        try:
            rel = rep.relative_to(link_base)
            return pages.Raw(f'<a href="{pages.esc(rel.as_posix())}">{pages.esc(run_dir.relative_to(link_base))}</a>')
        except ValueError:
            pass
    return str(run_dir)


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path, title: str = "Comparison", subtitle: str = "",
                     references: dict[str, float] | None = None, link_base: Path | None = None
                     ) -> tuple[Path, dict[str, Any]]:
    """The comparison page, its PNG figures beside it and summary.json with the numbers."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figs = pages.FigureWriter(out.parent, prefix="compare_")
    sections, summary = comparison_sections(run_dirs, figs, references, link_base or out.parent)
    pages.write_page(out, title, sections, subtitle)
    checkpoint.write_json(out.parent / "summary.json", {
        k: {kk: vv for kk, vv in v.items() if kk != "confusion_mean"} for k, v in summary.items()})
    return out, summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The side-by-side table as terminal text."""
    lines = [f"{'model':<14} {'runs':>4} {'test accuracy %':>17} {'params':>10} {'train s':>14} {'images/s':>16}"]
    for k, s in summary.items():
        lines.append(f"{k:<14} {s['runs']:>4} {_ms(s['test_accuracy'], 100):>17} {s['params']:>10,} "
                     f"{_ms(s['train_seconds'], 1, 1):>14} {_ms(s['images_per_s'], 1, 0):>16}")
    for k, s in summary.items():
        pc = s["per_class_accuracy"]
        lines.append(f"{k} hardest class: {s['hardest_class']} ({pc[s['hardest_class']]['mean']:.2%})")
    return lines
