"""The label audit: which labels look wrong, found by confident learning (Northcutt et al. 2021).

    <out>/folds/fold-<k>/   one ordinary run folder per fold (run.train_or_reuse: resumable, reusable)
    <out>/audit.csv         the suspects, most certain first: split, index, given and suggested label
    <out>/audit.html        the suspects' images grouped by given -> suggested label (label_audit_page.py)
    <out>/audit.json        what was audited, how, and the counts behind the ranking
    <out>/probabilities.npz the out-of-sample probabilities of every training and test image

Out-of-sample probabilities come from K-fold cross-validation: fold k's model trains on every training
image but fold k's (the `exclude` training setting, so its config.json says exactly which) and predicts
only fold k. The test images get the mean of the K fold models' probabilities; none trained on them.

Confident learning is written out here rather than taken from the cleanlab package: the part used is
forty lines of NumPy (per-class thresholds, the confident joint, pruning by noise rate, ranking by
self-confidence), while cleanlab would bring scikit-learn, pandas and more to every install.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import data as data_mod, evaluate, run as run_mod
from .atomic import write_bytes, write_text
from .checkpoint import write_json
from .config import TrainConfig
from .errors import UserError
from .training import Callback

MIN_FOLDS, MAX_FOLDS = 2, 20
DEFAULT_FOLDS = 5
CSV_NAME, PAGE_NAME, SUMMARY_NAME, PROBABILITIES_NAME = "audit.csv", "audit.html", "audit.json", "probabilities.npz"
CSV_COLUMNS = ("rank", "split", "index", "given", "given_name", "suggested", "suggested_name", "p_given",
               "p_suggested", "dataset", "train_sha256")
MAX_CSV_BYTES = 64 << 20  # an audit of 2 GiB of images lists fewer suspects than fit here
SPLITS = ("train", "test")


class AuditError(UserError, ValueError):
    """An audit that cannot run, or an audit CSV that cannot be used; the message says which and why."""


def check_folds(folds: Any) -> int:
    if isinstance(folds, bool) or not isinstance(folds, int) or not MIN_FOLDS <= folds <= MAX_FOLDS:
        raise AuditError(f"folds={folds!r}: expected an integer from {MIN_FOLDS} to {MAX_FOLDS}")
    return folds


# --------------------------------------------------------------------------- cross-validation

def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """`folds` disjoint sets of indices covering every image, each class spread evenly over them; seeded.
    Each class's images are shuffled, then dealt out in turn, starting where the last class stopped, so
    fold sizes differ by at most one image."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    start = 0
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        for k in range(folds):
            parts[(start + k) % folds].append(members[k::folds])
        start += len(members) % folds
    return [np.sort(np.concatenate(p)) for p in parts]


def fold_dir(out: Path, k: int) -> Path:
    return Path(out) / "folds" / f"fold-{k}"


class FoldLog(Callback):
    """One line per epoch of a fold's training."""

    def __init__(self, tag: str, log: Callable[[str], None]):
        self.tag, self.log = tag, log

    def on_epoch_end(self, trainer, row) -> None:
        self.log(f"{self.tag} epoch {row['epoch']}/{trainer.cfg.epochs}: loss {row['train_loss']:.4f} "
                 f"acc {row['train_accuracy']:.4f} | {row['seconds']:.1f} s")


@dataclass
class OutOfSample:
    train: np.ndarray  # (N, K) float32: each training image's probabilities from the fold that left it out
    test: np.ndarray  # (M, K) float32: the mean of the fold models' probabilities
    folds: list[Path]
    trained: int  # folds trained (or resumed) now; the others were reused


