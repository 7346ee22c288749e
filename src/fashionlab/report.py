"""The run report: one self-contained `report.html` per run folder, with its figures as PNGs.

It reads what training wrote (config.json, history.jsonl, metrics.json, the model) and the
test set, and shows: configuration, architecture, curves, test metrics, per-class scores,
the confusion matrix, the most confused pairs with examples, a gallery of mistakes,
probability bars, a reliability diagram, and the look inside the model (explain.py).
Training never imports this module: the CLI and studies call it after training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import checkpoint, data as data_mod, explain, models, pages
from .predict import Predictor


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
            explain._hide(ax)
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
    rows, cols = explain._grid_shape(len(wrong), 8)
    fig = pages.new_figure(cols * 1.25, rows * 1.45 + 0.2)
    for i, k in enumerate(wrong):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(images[k], cmap="gray_r")
        ax.set_title(f"true {names[y[k]]}\npred {names[pred[k]]} {probs[k, pred[k]]:.2f}", fontsize=6, pad=2)
        explain._hide(ax)
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
        explain._hide(ax)
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


def reliability_figure(bins: Sequence[dict], ece: float):
    fig = pages.new_figure(8.4, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
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
    ax.set_title(f"Reliability diagram (ECE {ece:.4f})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax = fig.add_subplot(1, 2, 2)
    ax.bar(centres, [b["count"] for b in bins], width=width * .95, color="#888888")
    ax.set_yscale("log")
    ax.set_xlabel("confidence")
    ax.set_ylabel("test images (log scale)")
    ax.set_title("How many predictions per confidence bin", fontsize=9)
    return fig


# --------------------------------------------------------------------------- page

def dataset_for_run(run_dir: str | Path, data_dir=None, offline=None) -> data_mod.Dataset:
    """The dataset a run was trained on, found and verified as training does."""
    cfg = checkpoint.read_json(Path(run_dir) / "config.json")
    spec = data_mod.custom_spec(cfg["class_names"]) if cfg.get("class_names") else data_mod.get_spec(cfg.get("dataset", "fashion-mnist"))
    return data_mod.load(spec, data_dir=data_dir, offline=offline)


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v) if v else "—"
    return "—" if v is None else str(v)


def run_sections(run_dir: Path, dataset: data_mod.Dataset, figs: pages.FigureWriter, with_explain: bool = True,
                 device: str = "auto") -> list[pages.Section]:
    cfg = checkpoint.read_json(run_dir / "config.json")
    metrics = checkpoint.read_json(run_dir / "metrics.json")
    info = checkpoint.read_json(run_dir / checkpoint.MODEL_JSON)
    history = read_history(run_dir)
    names = list(metrics["per_class"])
    if list(dataset.class_names) != names:
        raise ValueError(f"{run_dir}: the run's classes {names} differ from the dataset's {list(dataset.class_names)}")
    images, y = dataset.test_images, dataset.test_labels
    probs = Predictor.from_run(run_dir, device=device).probabilities(images)
    pred = probs.argmax(1)
    sections = []

    env = cfg.get("environment", {})
    settings = [(k, _fmt(v)) for k, v in cfg.items() if k not in ("environment", "data", "split")]
    facts = [("data", f"{cfg.get('data', {}).get('name', '')} from {cfg.get('data', {}).get('source', '')}"),
             ("verification", cfg.get("data", {}).get("verification", "")),
             ("split", ", ".join(f"{k} {v:,}" for k, v in cfg.get("split", {}).items())),
             ("environment", ", ".join(f"{k} {v}" for k, v in env.items()))]
    sections.append(pages.Section("Configuration", [pages.key_values(settings + facts)]))

    model, _ = explain.load_for_explanation(run_dir, device="cpu")
    rows = models.summary(model)
    arch = info["architecture"]
    table_rows = [[r["layer"], r["type"], str(tuple(r["output_shape"])), f"{r['params']:,}"] for r in rows]
    table_rows.append(["total", "", "", f"{sum(r['params'] for r in rows):,}"])
    sections.append(pages.Section("Architecture", [
        pages.paragraph(f"{arch.get('name')} ({arch.get('family')} family), arguments {json.dumps(arch.get('kwargs'))}."),
        pages.table(["layer", "type", "output shape", "parameters"], table_rows, numeric_from=3,
                    highlight=[len(table_rows) - 1])]))

    sec = pages.Section("Training curves")
    if history:
        sec.add(figs.add("curves", curves_figure(history), "Loss and accuracy per epoch, training and validation"))
    else:
        sec.add(pages.note("No history.jsonl in this run: no curves.", "warn"))
    sections.append(sec)

    here = float((pred == y).mean())
    test = [("test accuracy", f"{metrics['test_accuracy']:.4f}"), ("test loss", f"{metrics['test_loss']:.4f}"),
            ("expected calibration error", f"{metrics.get('ece', float('nan')):.4f}"),
            ("parameters", f"{metrics['params']:,}"), ("epochs run", metrics["epochs_run"]),
            ("best epoch", _fmt(metrics.get("best_epoch"))), ("training time", f"{metrics['train_seconds']:.1f} s"),
            ("training throughput", f"{metrics.get('images_per_s', 0):,.0f} images/s"),
            ("device, precision", f"{metrics.get('device')}, {metrics.get('precision')}"),
            ("test images", f"{len(y):,}")]
    sec = pages.Section("Test metrics", [pages.key_values(test)])
    if abs(here - metrics["test_accuracy"]) > 0.002:
        sec.add(pages.note(f"The predictions drawn below (accuracy {here:.4f}, on {device}) differ from the stored "
                           f"metrics ({metrics['test_accuracy']:.4f}): another device or precision.", "warn"))
    sections.append(sec)

    pc = metrics["per_class"]
    worst = min(range(len(names)), key=lambda i: pc[names[i]]["f1"])
    sections.append(pages.Section("Per-class scores", [pages.table(
        ["class", "precision", "recall", "F1", "support"],
        [[n, f"{pc[n]['precision']:.4f}", f"{pc[n]['recall']:.4f}", f"{pc[n]['f1']:.4f}", pc[n]["support"]] for n in names],
        highlight=[worst], caption=f"The hardest class by F1 ({names[worst]}) is highlighted.")]))

    sec = pages.Section("Confusion matrix", [figs.add("confusion", confusion_figure(metrics["confusion_matrix"], names),
                                                      "Confusion matrix with counts; colour is the share of the true class")])
    pairs = metrics.get("most_confused", [])
    if pairs:
        sec.add(pages.table(["true class", "predicted as", "count"],
                            [[p["true"], p["predicted"], p["count"]] for p in pairs], numeric_from=2,
                            caption="Most confused pairs"))
        fig = confused_pairs_figure(images, y, pred, pairs, names)
        if fig is not None:
            sec.add(figs.add("confused_pairs", fig, "Test images behind the most confused pairs (true → predicted)"))
    sections.append(sec)

    sec = pages.Section("Mistakes")
    fig = misclassified_figure(images, y, probs, names)
    sec.add(figs.add("misclassified", fig, "The most confident mistakes: true and predicted label, probability")
            if fig is not None else pages.note("No test image is misclassified."))
    sec.add(figs.add("probabilities", probability_figure(images, y, probs, names),
                     "Class probabilities for a few test images: predicted class green when right, red when wrong; "
                     "the true class in bold"))
    sections.append(sec)

    if metrics.get("reliability"):
        sections.append(pages.Section("Calibration", [figs.add(
            "reliability", reliability_figure(metrics["reliability"], metrics.get("ece", 0.0)),
            "Reliability diagram: accuracy against confidence per bin (the diagonal is perfect calibration)")]))
    if with_explain:
        sections += explain.explain_sections(model, images, y, names, figs)
    return sections


def write_run_report(run_dir: str | Path, dataset: data_mod.Dataset | None = None, out: str | Path | None = None,
                     with_explain: bool = True, data_dir=None, offline=None, device: str = "auto") -> Path:
    """Write `report.html` (default: in the run folder) and its PNG figures beside it."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():
        raise checkpoint.RunError(f"{run_dir}: not a finished run (metrics.json is missing)")
    out = Path(out) if out else run_dir / "report.html"
    dataset = dataset or dataset_for_run(run_dir, data_dir, offline)
    figs = pages.FigureWriter(out.parent)
    sections = run_sections(run_dir, dataset, figs, with_explain, device)
    m = checkpoint.read_json(run_dir / "metrics.json")
    return pages.write_page(out, f"Run {run_dir.name}: {m.get('model')} — test accuracy {m['test_accuracy']:.2%}",
                            sections, subtitle=f"{run_dir.resolve()} · recipe {m.get('recipe') or 'none'} · seed {m.get('seed')}")
