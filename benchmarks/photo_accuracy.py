"""Photo-style accuracy: does a test image rendered like a product photo get the same answer?

Each test image is rendered (images.render_photo_style) with one step at a time and with all
of them (upscaled 8x, inverted to a dark garment on white, uneven white margins, tinted RGB,
JPEG quality 85), sent through the same preprocessing as the service (images.preprocess_blob),
and classified by the same model. Printed next to the plain test-set accuracy of that model.

    PYTHONPATH=src python benchmarks/photo_accuracy.py RUN [--n 2000]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from fashionlab import data, images  # noqa: E402
from fashionlab.predict import Predictor  # noqa: E402

VARIANTS = [("upscale",), ("invert",), ("margin",), ("rgb",), ("jpeg",), images.PHOTO_STEPS]


def measure(predictor: Predictor, test_x: np.ndarray, test_y: np.ndarray, n: int) -> list[dict]:
    plain_all = predictor.probabilities(test_x).argmax(1)
    rows = [{"input": "plain test set (all)", "images": len(test_y), "accuracy": float((plain_all == test_y).mean()),
             "agree": 1.0, "seconds": 0.0}]
    x, y, plain = test_x[:n], test_y[:n], plain_all[:n]
    rows.append({"input": f"plain test set (first {n})", "images": n, "accuracy": float((plain == y).mean()),
                 "agree": 1.0, "seconds": 0.0})
    for steps in VARIANTS:
        start = time.perf_counter()
        batch = np.stack([images.preprocess_blob(images.render_photo_style(img, steps)) for img in x])
        pred = predictor.probabilities(batch).argmax(1)
        name = "photo-style: all of them" if len(steps) > 1 else f"  {steps[0]} only"
        rows.append({"input": name, "images": n, "accuracy": float((pred == y).mean()),
                     "agree": float((pred == plain).mean()), "seconds": time.perf_counter() - start})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=2000, help="test images rendered per variant (the first N)")
    ap.add_argument("--data-dir")
    args = ap.parse_args(argv)
    ds = data.load(data.FASHION_MNIST, data_dir=args.data_dir, offline=True)
    predictor = Predictor.from_run(args.run, device="cpu", precision="fp32")
    rows = measure(predictor, ds.test_images, ds.test_labels, min(args.n, len(ds.test_labels)))
    print(f"model {args.run} ({predictor.info['architecture']['name']}); {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; one run\n")
    print(f"{'input':<30} {'images':>6} {'accuracy':>9} {'same top-1 as plain':>20} {'render+preprocess s':>20}")
    for r in rows:
        print(f"{r['input']:<30} {r['images']:>6} {r['accuracy']:>9.4f} {r['agree']:>20.4f} {r['seconds']:>20.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
