"""The run report: one self-contained `report.html` per run folder, with its figures as PNGs.

It reads what training wrote (config.json, history.jsonl, metrics.json, the model) and the
test set. The result comes first: a summary (test accuracy and loss, the hardest classes, the
curves, the most confused pairs); then per-class scores, the confusion matrix with examples of
the confused pairs, a gallery of mistakes, probability bars, a reliability diagram and the look
inside the model (explain.py); the details last: training time and device, the architecture and
the configuration. Training never imports this module: the CLI and studies call it after training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import data as data_mod, explain, models, pages, robustness, runlock, schema
from .config import shown_value
from .errors import ArgumentError
from .predict import Predictor
from .run import RunFolder


# --------------------------------------------------------------------------- figures

def curves_figure(history: Sequence[dict]):
    fig = pages.new_figure(10, 3.4)
    epochs = [r["epoch"] for r in history]
    for i, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, i + 1)
        for split, style in (("train", "o--"), ("val", "o-")):
            key = f"{split}_{metric}"
            pts = [(r["epoch"], r[key]) for r in history if key in r]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label="training" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric.capitalize(), fontsize=10)
        ax.grid(alpha=.3)
        if len(epochs) < 15:
            ax.set_xticks(epochs)
        ax.legend(fontsize=8)
    return fig


def draw_confusion(ax, cm: np.ndarray, names: Sequence[str], title: str, small: bool = False) -> None:
    """Heatmap coloured by row share (so every true class reads alike), with counts in every cell."""
    cm = np.asarray(cm, dtype=float)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fs = 6 if small else 7.5
    for t in range(cm.shape[0]):
        for p in range(cm.shape[1]):
            v = cm[t, p]
            text = f"{v:.0f}" if v.is_integer() or v >= 10 else f"{v:.1f}"
            ax.text(p, t, text, ha="center", va="center", fontsize=fs, color="white" if shown[t, p] > .5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=fs + 1)
    ax.set_yticks(range(len(names)), names, fontsize=fs + 1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)


def confusion_figure(cm, names: Sequence[str]):
    fig = pages.new_figure(6.4, 5.8)
    draw_confusion(fig.add_subplot(), np.asarray(cm), names, "Confusion matrix (rows: true class; counts)")
    return fig


def confused_pairs_figure(images: np.ndarray, y: np.ndarray, pred: np.ndarray, pairs: Sequence[dict],
                          names: Sequence[str], per_pair: int = 8):
    """One row per confused pair: test images of the true class that were predicted as the other."""
    pairs = [p for p in pairs if p["count"] > 0][:5]
    if not pairs:
        return None
    index = {n: i for i, n in enumerate(names)}
    fig = pages.new_figure(per_pair * 0.9 + 2.2, len(pairs) * 1.0 + 0.4)
    for r, p in enumerate(pairs):
        hits = np.flatnonzero((y == index[p["true"]]) & (pred == index[p["predicted"]]))[:per_pair]
        for c in range(per_pair):
            ax = fig.add_subplot(len(pairs), per_pair, r * per_pair + c + 1)
            pages.hide_axes(ax)
            if c < len(hits):
                ax.imshow(images[hits[c]], cmap="gray_r")
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(f"{p['true']}\n→ {p['predicted']}\n({p['count']})", fontsize=7, rotation=0,
                              ha="right", va="center")
    return fig


def misclassified_figure(images: np.ndarray, y: np.ndarray, probs: np.ndarray, names: Sequence[str], n: int = 32):
    """The most confident mistakes: what the model got wrong while sure of itself."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != y)
    if len(wrong) == 0:
        return None
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    rows, cols = pages.grid_shape(len(wrong), 8)
    fig = pages.new_figure(cols * 1.25, rows * 1.45 + 0.2)
    for i, k in enumerate(wrong):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(images[k], cmap="gray_r")
        ax.set_title(f"true {names[y[k]]}\npred {names[pred[k]]} {probs[k, pred[k]]:.2f}", fontsize=6, pad=2)
        pages.hide_axes(ax)
    return fig


