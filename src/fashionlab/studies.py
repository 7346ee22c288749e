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
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import checkpoint, data as data_mod, models, pages, report, run as run_mod, runlock, stats, tracking
from .config import TrainConfig, make_config
from .errors import UserError
from .recipes import get_recipe
from .training import Callback


class StudyError(UserError, ValueError):
    """A study name, run folder or setting that cannot be used; the message says which."""


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    recipe: str
    models: tuple[str, ...] | None = None  # None: every registered model (the zoo)
    # Each model trained twice per seed, on every training image and without the images `exclude` names
    # (an audit's suspects): the study asks whether leaving them out changes the test accuracy.
    with_and_without_exclusions: bool = False

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
register(Study("audit-exclude", "The fast-full recipe on every training image against the same recipe without "
               "the suspected label errors a label audit lists (--exclude audit.csv).", "fast-full", ("fast",),
               with_and_without_exclusions=True))


def get_study(name: str) -> Study:
    try:
        return STUDIES[name]
    except KeyError:
        raise StudyError(f"unknown study {name!r}; known studies: {', '.join(sorted(STUDIES))}") from None


def study_seeds(study: Study, n: int) -> list[int]:
    if n < 1:
        raise StudyError(f"seeds={n!r} (--seeds): expected an integer >= 1")
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
    if not study.with_and_without_exclusions:
        return [(make_config(recipe=study.recipe, model=model, seed=seed, **overrides), run_folder(out_dir, model, seed))
                for seed in study_seeds(study, seeds) for model in study.model_names()]
    if not overrides.get("exclude"):
        raise StudyError(f"study {study.name} compares training with and without a label audit's suspects: "
                         f"give the audit's CSV (--exclude audit.csv, or exclude= in the API)")
    every = {k: v for k, v in overrides.items() if k != "exclude"}
    return [(make_config(recipe=study.recipe, model=model, seed=seed, **settings), run_folder(out_dir / arm, model, seed))
            for seed in study_seeds(study, seeds) for model in study.model_names()
            for arm, settings in (("all-images", every), ("without-suspects", overrides))]


def _references_if_recipe_unchanged(study: Study, overrides: dict[str, Any]) -> tuple[dict[str, float], list[str]]:
    """The reference study's figures hold for its recipe as it was: a study run on another budget
    (fewer epochs, a subset) is not compared with them, and says so."""
    recipe = get_recipe(study.recipe)
    changed = {k: v for k, v in overrides.items()
               if v is not None and k not in ("device", "precision") and recipe.settings.get(k, getattr(TrainConfig, k, None)) != v}
    if not changed or not recipe.reference:
        return dict(recipe.reference), []
    from .config import shown_value
    shown = ", ".join(f"{k} {shown_value(v) if isinstance(v, list) else v}" for k, v in changed.items())
    return {}, [f"The reference study's figures ({', '.join(f'{m} {a:.2%}' for m, a in recipe.reference.items())}) "
                f"are for the full {study.recipe} recipe; these runs changed it ({shown}), so they are not compared "
                f"with them."]


def run_study(name: str, out_dir: str | Path, seeds: int = 3, dataset=None, overrides: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None, run_reports: bool = True,
              data_dir=None, offline=None, track=None) -> dict[str, Any]:
    """Train (or reuse) every (model, seed) run of a study, then write `<out>/report.html`.

    Returns {"runs": [...], "trained": [...], "reused": [...], "report": path, "summary": {...}}.
    `overrides` are training settings applied on top of the recipe (epochs, subset, device...).
    `track` names experiment trackers (tracking.parse_track): each run is logged, grouped by study.
    """
    study = get_study(name)
    out_dir = Path(out_dir)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    plan = study_plan(study, out_dir, seeds, {k: v for k, v in (overrides or {}).items() if v is not None})
    tracks = tracking.open_tracking(track, tracking.Group.study(name, out_dir))  # checked before any training
    if dataset is None:  # loaded only if some run needs training or a report
        dataset = functools.cache(lambda: data_mod.load(data_mod.FASHION_MNIST, data_dir=data_dir, offline=offline,
                                                        progress=log))
    trained, reused = [], []
    started = time.perf_counter()
    for i, (cfg, run_dir) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {cfg.model}{' without suspects' if cfg.exclude else ''} seed {cfg.seed}"
        status = run_mod.RunFolder(run_dir).status
        if status != run_mod.FINISHED:
            log(f"{tag}: {'resuming' if status == run_mod.INTERRUPTED else 'training'} {cfg.epochs} epochs -> {run_dir}")
        with tracks.run(run_dir) as trackers:  # a reused run is logged from its files
            # A run another process is writing (the same study started twice) is waited for, then reused.
            folder, action = run_mod.train_or_reuse(cfg, run_dir, dataset, callbacks=[StudyLog(tag, log), *trackers],
                                                    wait=lambda line: log(f"{tag}: {line}"))
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
                with runlock.writing(d, wait=True, on_wait=lambda h: log(f"{d} is being written by "
                                                                         f"{runlock.describe_holder(h)}; waiting")):
                    report.write_run_report(d, dataset=dataset() if callable(dataset) else dataset)
    seed_list = study_seeds(study, seeds)
    references, caveats = _references_if_recipe_unchanged(study, overrides or {})
    page, summary = write_comparison(run_dirs, out_dir / "report.html", title=f"Study {study.name}",
                                     subtitle=f"{study.description} Recipe {study.recipe}; seeds "
                                              f"{', '.join(map(str, seed_list))}.",
                                     references=references, link_base=out_dir, caveats=caveats)
    return {"runs": run_dirs, "trained": trained, "reused": reused, "report": page, "summary": summary}