def out_of_sample(cfg: TrainConfig, ds: data_mod.Dataset, folds: int, out: Path, log: Callable[[str], None],
                  device: str = "auto", callbacks: Sequence[Callback] = ()) -> OutOfSample:
    """Train (or reuse) each fold's run and predict the images it never saw."""
    held_out = stratified_folds(ds.train_labels, folds, cfg.seed)
    train_probs = np.zeros((len(ds.train_labels), ds.num_classes), dtype=np.float32)
    test_probs = np.zeros((len(ds.test_labels), ds.num_classes), dtype=np.float64)
    dirs, trained = [], 0
    for k, held in enumerate(held_out, 1):
        fold_cfg = replace(cfg, exclude=[int(i) for i in held]).validate()
        path, tag = fold_dir(out, k), f"[fold {k}/{folds}]"
        status = run_mod.RunFolder(path).status
        if status != run_mod.FINISHED:
            log(f"{tag} {'resuming' if status == run_mod.INTERRUPTED else 'training'} on "
                f"{len(ds.train_labels) - len(held):,} images, predicting the other {len(held):,} -> {path}")
        # A fold another process is training (the same audit started twice) is waited for, then reused.
        folder, action = run_mod.train_or_reuse(fold_cfg, path, ds, [FoldLog(tag, log), *callbacks],
                                                wait=lambda line: log(f"{tag} {line}"))
        trained += action != "reused"
        model, rt = run_mod.load_for_inference(folder, device)
        info = folder.model_info
        tta = bool(info.get("tta_flip", False)), int(info.get("tta_shift", 0))

        def probabilities(images: np.ndarray) -> np.ndarray:
            logits = evaluate.predict_outputs(model, images, rt, cfg.eval_batch_size, *tta)[0]
            return torch.softmax(logits.double(), 1).numpy()

        train_probs[held] = probabilities(ds.train_images[held])
        test_probs += probabilities(ds.test_images) / folds
        log(f"{tag} {'reused' if action == 'reused' else action}: held-out accuracy "
            f"{(train_probs[held].argmax(1) == ds.train_labels[held]).mean():.4f}")
        dirs.append(folder.path)
    return OutOfSample(train_probs, test_probs.astype(np.float32), dirs, trained)


# --------------------------------------------------------------------------- confident learning

def per_class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each class's threshold: the mean probability the model gives that class over the images labelled
    with it (its average self-confidence). A class with no images gets none (infinite)."""
    thresholds = np.full(probs.shape[1], np.inf)
    for j in range(probs.shape[1]):
        members = labels == j
        if members.any():
            thresholds[j] = probs[members, j].mean()
    return thresholds


def confident_joint(probs: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Counts C[given, true]: an image counts where it is confidently some class (a probability at or
    above that class's threshold): that class, or the most probable class where several are; images
    confidently nothing do not count. (cleanlab's count.compute_confident_joint, uncalibrated.)"""
    above = probs >= thresholds - 1e-6  # a class's own mean may sit a rounding error above every member
    confident = above.any(1)
    true = np.where(above.sum(1) > 1, probs.argmax(1), above.argmax(1))
    joint = np.zeros((probs.shape[1],) * 2, dtype=np.int64)
    np.add.at(joint, (labels[confident], true[confident]), 1)
    return joint


