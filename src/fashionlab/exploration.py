"""Dataset exploration (`fashionlab explore --out eda.html`): what the data is before any model.

Shapes, dtypes and pixel ranges; class counts; samples and the mean image of every class;
pixel histograms; and which classes look most alike (distance between class-mean images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import pages
from .data import Dataset


def samples_figure(images: np.ndarray, labels: np.ndarray, names, per_class: int = 10):
    """A grid: one row per class, the first `per_class` training images of it."""
    fig = pages.new_figure(per_class * 0.8 + 1.4, len(names) * 0.8 + 0.3)
    for c, name in enumerate(names):
        idx = np.flatnonzero(labels == c)[:per_class]
        for j in range(per_class):
            ax = fig.add_subplot(len(names), per_class, c * per_class + j + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(idx):
                ax.imshow(images[idx[j]], cmap="gray_r", vmin=0, vmax=255)
            if j == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    return fig


def class_means(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(classes, 28, 28) mean pixel value in [0, 1] per class (NaN-free: an absent class is zeros)."""
    out = np.zeros((num_classes,) + images.shape[1:])
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            out[c] = images[sel].mean(0, dtype=np.float64) / 255.0
    return out


def mean_images_figure(means: np.ndarray, names):
    cols = min(5, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig = pages.new_figure(cols * 1.5, rows * 1.7)
    for c, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, c + 1)
        ax.imshow(means[c], cmap="magma", vmin=0, vmax=1)
        ax.set_title(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def histograms_figure(images: np.ndarray, labels: np.ndarray, names):
    """Overall pixel histogram (log counts: the background zeros dwarf the rest) and one per class."""
    fig = pages.new_figure(11, 5.2)
    gs = fig.add_gridspec(2, 6)
    ax = fig.add_subplot(gs[:, :2])
    counts = np.bincount(images.ravel(), minlength=256)
    ax.bar(np.arange(256), counts, width=1.0, color="#555555")
    ax.set_yscale("log")
    ax.set_xlabel("pixel value")
    ax.set_ylabel("pixels (log scale)")
    ax.set_title("All training pixels", fontsize=9)
    per_row = int(np.ceil(len(names) / 2))
    inner = gs[:, 2:].subgridspec(2, per_row)
    for c, name in enumerate(names):
        ax = fig.add_subplot(inner[c // per_row, c % per_row])
        vals = images[labels == c].ravel()
        ax.hist(vals[vals > 0], bins=32, range=(1, 255), color=f"C{c % 10}")
        ax.set_title(f"{name}\n{(vals == 0).mean():.0%} zeros", fontsize=7)
        ax.tick_params(labelsize=5)
        ax.set_yticks([])
    fig.suptitle("Pixel-value histograms (per class: non-zero pixels)", fontsize=9)
    return fig


def distance_matrix(means: np.ndarray) -> np.ndarray:
    """Root-mean-square pixel difference between class-mean images (0 = identical)."""
    flat = means.reshape(len(means), -1)
    diff = flat[:, None, :] - flat[None, :, :]
    return np.sqrt((diff ** 2).mean(-1))


def distance_figure(dist: np.ndarray, names):
    fig = pages.new_figure(6.2, 5.4)
    ax = fig.add_subplot()
    im = ax.imshow(dist, cmap="viridis_r")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{dist[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if dist[i, j] < dist.max() * .5 else "white")  # viridis_r: small is bright
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=.8, label="RMS difference of class means")
    ax.set_title("Distance between class-mean images (smaller: more alike)", fontsize=9)
    return fig


def closest_pairs(dist: np.ndarray, names, k: int = 6) -> list[tuple[str, str, float]]:
    i, j = np.triu_indices(len(names), 1)
    order = np.argsort(dist[i, j], kind="stable")[:k]
    return [(names[i[o]], names[j[o]], float(dist[i[o], j[o]])) for o in order]


def class_counts_figure(ds: Dataset):
    names = list(ds.class_names)
    tr = np.bincount(ds.train_labels, minlength=len(names))
    te = np.bincount(ds.test_labels, minlength=len(names))
    fig = pages.new_figure(8, 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x - .2, tr, .4, label="train")
    ax.bar(x + .2, te, .4, label="test")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title("Images per class", fontsize=9)
    return fig


FIGURE_CAPTIONS = {
    "class_counts": "Images per class in the training and test sets",
    "samples": "The first ten training images of every class",
    "mean_images": "Mean training image of every class (pixel value 0-1)",
    "histograms": "Pixel-value histograms, overall and per class",
    "class_distances": "Distances between class-mean images",
}


def exploration_figures(ds: Dataset) -> dict[str, Any]:
    """The exploration's figures by name (captions in FIGURE_CAPTIONS)."""
    names = list(ds.class_names)
    means = class_means(ds.train_images, ds.train_labels, len(names))
    return {"class_counts": class_counts_figure(ds),
            "samples": samples_figure(ds.train_images, ds.train_labels, names),
            "mean_images": mean_images_figure(means, names),
            "histograms": histograms_figure(ds.train_images, ds.train_labels, names),
            "class_distances": distance_figure(distance_matrix(means), names)}


def exploration_sections(ds: Dataset, figs: pages.FigureWriter) -> list[pages.Section]:
    names = list(ds.class_names)
    sections = []
    rows = []
    for split, x, y in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
        rows.append([split, str(tuple(x.shape)), str(x.dtype), f"{int(x.min())}..{int(x.max())}",
                     f"{x.mean() / 255:.4f}", f"{x.std() / 255:.4f}", str(tuple(y.shape)), str(y.dtype),
                     f"{int(y.min())}..{int(y.max())}"])
    sections.append(pages.Section("Shapes and ranges", [
        pages.key_values([("dataset", ds.name), ("source", ds.source), ("verification", ds.verification),
                          ("classes", ", ".join(f"{i} {n}" for i, n in enumerate(names)))]),
        pages.table(["split", "images", "dtype", "pixel range", "mean (0-1)", "std (0-1)", "labels", "label dtype",
                     "label range"], rows)]))

    tr = np.bincount(ds.train_labels, minlength=len(names))
    te = np.bincount(ds.test_labels, minlength=len(names))
    figures = exploration_figures(ds)

    def fig(name):
        return figs.add(name, figures[name], FIGURE_CAPTIONS[name])
    sections.append(pages.Section("Class counts", [
        pages.table(["#", "class", "train", "test"], [[i, n, f"{tr[i]:,}", f"{te[i]:,}"] for i, n in enumerate(names)],
                    numeric_from=2, caption="Balanced classes make plain accuracy a fair summary."
                    if len(set(tr)) == 1 and len(set(te)) == 1 else "Images per class"),
        fig("class_counts")]))
    sections.append(pages.Section("Samples", [fig("samples")]))
    sections.append(pages.Section("Mean image per class", [fig("mean_images")]))
    sections.append(pages.Section("Pixel values", [fig("histograms")]))
    pairs = closest_pairs(distance_matrix(class_means(ds.train_images, ds.train_labels, len(names))), names)
    sections.append(pages.Section("Which classes look alike", [
        pages.table(["class", "class", "distance"], [[a, b, f"{d:.4f}"] for a, b, d in pairs], numeric_from=2,
                    caption="The closest pairs of class-mean images: where a classifier is likely to confuse classes"),
        fig("class_distances")]))
    return sections


def write_exploration(ds: Dataset, out: str | Path) -> Path:
    out = Path(out)
    figs = pages.FigureWriter(out.parent, prefix=out.stem + "_")
    return pages.write_page(out, f"Exploring {ds.name}", exploration_sections(ds, figs),
                            subtitle=f"{len(ds.train_labels):,} training and {len(ds.test_labels):,} test images, "
                                     f"{len(ds.class_names)} classes")