# --------------------------------------------------------------------------- comparison

def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's numbers as a comparison uses them."""
    folder = run_mod.RunFolder(run_dir)
    if not folder.finished:
        raise StudyError(f"{folder.path}: not a finished run (metrics.json is missing)")
    return {"dir": folder.path, "metrics": folder.metrics, "config": folder.record, "history": folder.history,
            "calibration": folder.read_calibration().to_dict() if folder.calibration_path.exists() else None,
            "robustness": folder.read_robustness() if folder.robustness_path.exists() else None}


def trust_rows(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per run: its ECE before and after its temperature (calibration.json) and its scores on
    corrupted images (robustness.json); None where the run has not that file."""
    rows = []
    for r in runs:
        c, rob = r.get("calibration"), r.get("robustness")
        rows.append({"run": str(r["dir"]), "model": r["metrics"].get("model"), "seed": r["metrics"].get("seed"),
                     "test_accuracy": r["metrics"]["test_accuracy"],
                     "temperature": c["temperature"] if c else None,
                     "ece_before": c["ece_before"] if c else r["metrics"].get("ece"),
                     "ece_after": c["ece_after"] if c else None,
                     "mean_corruption_accuracy": rob["mean_corruption_accuracy"] if rob else None,
                     "mean_corruption_ece": rob["mean_corruption_ece"] if rob else None,
                     "mean_corruption_unsure": rob["mean_corruption_unsure"] if rob else None,
                     "corrupted_images": rob["images"] if rob else None})
    return rows


TRUST_HEAD = ["run", "seed", "test accuracy (%)", "temperature", "ECE before", "ECE after",
              "mean corruption accuracy (%)", "corruption ECE", "corrupted flagged unsure (%)"]


def _trust_cells(row: dict[str, Any]) -> list[str]:
    def num(v, scale=1.0, digits=4):
        return "—" if v is None else f"{v * scale:.{digits}f}"
    return [row["run"], str(row["seed"]), num(row["test_accuracy"], 100, 2), num(row["temperature"], 1, 3),
            num(row["ece_before"]), num(row["ece_after"]), num(row["mean_corruption_accuracy"], 100, 2),
            num(row["mean_corruption_ece"]), num(row["mean_corruption_unsure"], 100, 1)]


def trust_lines(rows: list[dict[str, Any]]) -> list[str]:
    """trust_rows as terminal text."""
    widths = [max(len(h), *(len(_trust_cells(r)[i]) for r in rows)) for i, h in enumerate(TRUST_HEAD)]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            for cells in [TRUST_HEAD, *map(_trust_cells, rows)]]


def _trust_section(runs: Sequence[dict]) -> pages.Section:
    rows = trust_rows(runs)
    return pages.Section("Calibration and robustness", [
        pages.table(TRUST_HEAD, [_trust_cells(r) for r in rows], numeric_from=1,
                    caption="One row per run. ECE before and after the run's temperature on test images it was not "
                            "fitted on (before: the whole test set for runs without calibration.json); mean "
                            "corruption accuracy over 15 corruptions at 5 severities (`fashionlab robustness RUN`); "
                            "— where the run has not been calibrated or measured.")])


def group_runs(runs: Sequence[dict]) -> dict[str, list[dict]]:
    """Runs grouped by model; the recipe joins the label when runs come from several recipes."""
    recipes = {r["config"].get("recipe") for r in runs}
    groups: dict[str, list[dict]] = {}
    for r in runs:
        label = r["metrics"].get("model") or r["config"]["model"]
        if len(recipes) > 1:
            label += f" ({r['config'].get('recipe') or 'no recipe'})"
        if r["config"].get("exclude"):  # trained without an audit's suspects: its own group
            label += f" without {len(r['config']['exclude']):,} images"
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


def claims(summary: dict[str, Any], references: dict[str, float], caveats: Sequence[str] = ()) -> list[str]:
    """Plain sentences, each backed by a test: caveats first (runs not trained alike), then every model
    against the best by Welch's t-test with n and p ("not enough runs to say" below MIN_RUNS per side),
    the hardest classes, and the reference study's figures (only passed when the recipe matches)."""
    lines = list(caveats)
    ranked = sorted(summary, key=lambda k: -summary[k]["test_accuracy"]["mean"])
    lines += [_versus(ranked[0], other, summary) for other in ranked[1:]]
    for k, s in summary.items():
        acc = s["per_class_accuracy"][s["hardest_class"]]
        lines.append(f"Hardest class for {k}: {s['hardest_class']} ({acc['mean']:.2%} mean accuracy).")
    lines += [_against_reference(k, v, summary[k]["test_accuracy"]["values"]) for k, v in references.items()
              if k in summary]
    ref = {k: v for k, v in references.items() if k in summary}
    if len(ref) > 1 and len(summary) > 1:
        ref_winner = max(ref, key=ref.get)
        here = "wins here too" if ref_winner == ranked[0] else f"does not win here ({ranked[0]} has the best mean)"
        lines.append(f"The reference study's winner, {ref_winner}, {here}; the tests above say whether by a "
                     f"significant margin.")
    return lines


def _versus(best: str, other: str, summary: dict[str, Any]) -> str:
    a, b = summary[best]["test_accuracy"]["values"], summary[other]["test_accuracy"]["values"]
    ma, mb = np.mean(a), np.mean(b)
    facts = f"{ma:.2%} against {mb:.2%} mean test accuracy ({(ma - mb) * 100:+.2f} points; n = {len(a)} and {len(b)}"
    if min(len(a), len(b)) < stats.MIN_RUNS:
        return (f"{best} against {other}: {facts}): not enough runs to say which is better "
                f"({stats.MIN_RUNS} seeds per model are needed for a test).")
    p = stats.welch(a, b)
    if p < 0.05:
        return f"{best} beats {other}: {facts}; Welch's t-test p = {stats.fmt_p(p)})."
    return f"{best} and {other} are not significantly different: {facts}; Welch's t-test p = {stats.fmt_p(p)})."


def _against_reference(model: str, reported: float, values: list[float]) -> str:
    m = float(np.mean(values))
    head = f"{model}: {m:.2%} here (n = {len(values)}) against {reported:.2%} reported ({(m - reported) * 100:+.2f} points)"
    if len(values) < stats.MIN_RUNS:
        return f"{head}: not enough runs to test whether the reported figure lies within our spread."
    p = stats.one_sample(values, reported)
    verdict = "outside" if p < 0.05 else "within"
    return f"{head}: the reported figure lies {verdict} our spread (one-sample t-test p = {stats.fmt_p(p)})."


def training_differences(runs: Sequence[dict]) -> list[str]:
    """A caveat naming the settings (other than model and seed) in which the runs were not trained alike."""
    from .config import settings_of, shown_value
    per_run = [settings_of(r["config"]) for r in runs]
    # exclude is in every group's label (group_runs): runs with and without the suspects are told apart there
    ignore = {"model", "model_args", "seed", "device", "precision", "compile", "cache_stem", "eval_batch_size", "exclude"}
    differ = {k: sorted({shown_value(s.get(k)) if isinstance(s.get(k), list) else json.dumps(s.get(k))
                         for s in per_run}) for k in per_run[0] if k not in ignore}
    differ = {k: v for k, v in differ.items() if len(v) > 1}
    if not differ:
        return []
    shown = "; ".join(f"{k} {' / '.join(v)}" for k, v in differ.items())
    return [f"These runs were not trained alike ({shown}): differences below may come from that, not from the models."]


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
    """Mean test accuracy as a point with its 95% confidence interval, every run as a dot, reference
    figures as markers. Points with intervals, not bars on a cut axis, so the gaps are not exaggerated."""
    labels = list(summary)
    colors = _colors(len(labels))
    fig = pages.new_figure(max(6.0, 1.2 * len(labels) + 2), 3.6)
    ax = fig.add_subplot()
    for i, k in enumerate(labels):
        values = [v * 100 for v in summary[k]["test_accuracy"]["values"]]
        lo, hi = stats.mean_ci(values)
        mean = float(np.mean(values))
        ax.errorbar(i, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", ms=7, capsize=6, color=colors[i])
        ax.plot(np.full(len(values), i + 0.12), values, "k.", ms=4)
    refs = [(i, references[k] * 100) for i, k in enumerate(labels) if k in references]
    for j, (i, v) in enumerate(refs):
        ax.plot(i, v, marker="_", ms=30, mew=2, color="crimson",
                label="reported by the reference study" if j == 0 else None)
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(axis="y", alpha=.3)
    ax.set_title("Test accuracy: mean with 95% confidence interval (dots: single runs)", fontsize=9)
    if refs:
        ax.legend(loc="lower right", fontsize=8)
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
    ax.set_ylim(0, 100)  # bars on the full scale: a cut axis exaggerates the gaps
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
                        references: dict[str, float] | None = None, link_base: Path | None = None,
                        caveats: Sequence[str] = ()) -> tuple[list[pages.Section], dict[str, Any]]:
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
    said = claims(summary, references, [*caveats, *training_differences(runs)])
    claims_list = "<ul>" + "".join(f"<li>{pages.esc(line)}</li>" for line in said) + "</ul>"
    sections = [pages.Section("Claims", [claims_list]),
                _side_by_side_section(summary, references, f["accuracy"], _timing_note(runs)),
                _per_class_section(summary, names, f["per_class"]),
                pages.Section("Confusion matrices", [f["confusion"]]),
                pages.Section("Curves", [f["curves"]]),
                _trust_section(runs),
                _runs_section(summary, groups, link_base)]
    return sections, summary


def _timing_note(runs: Sequence[dict]) -> str:
    """What the training times hold, and which runs were timed with the one-time warm-up inside them."""
    text = ("Training time and images/s are the timed epochs only; each run's untimed warm-up (what a process "
            "pays once, such as creating the kernels for each layer's shapes) is in the Runs table. They depend on "
            "the machine and its load.")
    older = sum("warmup_seconds" not in r["metrics"] for r in runs)
    if older:
        text += (f" {older} of {len(runs)} runs were trained before the warm-up was timed apart: their first epoch "
                 f"includes it, so their times are not comparable with the others'.")
    return text


def _side_by_side_section(summary: dict[str, Any], references: dict[str, float], figure: str,
                          timing_note: str) -> pages.Section:
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
        pages.note("Devices: " + "; ".join(f"{k}: {', '.join(summary[k]['device'])}" for k in labels) + ". "
                   + timing_note),
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
                         f"{m['warmup_seconds']:.2f}" if "warmup_seconds" in m else "in epoch 1",
                         _run_link(r["dir"], link_base)])
    return pages.Section("Runs", [pages.table(
        ["model", "seed", "test accuracy (%)", "test loss", "epochs", "train time (s)", "images/s",
         "warm-up, untimed (s)", "run"], rows, numeric_from=1)])


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
                     references: dict[str, float] | None = None, link_base: Path | None = None,
                     caveats: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """The comparison page, its PNG figures beside it and summary.json with the numbers."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figs = pages.FigureWriter(out.parent, prefix="compare_")
    sections, summary = comparison_sections(run_dirs, figs, references, link_base or out.parent, caveats)
    pages.write_page(out, title, sections, subtitle)
    checkpoint.write_json(out.parent / "summary.json", {
        k: {kk: vv for kk, vv in v.items() if kk != "confusion_mean"} for k, v in summary.items()})
    return out, summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The side-by-side table as terminal text."""
    w = max([14, *map(len, summary)])  # "fast without 1,111 images" and the like stay in their column
    lines = [f"{'model':<{w}} {'runs':>4} {'test accuracy %':>17} {'params':>10} {'train s':>14} {'images/s':>16}"]
    for k, s in summary.items():
        lines.append(f"{k:<{w}} {s['runs']:>4} {_ms(s['test_accuracy'], 100):>17} {s['params']:>10,} "
                     f"{_ms(s['train_seconds'], 1, 1):>14} {_ms(s['images_per_s'], 1, 0):>16}")
    for k, s in summary.items():
        pc = s["per_class_accuracy"]
        lines.append(f"{k} hardest class: {s['hardest_class']} ({pc[s['hardest_class']]['mean']:.2%})")
    return lines