def calibrated_joint(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The confident joint scaled so each row sums to that class's image count: the estimated number of
    images of each given label whose true label is each class, in whole images (each row rounded so that
    it keeps its total, as cleanlab rounds it)."""
    counts = np.bincount(labels, minlength=len(joint)).astype(float)
    rows = joint.sum(1).astype(float)
    scaled = np.divide(joint * counts[:, None], rows[:, None], out=np.zeros(joint.shape), where=rows[:, None] > 0)
    return np.stack([_round_keeping_sum(row) for row in scaled])


def _round_keeping_sum(values: np.ndarray) -> np.ndarray:
    """Whole numbers near values with the same (rounded) sum: the ones rounded furthest are moved."""
    ints = np.rint(values)
    short = int(np.rint(values.sum() - ints.sum()))
    if short:
        order = np.argsort(values - ints, kind="stable")  # most rounded up first
        ints[(order[::-1] if short > 0 else order)[:abs(short)]] += np.sign(short)
    return ints.astype(np.int64)


@dataclass
class Findings:
    """The suspected label errors of one split, most certain first."""
    index: np.ndarray  # image indices, ranked by self-confidence (the given label's probability), lowest first
    given: np.ndarray
    suggested: np.ndarray  # the most probable class
    p_given: np.ndarray
    p_suggested: np.ndarray
    thresholds: np.ndarray
    joint: np.ndarray  # the confident joint (rows: given label, columns: suggested)
    estimated_errors: float  # the calibrated joint's off-diagonal sum

    def __len__(self) -> int:
        return len(self.index)


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> Findings:
    """Confident learning's prune-by-noise-rate: for every pair (given i, true j), the calibrated joint
    estimates how many images labelled i are really j; that many images labelled i, those with the largest
    margin p(j) - p(i), are suspects. An image the model itself assigns to its given label is never one.
    Each class keeps at least one image."""
    labels = np.asarray(labels, dtype=np.int64)
    thresholds = per_class_thresholds(probs, labels)
    joint = confident_joint(probs, labels, thresholds)
    calibrated = calibrated_joint(joint, labels)
    to_prune = calibrated.copy()
    np.fill_diagonal(to_prune, 0)
    suspect = np.zeros(len(labels), dtype=bool)
    for i in range(probs.shape[1]):
        members = np.flatnonzero(labels == i)
        for j in np.flatnonzero(to_prune[i]):
            take = min(int(to_prune[i, j]), len(members) - 1)  # never every image of a class
            margin = probs[members, j] - probs[members, i]
            suspect[members[np.argsort(-margin, kind="stable")[:take]]] = True
    predicted = probs.argmax(1)
    suspect &= predicted != labels
    index = np.flatnonzero(suspect)
    p_given = probs[index, labels[index]]
    index = index[np.argsort(p_given, kind="stable")]
    return Findings(index, labels[index], predicted[index], probs[index, labels[index]],
                    probs[index, predicted[index]], thresholds, joint, float(to_prune.sum()))


# --------------------------------------------------------------------------- the audit

def audit_dataset(cfg: TrainConfig, ds: data_mod.Dataset, out: str | Path, folds: int = DEFAULT_FOLDS,
                  log: Callable[[str], None] | None = None, device: str = "auto",
                  callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Cross-validate cfg over ds's training images in `folds` folds under out/folds, find the suspected
    label errors of the training and the test images, and write audit.csv, audit.html, audit.json and
    probabilities.npz in out. Returns {"summary": audit.json's contents, "findings": per split, "suspects": the
    CSV's rows}."""
    from . import label_audit_page as audit_page
    check_folds(folds)
    if cfg.exclude:
        raise AuditError("the audit chooses each fold's held-out images itself: leave exclude unset")
    if len(ds.train_labels) < 2 * folds:
        raise AuditError(f"{len(ds.train_labels)} training images cannot be split into {folds} folds "
                         f"that each leave images to train on")
    out = Path(out)
    log = log or (lambda message: None)
    started = time.perf_counter()
    fingerprint = data_mod.train_sha256(ds)
    oos = out_of_sample(cfg, ds, folds, out, log, device, callbacks)
    found = {"train": find_label_issues(oos.train, ds.train_labels),
             "test": find_label_issues(oos.test, ds.test_labels)}
    summary = {
        "dataset": ds.name, "source": ds.source, "train_sha256": fingerprint, "class_names": list(ds.class_names),
        "recipe": cfg.recipe, "model": cfg.model, "folds": folds, "seed": cfg.seed,
        "fold_runs": [str(p) for p in oos.folds], "folds_trained": oos.trained,
        "images": {"train": len(ds.train_labels), "test": len(ds.test_labels)},
        "suspects": {s: len(f) for s, f in found.items()},
        "estimated_label_errors": {s: round(f.estimated_errors, 1) for s, f in found.items()},
        "out_of_sample_accuracy": {"train": float((oos.train.argmax(1) == ds.train_labels).mean()),
                                   "test": float((oos.test.argmax(1) == ds.test_labels).mean())},
        # a class with no images in a split has no threshold (null: JSON has no infinity)
        "thresholds": {s: [float(t) if np.isfinite(t) else None for t in f.thresholds] for s, f in found.items()},
        "confident_joint": {s: f.joint.tolist() for s, f in found.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    with io.BytesIO() as buf:
        np.savez_compressed(buf, train=oos.train, test=oos.test, train_labels=ds.train_labels,
                            test_labels=ds.test_labels)
        write_bytes(out / PROBABILITIES_NAME, buf.getvalue())
    rows = suspect_rows(found, ds, fingerprint)
    write_text(out / CSV_NAME, csv_text(rows))
    write_json(out / SUMMARY_NAME, summary)
    audit_page.write_page(out / PAGE_NAME, summary, found, ds)
    return {"summary": summary, "findings": found, "suspects": rows}


def suspect_rows(found: dict[str, Findings], ds: data_mod.Dataset, fingerprint: str) -> list[dict[str, Any]]:
    """One dict per suspect, with CSV_COLUMNS as keys: training images first, each split most certain first."""
    names = ds.class_names
    return [dict(zip(CSV_COLUMNS, (rank, split, int(i), int(g), names[g], int(s), names[s], round(float(pg), 4),
                                   round(float(ps), 4), ds.name, fingerprint)))
            for split in SPLITS
            for rank, (i, g, s, pg, ps) in enumerate(zip(*(getattr(found[split], a) for a in
                                                            ("index", "given", "suggested", "p_given", "p_suggested"))), 1)]


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- training without the suspects

def exclusions(source: Any, ds: data_mod.Dataset) -> list[int]:
    """The training images to leave out, as the sorted indices the `exclude` setting holds: from an audit's
    CSV (a path; its training rows, checked against ds), or a sequence of indices (checked against ds)."""
    if isinstance(source, (str, Path)):
        return read_exclusions(source, ds)
    if hasattr(source, "csv") and isinstance(source.csv, Path):  # an api.AuditResult
        return read_exclusions(source.csv, ds)
    try:
        items = list(source)
    except TypeError:
        raise AuditError(f"exclude={source!r}: expected an audit's CSV file or a list of training-image "
                         f"indices") from None
    bad = next((x for x in items if isinstance(x, bool) or not isinstance(x, (int, np.integer))), None)
    if bad is not None:
        raise AuditError(f"exclude: {bad!r} is not a training-image index (an integer)")
    indices = sorted({int(x) for x in items})
    if not indices:
        raise AuditError("exclude: no images listed; leave it unset to train on every image")
    if indices[0] < 0 or indices[-1] >= len(ds.train_labels):
        wrong = indices[0] if indices[0] < 0 else indices[-1]
        raise AuditError(f"exclude: image index {wrong} is outside this dataset's {len(ds.train_labels):,} "
                         f"training images (0 to {len(ds.train_labels) - 1})")
    return indices


def read_exclusions(path: str | Path, ds: data_mod.Dataset) -> list[int]:
    """The training images an audit's CSV lists, checked: the file is an audit's CSV, made on this very
    training set (its content hash), each row's image index in range and its given label this data's label."""
    path = Path(path)
    text = _read_csv_file(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in ("split", "index", "given", "train_sha256") if c not in header]
        if missing:
            raise AuditError(f"{path}: no {', '.join(missing)} column; not an audit's CSV (`fashionlab audit` "
                             f"writes one)")
        fingerprint = data_mod.train_sha256(ds)
        n, seen, indices = len(ds.train_labels), set(), []
        for row in reader:
            where = f"{path} line {reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                raise AuditError(f"{where}: {len(header)} columns expected, as in the header")
            split, index, given = row["split"], _integer(row["index"], where, "index"), _integer(row["given"], where, "given")
            if split not in SPLITS:
                raise AuditError(f"{where}: split {split[:20]!r}: expected train or test")
            if row["train_sha256"] != fingerprint:
                raise AuditError(f"{where}: made on other training data (sha256 {row['train_sha256'][:16]!r}...) "
                                 f"than this dataset's ({fingerprint[:16]}...); audit this dataset instead")
            if (split, index) in seen:
                raise AuditError(f"{where}: {split} image {index} is listed twice")
            seen.add((split, index))
            if split == "test":  # test images are never trained on: nothing to leave out
                continue
            if index >= n:
                raise AuditError(f"{where}: image index {index} is beyond this dataset's {n:,} training images")
            if given != int(ds.train_labels[index]):
                raise AuditError(f"{where}: training image {index} is labelled {int(ds.train_labels[index])} here, "
                                 f"not {given}; the CSV was edited or is from other data")
            indices.append(index)
    except csv.Error as e:
        raise AuditError(f"{path}: not a readable CSV ({e})") from None
    if not indices:
        raise AuditError(f"{path}: lists no suspected training images; nothing to leave out")
    return sorted(indices)


def _read_csv_file(path: Path) -> str:
    if not path.exists():
        raise AuditError(f"{path}: no such file (expected an audit's CSV, from `fashionlab audit`)")
    if not path.is_file():
        raise AuditError(f"{path}: not a file (expected an audit's CSV, from `fashionlab audit`)")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise AuditError(f"{path}: larger than {MAX_CSV_BYTES:,} bytes; not an audit's CSV")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise AuditError(f"{path}: not UTF-8 text; not an audit's CSV") from None
    except OSError as e:
        raise AuditError(f"{path}: cannot be read ({e.strerror or e})") from None


def _integer(text: str, where: str, column: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        raise AuditError(f"{where}: {column} {text[:20]!r}: expected a whole number >= 0")
    return int(text)
