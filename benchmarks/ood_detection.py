"""Out-of-distribution detection: are inputs that are not garments flagged unsure, and how many
garments are?

Builds a set of non-garments offline, 28x28 uint8 as the model sees them: scikit-learn's bundled
handwritten digits (sklearn.datasets.load_digits, 8x8 in 0..16, upscaled to 28x28 and scaled to
0..255), a blank image, uniform grey levels, noise (uniform, Gaussian, sparse bright dots) and
random shapes (rectangles, ellipses, triangles, lines) drawn on black. The in-distribution images are
the test images the run's threshold was not calibrated on (all of them for a run with validation
images; the other half of the test set otherwise). Prints, per kind and for all non-garments
together, AUROC and the detection rate at the threshold, and the false-alarm rate on the
in-distribution images, for the run's score (Mahalanobis distance of the penultimate features,
fashionlab.ood) and for the maximum-softmax-probability baseline (score 1 - max p, its threshold
calibrated the same way, on the same images, for the same false-alarm rate), from the same forward
passes.

    PYTHONPATH=src python benchmarks/ood_detection.py [RUN] [--data-dir DIR] [--seed 0]

Without RUN it trains the `fast-full` recipe into runs/bench-ood-fast (or reuses it). A run without
ood.safetensors is calibrated first (and keeps it). Needs scikit-learn (the `report` extra).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, table  # noqa: E402
from fashionlab import api, ood, run as run_mod  # noqa: E402
from fashionlab.predict import Predictor  # noqa: E402

DEFAULT_RUN = Path("runs/bench-ood-fast")


# --------------------------------------------------------------------------- the non-garments

def digits() -> np.ndarray:
    """scikit-learn's 1,797 bundled 8x8 handwritten digits (ink bright on dark, as garments are here),
    upscaled to 28x28 (bilinear) and scaled from 0..16 to 0..255."""
    from PIL import Image
    from sklearn.datasets import load_digits
    small = load_digits().images.astype(np.float32) * (255.0 / 16.0)
    return np.stack([np.asarray(Image.fromarray(d, mode="F").resize((28, 28), Image.BILINEAR)) for d in small]
                    ).clip(0, 255).round().astype(np.uint8)


def uniform_levels() -> np.ndarray:
    """One image per grey level 1..255, every pixel that level."""
    return np.repeat(np.arange(1, 256, dtype=np.uint8), 28 * 28).reshape(255, 28, 28)


def noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """n/3 each: uniform noise, Gaussian noise around a random level, sparse bright dots on black."""
    k = n // 3
    uniform = rng.integers(0, 256, (k, 28, 28))
    levels = rng.uniform(40, 215, (k, 1, 1))
    gaussian = np.clip(rng.normal(levels, rng.uniform(10, 80, (k, 1, 1)), (k, 28, 28)), 0, 255)
    dots = np.where(rng.random((n - 2 * k, 28, 28)) < rng.uniform(0.02, 0.2, (n - 2 * k, 1, 1)),
                    rng.integers(100, 256, (n - 2 * k, 28, 28)), 0)
    return np.concatenate([uniform, gaussian, dots]).round().astype(np.uint8)


def shapes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n images of one to three random filled rectangles, ellipses, triangles or thick lines, each of a
    random brightness, on black."""
    from PIL import Image, ImageDraw
    out = []
    for _ in range(n):
        img = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            fill = int(rng.integers(80, 256))
            x0, y0 = rng.integers(0, 20, 2)
            x1, y1 = x0 + rng.integers(4, 28 - x0 + 1), y0 + rng.integers(4, 28 - y0 + 1)
            kind = rng.integers(4)
            box = [int(x0), int(y0), int(min(x1, 27)), int(min(y1, 27))]
            if kind == 0:
                draw.rectangle(box, fill=fill)
            elif kind == 1:
                draw.ellipse(box, fill=fill)
            elif kind == 2:
                draw.polygon([tuple(int(v) for v in rng.integers(0, 28, 2)) for _ in range(3)], fill=fill)
            else:
                draw.line(box, fill=fill, width=int(rng.integers(1, 5)))
        out.append(np.asarray(img))
    return np.stack(out)