def _spread_over_classes(pool: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """k indices from pool, one class after another (first of each class, then second...)."""
    rank = np.zeros(len(pool), dtype=int)
    seen: dict[int, int] = {}
    for i, idx in enumerate(pool):
        rank[i] = seen.get(int(y[idx]), 0)
        seen[int(y[idx])] = rank[i] + 1
    return [int(pool[i]) for i in np.lexsort((pool, rank))[:k]]


def pick_probability_examples(y: np.ndarray, probs: np.ndarray, n: int = 8) -> np.ndarray:
    """Up to half mistakes, then correct predictions, spread over classes; deterministic."""
    pred = probs.argmax(1)
    wrong, right = np.flatnonzero(pred != y), np.flatnonzero(pred == y)
    n_wrong = min(len(wrong), n // 2)
    n_right = min(len(right), n - n_wrong)
    n_wrong = min(len(wrong), n - n_right)  # few correct ones: show more mistakes instead
    return np.asarray(_spread_over_classes(wrong, y, n_wrong) + _spread_over_classes(right, y, n_right), dtype=int)


def probability_figure(images: np.ndarray, y: np.ndarray, probs: np.ndarray, names: Sequence[str], n: int = 8):
    """Each image beside its class probabilities: predicted bar red when wrong, green when right;
    the true class is named in bold."""
    idx = pick_probability_examples(y, probs, n)
    fig = pages.new_figure(11, 1.5 * int(np.ceil(len(idx) / 2)) + 0.4)
    gs = fig.add_gridspec(int(np.ceil(len(idx) / 2)), 4, width_ratios=[1, 2.6, 1, 2.6])
    for i, k in enumerate(idx):
        r, c = divmod(i, 2)
        ax = fig.add_subplot(gs[r, 2 * c])
        ax.imshow(images[k], cmap="gray_r")
        pages.hide_axes(ax)
        p = int(probs[k].argmax())
        ax.set_title(f"test #{k}", fontsize=7)
        ax = fig.add_subplot(gs[r, 2 * c + 1])
        colors = ["#bbbbbb"] * len(names)
        colors[p] = "#2e9d4a" if p == y[k] else "#d43c3c"
        ax.barh(range(len(names)), probs[k], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.get_yticklabels()[int(y[k])].set_fontweight("bold")
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title(f"true: {names[y[k]]} | predicted: {names[p]} ({probs[k, p]:.2f})", fontsize=7)
    return fig


def per_class_figure(per_class: dict[str, dict[str, float]]):
    """Precision, recall and F1 per class side by side, on the full 0-1 scale."""
    names = list(per_class)
    fig = pages.new_figure(9, 3.4)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    for i, (key, colour) in enumerate((("precision", "#4a7ebb"), ("recall", "#d98c00"), ("f1", "#2e9d4a"))):
        ax.bar(x + (i - 1) * 0.27, [per_class[n][key] for n in names], 0.27, label=key, color=colour)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=.3)
    ax.legend(fontsize=8, ncols=3, loc="lower right")
    ax.set_title("Per-class test scores", fontsize=10)
    return fig


def reliability_figure(bins: Sequence[dict], ece: float):
    fig = pages.new_figure(8.4, 3.6)
    _draw_reliability(fig.add_subplot(1, 2, 1), bins, f"Reliability diagram (ECE {ece:.4f})")
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(centres, [b["count"] for b in bins], width=width * .95, color="#888888")
    ax.set_yscale("log")
    ax.set_xlabel("confidence")
    ax.set_ylabel("test images (log scale)")
    ax.set_title("How many predictions per confidence bin", fontsize=9)
    return fig


def _draw_reliability(ax, bins: Sequence[dict], title: str) -> None:
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    used = [b for b in bins if b["count"]]
    ax.bar([(b["lower"] + b["upper"]) / 2 for b in used], [b["accuracy"] for b in used], width=width * .95,
           color="#4a7ebb", edgecolor="white", label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], "o", color="#d98c00", ms=3,
            label="(mean confidence, accuracy)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def calibration_figure(fitted: dict[str, Any]):
    """Reliability diagrams before and after the temperature, on the test images it was not fitted on
    (calibration.json's bins)."""
    fig = pages.new_figure(8.4, 3.6)
    where = f"{fitted['measured_images']:,} {fitted['measured_on']}"
    _draw_reliability(fig.add_subplot(1, 2, 1), fitted["reliability_before"],
                      f"Before: the model's own (ECE {fitted['ece_before']:.4f})")
    _draw_reliability(fig.add_subplot(1, 2, 2), fitted["reliability_after"],
                      f"After temperature {fitted['temperature']:.3g} (ECE {fitted['ece_after']:.4f})")
    fig.suptitle(f"Reliability on {where}", fontsize=9)
    return fig


# --------------------------------------------------------------------------- a run's figures

@dataclass
class RunView:
    """A finished run with its test set: the model, predictions and metrics, each computed once and
    shared by the figures, the report page and `Run.figures()`."""
    folder: RunFolder
    dataset: data_mod.Dataset
    device: str = "auto"
    _cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # Every file of the run is read (and so checked) first: before the dataset is compared with it and
        # before any figure is drawn or written.
        self.model, self.folder.history, self.folder.record, self.calibration, self.robustness  # noqa: B018
        names = self.folder.class_names
        if list(self.dataset.class_names) != names:
            raise ArgumentError(f"{self.folder.path}: the run's classes {names} differ from the dataset's "
                             f"{list(self.dataset.class_names)}")
        self.metrics  # noqa: B018  (per-class rows for the dataset's classes)

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @property
    def names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def metrics(self) -> dict[str, Any]:
        return self._once("metrics", lambda: schema.metrics(self.folder.metrics, str(self.folder.metrics_path),
                                                            self.names))

    @property
    def probs(self) -> np.ndarray:
        """Test-set probabilities as the service would give them (the run's test-time augmentation)."""
        # calibrate_missing=False: a report of a run made before OOD scores only reads probabilities
        return self._once("probs", lambda: Predictor.from_run(self.folder.path, device=self.device,
                                                              calibrate_missing=False)
                          .probabilities(self.dataset.test_images))

    @property
    def calibration(self) -> dict[str, Any] | None:
        """calibration.json (checked) with its reliability bins, or None for a run made before it."""
        def read():
            if not self.folder.calibration_path.exists():
                return None
            fitted = self.folder.read_calibration()
            return fitted.to_dict() if "reliability_after" in fitted.info else None
        return self._once("calibration", read)

    @property
    def robustness(self) -> dict[str, Any] | None:
        """robustness.json (checked), or None when the run's robustness was not measured."""
        return self._once("robustness", lambda: self.folder.read_robustness()
                          if self.folder.robustness_path.exists() else None)

    @property
    def model(self):
        """The model in float32 on the CPU, for looking inside it."""
        return self._once("model", lambda: explain.load_for_explanation(self.folder.path, device="cpu")[0])


def _embedding_figure(v: RunView, points: int = 2000):
    y = v.dataset.test_labels
    n = min(points, len(y))
    sample = np.sort(np.random.default_rng(0).choice(len(y), n, replace=False)) if n < len(y) else np.arange(n)
    emb = explain.embed(explain.penultimate_features(v.model, v.dataset.test_images[sample]), y[sample])
    return explain.embedding_figure(emb, y[sample], v.names)


# name -> (caption, figure from a RunView; None when the model has nothing of that kind to show)
FIGURES: dict[str, tuple[str, Callable[[RunView], Any]]] = {
    "curves": ("Loss and accuracy per epoch, training and validation",
               lambda v: curves_figure(v.folder.history) if v.folder.history else None),
    "confusion": ("Confusion matrix with counts; colour is the share of the true class",
                  lambda v: confusion_figure(v.metrics["confusion_matrix"], v.names)),
    "per_class": ("Precision, recall and F1 per class", lambda v: per_class_figure(v.metrics["per_class"])),
    "probabilities": ("Class probabilities for a few test images: predicted class green when right, red when "
                      "wrong; the true class in bold",
                      lambda v: probability_figure(v.dataset.test_images, v.dataset.test_labels, v.probs, v.names)),
    "filters": ("First-layer weights as images (red positive, blue negative)",
                lambda v: explain.first_layer_filters(v.model)),
    "feature_maps": ("Feature maps of one test image after every conv layer",
                     lambda v: explain.feature_maps(v.model, v.dataset.test_images[0],
                                                    caption=f"test image 0 ({v.names[v.dataset.test_labels[0]]})")),
    "gradcam": ("Grad-CAM (or saliency): three test images per class (rows: true class)",
                lambda v: explain.saliency_figure(v.model, v.dataset.test_images, v.dataset.test_labels, v.names)[0]),
    "embedding": ("2-D embedding of the penultimate features, coloured by class", _embedding_figure),
    "calibration": ("Reliability diagrams before and after the run's temperature, on test images it was not "
                    "fitted on (the diagonal is perfect calibration)",
                    lambda v: calibration_figure(v.calibration) if v.calibration else None),
    "robustness": ("Accuracy on corrupted test images by corruption and severity (robustness.json)",
                   lambda v: robustness.robustness_figure(v.robustness) if v.robustness else None),
}


def figure_names(which: str | Sequence[str] | None) -> list[str]:
    """`which` as a list of figure names: None for all, one name, or a list of names; checked."""
    if which is None:
        return list(FIGURES)
    names = [which] if isinstance(which, str) else which
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise ArgumentError(f"which={which!r}: expected a figure name or a list of them ({', '.join(FIGURES)})")
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ArgumentError(f"which={which!r}: unknown figure(s) {', '.join(map(repr, unknown))}; "
                            f"available: {', '.join(FIGURES)}")
    return list(names)


def run_figures(view: RunView, which: str | Sequence[str] | None = None) -> dict[str, Any]:
    """The named figures (all by default; a name or a list of names) as matplotlib Figures; kinds the
    model lacks are left out."""
    out = {}
    for name in figure_names(which):
        fig = FIGURES[name][1](view)
        if fig is not None:
            out[name] = fig
    return out


# --------------------------------------------------------------------------- page

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list) and v:
        return shown_value(v)  # exclude's thousands of image indices as their first few and their count
    if isinstance(v, (dict, list)):
        return json.dumps(v) if v else "—"
    return "—" if v is None else str(v)


def _configuration_section(folder: RunFolder) -> pages.Section:
    cfg = folder.record
    env = cfg.get("environment", {})
    settings = [(k, _fmt(v)) for k, v in cfg.items() if k not in ("environment", "data", "split")]
    facts = [("data", f"{cfg.get('data', {}).get('name', '')} from {cfg.get('data', {}).get('source', '')}"),
             ("verification", cfg.get("data", {}).get("verification", "")),
             ("split", ", ".join(f"{k} {v:,}" for k, v in cfg.get("split", {}).items())),
             ("environment", ", ".join(f"{k} {v}" for k, v in env.items()))]
    return pages.Section("Configuration", [pages.key_values(settings + facts)])


def _architecture_section(v: RunView) -> pages.Section:
    rows = models.summary(v.model)
    arch = v.folder.model_info["architecture"]
    table_rows = [[r["layer"], r["type"], str(tuple(r["output_shape"])), f"{r['params']:,}"] for r in rows]
    table_rows.append(["total", "", "", f"{sum(r['params'] for r in rows):,}"])
    return pages.Section("Architecture", [
        pages.paragraph(f"{arch.get('name')} ({arch.get('family')} family), arguments {json.dumps(arch.get('kwargs'))}."),
        pages.table(["layer", "type", "output shape", "parameters"], table_rows, numeric_from=3,
                    highlight=[len(table_rows) - 1])])


def hardest_classes(per_class: dict[str, dict[str, float]], k: int = 3) -> list[str]:
    """The k classes of lowest recall (the share of their test images classified correctly), hardest first."""
    return sorted(per_class, key=lambda n: per_class[n]["recall"])[:k]


def _summary_section(v: RunView, figs: pages.FigureWriter) -> pages.Section:
    """The result first: test accuracy and loss, the hardest classes, the curves, the most confused pairs."""
    metrics, y, pc = v.metrics, v.dataset.test_labels, v.metrics["per_class"]
    facts = [("test accuracy", f"{metrics['test_accuracy']:.4f} ({metrics['test_accuracy']:.2%} of {len(y):,} "
                               f"test images)"),
             ("test loss", f"{metrics['test_loss']:.4f}"),
             ("hardest classes (recall)", ", ".join(f"{n} {pc[n]['recall']:.3f}" for n in hardest_classes(pc)))]
    sec = pages.Section("Summary", [pages.key_values(facts)])
    here = float((v.probs.argmax(1) == y).mean())
    if abs(here - metrics["test_accuracy"]) > 0.002:
        sec.add(pages.note(f"The predictions drawn below (accuracy {here:.4f}, on {v.device}) differ from the stored "
                           f"metrics ({metrics['test_accuracy']:.4f}): another device or precision.", "warn"))
    if v.folder.history:
        sec.add(figs.add("curves", curves_figure(v.folder.history), FIGURES["curves"][0]))
    else:
        sec.add(pages.note("No history.jsonl in this run: no curves.", "warn"))
    pairs = metrics.get("most_confused", [])
    if pairs:
        sec.add(pages.table(["true class", "predicted as", "count"],
                            [[p["true"], p["predicted"], p["count"]] for p in pairs], numeric_from=2,
                            caption="Most confused pairs: test images of the true class predicted as the other"))
    return sec


def _details_section(v: RunView) -> pages.Section:
    """How the result was made: size, epochs, time (the warm-up apart), device and precision."""
    metrics = v.metrics
    warmup = metrics.get("warmup_seconds")
    details = [("expected calibration error", f"{metrics.get('ece', float('nan')):.4f}"),
               ("parameters", f"{metrics['params']:,}"), ("epochs run", metrics["epochs_run"]),
               ("best epoch", _fmt(metrics.get("best_epoch"))), ("training time", f"{metrics['train_seconds']:.1f} s"),
               ("warm-up before the first step (untimed)",
                f"{warmup:.2f} s" if warmup is not None else "not recorded: inside the first epoch's time"),
               ("training throughput", f"{metrics.get('images_per_s', 0):,.0f} images/s"),
               ("device, precision", f"{metrics.get('device')}, {metrics.get('precision')}"),
               ("test images", f"{len(v.dataset.test_labels):,}")]
    return pages.Section("Training and evaluation details", [pages.key_values(details)])


def _per_class_section(v: RunView) -> pages.Section:
    pc, names = v.metrics["per_class"], v.names
    worst = names.index(hardest_classes(pc, 1)[0])
    return pages.Section("Per-class scores", [pages.table(
        ["class", "precision", "recall", "F1", "support"],
        [[n, f"{pc[n]['precision']:.4f}", f"{pc[n]['recall']:.4f}", f"{pc[n]['f1']:.4f}", pc[n]["support"]] for n in names],
        highlight=[worst], caption=f"The hardest class by recall ({names[worst]}) is highlighted.")])


def _confusion_section(v: RunView, figs: pages.FigureWriter) -> pages.Section:
    sec = pages.Section("Confusion matrix", [figs.add("confusion", FIGURES["confusion"][1](v), FIGURES["confusion"][0])])
    pairs = v.metrics.get("most_confused", [])
    fig = confused_pairs_figure(v.dataset.test_images, v.dataset.test_labels, v.probs.argmax(1), pairs, v.names)
    if fig is not None:
        sec.add(figs.add("confused_pairs", fig, "Test images behind the most confused pairs (true → predicted)"))
    return sec


def _mistakes_section(v: RunView, figs: pages.FigureWriter) -> pages.Section:
    sec = pages.Section("Mistakes")
    fig = misclassified_figure(v.dataset.test_images, v.dataset.test_labels, v.probs, v.names)
    sec.add(figs.add("misclassified", fig, "The most confident mistakes: true and predicted label, probability")
            if fig is not None else pages.note("No test image is misclassified."))
    return sec.add(figs.add("probabilities", FIGURES["probabilities"][1](v), FIGURES["probabilities"][0]))


def _calibration_section(v: RunView, figs: pages.FigureWriter) -> pages.Section:
    """The temperature and the reliability before and after it; for a run without one, the model's own
    reliability and how to fit the temperature."""
    sec = pages.Section("Calibration")
    c = v.calibration
    if c is None:
        sec.add(pages.note(f"Not calibrated: the probabilities are the model's own. Fit the temperature with "
                           f"`fashionlab calibrate {v.folder.path}`.", "warn"))
        if v.metrics.get("reliability"):
            sec.add(figs.add("reliability", reliability_figure(v.metrics["reliability"], v.metrics.get("ece", 0.0)),
                             "Reliability diagram: accuracy against confidence per bin (the diagonal is perfect "
                             "calibration)"))
        return sec
    sec.add(pages.key_values([
        ("temperature", f"{c['temperature']:.4g} (logits divided by it before the softmax; the ranking, and so "
                        f"the accuracy, is unchanged)"),
        ("fitted on", f"{c['fit_images']:,} {c['fitted_on']}"),
        ("ECE before, after", f"{c['ece_before']:.4f}, {c['ece_after']:.4f} on {c['measured_images']:,} "
                              f"{c['measured_on']}"),
        ("NLL before, after", f"{c['nll_before']:.4f}, {c['nll_after']:.4f}")]))
    return sec.add(figs.add("calibration", calibration_figure(c), FIGURES["calibration"][0]))


def _robustness_section(v: RunView, figs: pages.FigureWriter) -> pages.Section | None:
    """Accuracy, ECE and unsure share on corrupted test images (robustness.json), or None when not measured."""
    r = v.robustness
    if r is None:
        return None
    rows = [[name, *(f"{x['accuracy']:.3f}" for x in res), f"{np.mean([x['accuracy'] for x in res]):.3f}",
             f"{np.mean([x['ece'] for x in res]):.3f}",
             "—" if any(x["unsure"] is None for x in res) else f"{np.mean([x['unsure'] for x in res]):.1%}"]
            for name, res in r["results"].items()]
    severities = len(next(iter(r["results"].values())))
    clean = r["clean"]
    facts = [("clean accuracy", f"{clean['accuracy']:.4f} (ECE {clean['ece']:.4f})"),
             ("mean corruption accuracy", f"{r['mean_corruption_accuracy']:.4f} over {len(rows)} corruptions at "
                                          f"{severities} severities (ECE {r['mean_corruption_ece']:.4f})"),
             ("share flagged unsure", "no out-of-distribution detector" if r["mean_corruption_unsure"] is None
              else f"{clean['unsure']:.1%} of clean images, {r['mean_corruption_unsure']:.1%} of corrupted ones"),
             ("images", f"{r['images']:,} {r['measured_on']}")]
    return pages.Section("Robustness to corrupted images", [
        pages.key_values(facts),
        figs.add("robustness", robustness.robustness_figure(r), FIGURES["robustness"][0]),
        pages.table(["corruption", *(f"severity {i + 1}" for i in range(severities)), "mean accuracy", "mean ECE",
                     "unsure"], rows, numeric_from=1,
                    caption="Accuracy per corruption and severity; ECE of the calibrated probabilities; the share "
                            "of corrupted images the out-of-distribution detector flags unsure.")])


def run_sections(folder: RunFolder, dataset: data_mod.Dataset, figs: pages.FigureWriter, with_explain: bool = True,
                 device: str = "auto") -> list[pages.Section]:
    """The report's sections: the result first, the configuration last."""
    v = RunView(folder, dataset, device)
    sections = [_summary_section(v, figs), _per_class_section(v), _confusion_section(v, figs),
                _mistakes_section(v, figs)]
    sections.append(_calibration_section(v, figs))
    robustness = _robustness_section(v, figs)
    if robustness is not None:
        sections.append(robustness)
    if with_explain:
        sections += explain.explain_sections(v.model, dataset.test_images, dataset.test_labels, v.names, figs)
    return sections + [_details_section(v), _architecture_section(v), _configuration_section(folder)]


def write_run_report(run_dir: str | Path, dataset: data_mod.Dataset | None = None, out: str | Path | None = None,
                     with_explain: bool = True, data_dir=None, offline=None, device: str = "auto") -> Path:
    """Write `report.html` (default: in the run folder) and its PNG figures beside it."""
    folder = RunFolder(run_dir).require_finished()
    out = Path(out) if out else folder.report_path
    with runlock.writing_into(folder.path, out):  # no other process writes the run folder meanwhile
        dataset = dataset or folder.dataset(data_dir, offline)
        figs = pages.FigureWriter(out.parent)
        sections = run_sections(folder, dataset, figs, with_explain, device)
        return _write_run_page(folder, out, sections)


def _write_run_page(folder: RunFolder, out: Path, sections) -> Path:
    m = folder.metrics
    return pages.write_page(out, f"Run {folder.path.name}: {m.get('model')} — test accuracy {m['test_accuracy']:.2%}",
                            sections, subtitle=f"{folder.path.resolve()} · recipe {m.get('recipe') or 'none'} · "
                                               f"seed {m.get('seed')}")
