"""Tiny trained runs for report, explanation and study tests (synthetic data: seconds, not minutes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import synthetic_dataset
import fashionlab

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_run(out_dir: Path, model: str = "cnn", epochs: int = 2, dataset=None, **overrides) -> Path:
    """Train `model` on the synthetic bars for a couple of epochs into out_dir; returns out_dir."""
    fashionlab.train(model=model, out=out_dir, dataset=dataset or synthetic_dataset(), quiet=True, epochs=epochs,
                     batch_size=32, val_split=0.2, seed=0, **overrides)
    return Path(out_dir)


def figure_ok(fig) -> None:
    """A figure that has axes and renders to a PNG image."""
    from fashionlab import pages
    assert fig is not None and fig.axes, "figure has no axes"
    png = pages.figure_png(fig)
    assert png.startswith(PNG_MAGIC) and len(png) > 2000


def img_sources(html: str) -> list[str]:
    import re
    return re.findall(r'data-figure="([^"]+)"', html)


def assert_no_external_refs(html: str) -> None:
    """Self-contained: no http(s) fetches, no external scripts, stylesheets or images."""
    import re
    assert not re.search(r'(src|href)="(https?:)?//', html), "page refers to an external resource"
    assert "<script" not in html
    assert np.all([s.startswith("data:") for s in re.findall(r'<img src="([^"]+)"', html)])