def non_garments(seed: int = 0) -> dict[str, np.ndarray]:
    """Every kind of non-garment, built offline and seeded."""
    rng = np.random.default_rng(seed)
    return {"digits (sklearn, upscaled)": digits(), "blank": np.zeros((1, 28, 28), np.uint8),
            "uniform grey levels": uniform_levels(), "noise": noise(rng, 600), "random shapes": shapes(rng, 600)}


# --------------------------------------------------------------------------- the measurement

def msp(probs: np.ndarray) -> np.ndarray:
    """The maximum-softmax-probability baseline as a score: higher is less like a garment."""
    return 1.0 - probs.max(1).astype(np.float64)


def measure(predictor: Predictor, calibration: np.ndarray, garments: np.ndarray, garment_labels: np.ndarray,
            kinds: dict[str, np.ndarray]) -> tuple[list[list], dict]:
    """Rows of the table, and the thresholds and in-distribution figures."""
    detector = predictor.ood
    cal_probs, _ = predictor.infer(calibration)
    msp_threshold = ood.threshold_for(msp(cal_probs), detector.info["false_alarm_rate"])
    in_probs, in_scores = predictor.infer(garments)
    in_msp = msp(in_probs)
    summary = {"threshold": detector.threshold, "msp_threshold": msp_threshold,
               "false_alarms": ood.false_alarms(in_scores, detector.threshold),
               "msp_false_alarms": ood.false_alarms(in_msp, msp_threshold),
               "accuracy": float((in_probs.argmax(1) == garment_labels).mean()), "garments": len(garments)}
    rows, pooled, pooled_msp = [], [], []
    for name, images in kinds.items():
        probs, scores = predictor.infer(images)
        pooled.append(scores)
        pooled_msp.append(msp(probs))
        rows.append(_row(name, len(images), in_scores, scores, detector.threshold, in_msp, msp(probs), msp_threshold))
    rows.append(_row("all non-garments", sum(map(len, kinds.values())), in_scores, np.concatenate(pooled),
                     detector.threshold, in_msp, np.concatenate(pooled_msp), msp_threshold))
    rows.append(["garments (false alarms)", len(garments), "", f"{summary['false_alarms']:.1%}", "",
                 f"{summary['msp_false_alarms']:.1%}"])
    return rows, summary


def _row(name, n, in_scores, scores, threshold, in_msp, msp_scores, msp_threshold) -> list:
    return [name, n, f"{ood.auroc(in_scores, scores):.4f}", f"{ood.false_alarms(scores, threshold):.1%}",
            f"{ood.auroc(in_msp, msp_scores):.4f}", f"{ood.false_alarms(msp_scores, msp_threshold):.1%}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", help=f"a finished run folder (default: train the fast-full recipe into {DEFAULT_RUN})")
    ap.add_argument("--data-dir", help="dataset folder (default: the usual places, offline)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and shape images (default 0)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    ds = api.load_data(args.data_dir, offline=True)
    run = api.Run(args.run) if args.run else api.train(recipe="fast-full", out=DEFAULT_RUN, reuse=True, dataset=ds)
    if not run.ood_path.exists():
        print(f"{run.ood_path}: not found; calibrating it now", file=sys.stderr)
        run.calibrate_ood(dataset=ds, device=args.device)
    predictor = Predictor.from_run(run.path, device=args.device)
    images = run_mod.ood_images(run.config, ds)
    start = time.perf_counter()
    rows, s = measure(predictor, np.asarray(images.calibration).reshape(-1, 28, 28), images.measure,
                      images.measure_labels, non_garments(args.seed))
    info = predictor.ood.info
    print(f"run {run.path}: model {run.metrics.get('model')}, test accuracy {run.metrics['test_accuracy']:.4f}, "
          f"{predictor.runtime.device} {predictor.runtime.precision}")
    print(f"machine: {machine()}")
    print(f"thresholds for {info['false_alarm_rate']:.0%} false alarms, calibrated on {info['calibration_images']:,} "
          f"{info['calibrated_on']}: Mahalanobis {s['threshold']:.4g}, max softmax {1 - s['msp_threshold']:.4f} "
          f"(unsure below it); in-distribution: {s['garments']:,} {images.measured_on} (accuracy "
          f"{s['accuracy']:.4f}); {time.perf_counter() - start:.1f} s; one run")
    print(table(["images", "n", "AUROC (Mahalanobis)", "flagged (Mahalanobis)", "AUROC (max softmax)",
                 "flagged (max softmax)"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
