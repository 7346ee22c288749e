"""The label audit's page: the suspected label errors as images, grouped by given -> suggested label.

One self-contained file (pages.py): each image an inline PNG at its own 28x28 pixels, shown larger
with its pixels kept sharp; groups largest first, images within a group most certain first.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import pages

MAX_SHOWN = 3000  # images on the page over both splits; the CSV lists every suspect
IMAGE_SCALE = 2  # each 28x28 image drawn at 56x56 CSS pixels

CSS = """
.groups{display:flex;flex-direction:column;gap:.2em}
.group h3{font-size:1em;margin:.9em 0 .3em}.group h3 .count{color:#555;font-weight:400}
.tiles{display:flex;flex-wrap:wrap;gap:6px}
.tile{width:74px;font-size:11px;line-height:1.2;text-align:center;color:#333}
.tile img{width:56px;height:56px;image-rendering:pixelated;border:1px solid #ccc;display:block;margin:0 auto 2px}
.tile .p{font-variant-numeric:tabular-nums;color:#555}
"""


def image_png(image: np.ndarray) -> bytes:
    """A 28x28 image as PNG, inverted (dark garment on white) as the run reports draw them."""
    buf = io.BytesIO()
    Image.fromarray(255 - np.asarray(image, dtype=np.uint8)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_page(path: str | Path, summary: dict[str, Any], found: dict, ds) -> Path:
    names = list(ds.class_names)
    images = {"train": ds.train_images, "test": ds.test_images}
    shown_left = MAX_SHOWN
    split_sections = []
    for split, title in (("train", "Training images"), ("test", "Test images")):
        section, shown = _split_section(title, split, found[split], images[split], names, shown_left)
        shown_left -= shown
        split_sections.append(section)
    subtitle = (f"{summary['dataset']}: out-of-sample probabilities from {summary['folds']}-fold cross-validation "
                f"with the {summary['recipe'] or summary['model']} recipe (seed {summary['seed']}); suspects found "
                f"by confident learning and ranked by how little probability their given label gets.")
    return pages.write_page(path, f"Label audit: {summary['dataset']}",
                            [_summary_section(summary, found, names), *split_sections, _pairs_section(found, names)],
                            subtitle, css=CSS)


def _summary_section(summary: dict[str, Any], found: dict, names: list[str]) -> pages.Section:
    n, acc = summary["images"], summary["out_of_sample_accuracy"]
    rows = [("suspected label errors", f"{len(found['train']):,} of {n['train']:,} training images "
                                       f"({len(found['train']) / max(n['train'], 1):.2%}); {len(found['test']):,} "
                                       f"of {n['test']:,} test images"),
            ("out-of-sample accuracy", f"training images {acc['train']:.2%} (each predicted by the fold that "
                                       f"left it out); test images {acc['test']:.2%} (mean of the fold models)"),
            ("folds", f"{summary['folds']} ({summary['folds_trained']} trained now, "
                      f"{summary['folds'] - summary['folds_trained']} reused), seed {summary['seed']}"),
            ("data", f"{summary['dataset']} from {summary['source']} (training set sha256 "
                     f"{summary['train_sha256'][:16]}...)"),
            ("time", f"{summary['seconds']:,.0f} s in this call (folds reused cost nothing)")]
    return pages.Section("Summary", [
        pages.key_values(rows),
        pages.note("Each image shows its index, then the probability the out-of-sample model gives its given "
                   "label -> the probability of the suggested one. A suspect is an image the model, never "
                   "trained on it, confidently puts in another class: a wrong label, an ambiguous image, or a "
                   "model mistake. Train without the training suspects with "
                   "`fashionlab train --exclude audit.csv`.")])


def _split_section(title: str, split: str, f, images: np.ndarray, names: list[str], budget: int
                   ) -> tuple[pages.Section, int]:
    if len(f) == 0:
        return pages.Section(title, [pages.note(f"No suspected label errors among the {split} images.")]), 0
    pairs: dict[tuple[int, int], list[int]] = {}
    for row, (g, s) in enumerate(zip(f.given, f.suggested)):
        pairs.setdefault((int(g), int(s)), []).append(row)
    groups, shown = [], 0
    for (g, s), rows in sorted(pairs.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        take = rows[:max(0, budget - shown)]
        shown += len(take)
        tiles = "".join(_tile(split, f, r, images, names) for r in take)
        more = f'<p class="note">and {len(rows) - len(take):,} more in audit.csv</p>' if len(take) < len(rows) else ""
        groups.append(f'<div class="group"><h3>{pages.esc(names[g])} &rarr; {pages.esc(names[s])} '
                      f'<span class="count">({len(rows):,})</span></h3><div class="tiles">{tiles}</div>{more}</div>')
    return pages.Section(f"{title}: {len(f):,} suspects", [f'<div class="groups">{"".join(groups)}</div>']), shown


def _tile(split: str, f, row: int, images: np.ndarray, names: list[str]) -> str:
    i, g, s = int(f.index[row]), int(f.given[row]), int(f.suggested[row])
    about = (f"{split} image {i}: labelled {names[g]} (p {f.p_given[row]:.3f}), looks like {names[s]} "
             f"(p {f.p_suggested[row]:.3f})")
    return (f'<div class="tile" title="{pages.esc(about)}">{pages.img_tag(image_png(images[i]), about)}'
            f'#{i}<br><span class="p">{f.p_given[row]:.2f} &rarr; {f.p_suggested[row]:.2f}</span></div>')


def _pairs_section(found: dict, names: list[str]) -> pages.Section:
    """How many suspects each given -> suggested pair holds, training images first."""
    rows = []
    for split in ("train", "test"):
        f = found[split]
        pairs: dict[tuple[int, int], int] = {}
        for g, s in zip(f.given, f.suggested):
            pairs[(int(g), int(s))] = pairs.get((int(g), int(s)), 0) + 1
        rows += [[split, names[g], names[s], n] for (g, s), n in sorted(pairs.items(), key=lambda kv: -kv[1])]
    return pages.Section("Suspects by given and suggested label", [
        pages.table(["split", "given label", "suggested label", "suspects"], rows, numeric_from=3)
        if rows else pages.note("No suspects.")])
