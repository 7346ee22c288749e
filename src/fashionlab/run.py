"""A run is a folder; this module owns it.

    config.json        every training setting, the environment and the data source
    history.jsonl      one line per epoch
    checkpoint.safetensors   present only while a run is interrupted (resume continues it)
    model.safetensors  the weights (never a pickle) and model.json, their description
    metrics.json       test metrics: written last, so its presence means "finished"
    ood.safetensors    the out-of-distribution detector (ood.py), written after the test evaluation
    calibration.json   the temperature that makes the probabilities honest (calibration.py), written with it
    robustness.json    accuracy, ECE and unsure share on corrupted test images (robustness.py), on request
    report.html        the run's report

`RunFolder` reads and writes those files and knows a run's status, its settings and what
"the same settings" means. Every file is checked as it is read (schema.py: types, ranges, sizes,
and the weights against the model their description builds), so a damaged or tampered folder is
refused with one line naming the file and the field, whoever reads it. `train_run`, `resume_run`
and `train_or_reuse` are the one way to make a run: the CLI, studies, sweeps, benchmarks and the
public API all go through them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import calibration, checkpoint, data as data_mod, device as device_mod, evaluate, ood, runlock, schema
from .atomic import OutputError
from .checkpoint import write_json
from .schema import RunError, read_json
from .config import TrainConfig, settings_of
from .errors import UserError
from .training import Callback, ProgressBar, Trainer, split_data

CONFIG = "config.json"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
CHECKPOINT = "checkpoint.safetensors"
REPORT = "report.html"
OOD = "ood.safetensors"
CALIBRATION = "calibration.json"
ROBUSTNESS = "robustness.json"

NEW, INTERRUPTED, FINISHED = "new", "interrupted", "finished"

DatasetArg = data_mod.Dataset | Callable[[], data_mod.Dataset] | None


def _file(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"The path of the run's {name}.")


class RunFolder:
    """One run folder: its files, status and settings. Reading never changes anything."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # ---- files
    config_path = _file(CONFIG)
    history_path = _file(HISTORY)
    metrics_path = _file(METRICS)
    weights_path = _file(MODEL_WEIGHTS)
    model_json_path = _file(MODEL_JSON)
    checkpoint_path = _file(CHECKPOINT)
    report_path = _file(REPORT)
    ood_path = _file(OOD)
    calibration_path = _file(CALIBRATION)
    robustness_path = _file(ROBUSTNESS)

    # ---- status

    @property
    def status(self) -> str:
        """finished (metrics.json, no checkpoint), interrupted (a checkpoint to resume) or new."""
        if self.checkpoint_path.exists():
            return INTERRUPTED
        if self.metrics_path.exists():
            return FINISHED
        return NEW

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    def require_finished(self) -> "RunFolder":
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run folder")
        if not self.finished:
            raise RunError(f"{self.path}: not a finished run (status {self.status}: metrics.json is missing"
                           f"{' and a checkpoint waits to be resumed' if self.status == INTERRUPTED else ''})")
        return self

    # ---- contents

    @property
    def record(self) -> dict[str, Any]:
        """config.json as written: the settings plus the environment, data and split it recorded."""
        return schema.record(read_json(self.config_path), str(self.config_path))

    @property
    def config(self) -> TrainConfig:
        """The training settings, with defaults for settings added since the run was made, validated as
        `train` validates them."""
        return schema.train_config(self.record, str(self.config_path))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished epoch ([] before the first)."""
        return schema.read_history(self.history_path)

    @property
    def metrics(self) -> dict[str, Any]:
        return schema.metrics(read_json(self.metrics_path), str(self.metrics_path))

    @property
    def model_info(self) -> dict[str, Any]:
        """model.json: architecture, class names, input normalisation, precision, versions (their types and
        ranges checked; load_model also checks the architecture against the class names and weights)."""
        return schema.model_info(read_json(self.model_json_path), str(self.model_json_path))

    @property
    def class_names(self) -> list[str]:
        return list(self.model_info["class_names"])

    def validation_scores(self) -> dict[str, float]:
        """The last epoch's validation accuracy and loss ({} without a validation split)."""
        last = (self.history or [{}])[-1]
        return {k: last[k] for k in ("val_accuracy", "val_loss") if k in last}

    # ---- "the same settings"

    def settings_differ(self, cfg: TrainConfig) -> list[str]:
        """The settings in which this run differs from cfg; [] when it was trained with exactly cfg.
        Settings added since the run was made count at their defaults."""
        return list(self._differences(cfg))

    def _differences(self, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
        saved, wanted = settings_of(self.record), cfg.to_dict()  # config.json read and checked once
        return {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}

    def check_same_settings(self, cfg: TrainConfig) -> None:
        diff = self._differences(cfg)
        if diff:
            shown = ", ".join(f"{k}: saved {old!r}, asked {new!r}" for k, (old, new) in diff.items())
            raise RunError(f"{self.path} holds a run trained with other settings ({shown}); "
                           f"use another folder or remove that one")

    # ---- what using the run needs

    def dataset(self, data_dir=None, offline: bool | None = None, progress=None) -> data_mod.Dataset:
        """The dataset the run was trained on, found and verified as training does."""
        return dataset_for(self.config, data_dir, offline, progress)

    def runtime(self, device: str = "auto", precision: str = "auto", predicting: bool = False
                ) -> device_mod.Runtime:
        """How to run the model: as fast as this machine can (predicting), or in the memory layout training
        evaluated it in where the device is the one it trained on, so that evaluation reproduces
        metrics.json bit for bit (runs trained in fp32 on a CPU before NHWC was chosen there are NCHW;
        the two layouts' probabilities differ in the last bits, within 1e-5)."""
        rt = device_mod.inference_runtime(self.model_info, device, precision)
        trained = self.record.get("environment") or {}
        where_trained = str(trained.get("device", "")).split(":")[0] == rt.device.type \
            and trained.get("precision") == rt.precision
        if not predicting and where_trained and isinstance(trained.get("channels_last"), bool):
            rt = replace(rt, channels_last=trained["channels_last"])
        return rt

    def load_model(self, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
        """The trained model in eval mode (float32 weights as saved) and model.json."""
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run folder")
        return checkpoint.read_model(self.model_json_path, self.weights_path, device)

    # ---- writes (training's; each file replaced whole, never half-written)

    def write_config(self, record: dict[str, Any]) -> None:
        write_json(self.config_path, record)

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        from .atomic import write_text
        write_text(self.history_path, "".join(json.dumps(r) + "\n" for r in rows))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.metrics_path, metrics)

    def save_model(self, model: torch.nn.Module, info: dict[str, Any]) -> None:
        checkpoint.write_model(self.weights_path, self.model_json_path, model, info)

    def discard_unusable(self, remove_folder: bool) -> None:
        """After a failed new run: with no checkpoint to resume and no metrics, its run files describe
        nothing usable, so they go (other files stay), and the folder too when asked and left empty."""
        if self.status != NEW:
            return
        self.discard_model()
        for path in (self.config_path, self.history_path):
            path.unlink(missing_ok=True)
        if remove_folder and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {runlock.LOCK_FILE}:
            (self.path / runlock.LOCK_FILE).unlink(missing_ok=True)  # a writer waiting on it opens it anew
            self.path.rmdir()

    def discard_model(self) -> None:
        """A run killed between writing its model and its metrics is not finished: its model goes (and the
        out-of-distribution detector, temperature and robustness scores that belong to it)."""
        for path in (self.weights_path, self.model_json_path, self.ood_path, self.calibration_path,
                     self.robustness_path):
            path.unlink(missing_ok=True)

    # ---- the out-of-distribution detector (ood.py)

    def read_ood(self, feature_size: int | None = None, num_classes: int | None = None) -> ood.OodDetector:
        """ood.safetensors, checked (schema.ood_file) against the model's feature size and classes, and
        refused when it was fitted to other weights than model.safetensors holds."""
        detector = ood.load(self.ood_path, feature_size, num_classes)
        fitted_to = detector.info.get("model_sha256")
        if fitted_to and self.weights_path.is_file() and fitted_to != _sha256(self.weights_path):
            raise RunError(f"{self.ood_path}: fitted to other weights than {self.weights_path.name} holds; "
                           f"calibrate again with `fashionlab calibrate {self.path}`")
        return detector

    def write_ood(self, detector: ood.OodDetector) -> None:
        ood.save(self.ood_path, detector)

    # ---- the temperature (calibration.py)

    def read_calibration(self) -> calibration.Calibration:
        """calibration.json, checked (schema.calibration), and refused when it was fitted to other weights than
        model.safetensors holds."""
        obj = schema.calibration(read_json(self.calibration_path), str(self.calibration_path))
        fitted_to = obj.get("model_sha256")
        if fitted_to and self.weights_path.is_file() and fitted_to != _sha256(self.weights_path):
            raise RunError(f"{self.calibration_path}: fitted to other weights than {self.weights_path.name} holds; "
                           f"calibrate again with `fashionlab calibrate {self.path}`")
        return calibration.Calibration(float(obj["temperature"]), {k: v for k, v in obj.items() if k != "temperature"})

    def write_calibration(self, fitted: calibration.Calibration) -> None:
        write_json(self.calibration_path, fitted.to_dict())

    # ---- scores on corrupted test images (robustness.py)

    def read_robustness(self) -> dict[str, Any]:
        """robustness.json, checked (schema.robustness), and refused when measured on other weights than
        model.safetensors holds."""
        obj = schema.robustness(read_json(self.robustness_path), str(self.robustness_path))
        measured = obj.get("model_sha256")
        if measured and self.weights_path.is_file() and measured != _sha256(self.weights_path):
            raise RunError(f"{self.robustness_path}: measured on other weights than {self.weights_path.name} holds; "
                           f"measure again with `fashionlab robustness {self.path}`")
        return obj

    def write_robustness(self, result: dict[str, Any]) -> None:
        write_json(self.robustness_path, result)

    def weights_sha256(self) -> str:
        """The SHA-256 of model.safetensors: what the files fitted to the weights record."""
        return _sha256(self.weights_path)


# --------------------------------------------------------------------------- using runs

def evaluate_run(folder: RunFolder, dataset: data_mod.Dataset | None = None, device: str | None = None,
                 precision: str | None = None, data_dir=None, offline: bool | None = None) -> dict[str, Any]:
    """Test metrics recomputed from the saved model, by default on the training settings' device and
    at the recorded precision, so they equal metrics.json; device/precision change that."""
    # Every file of the run is read (and so checked) before the dataset is loaded or anything evaluated.
    cfg, info, _ = folder.config, folder.model_info, folder.metrics
    rt = folder.runtime(device or cfg.device, precision or info.get("precision", "auto"))
    model, _ = folder.load_model(rt.device)
    ds = dataset or folder.dataset(data_dir, offline)
    if list(ds.class_names) != list(info["class_names"]):
        raise RunError(f"{folder.model_json_path}: the run's classes {info['class_names']} differ from the "
                       f"dataset's {list(ds.class_names)}")
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    logits = evaluate.predict_logits(model, ds.test_images, rt, cfg.eval_batch_size, bool(info.get("tta_flip", False)),
                                     int(info.get("tta_shift", 0)))
    metrics = evaluate.compute_metrics(logits, ds.test_labels, ds.class_names)
    return {**metrics, "calibration": calibration_scores(folder, cfg, logits, ds.test_labels)}


def calibration_scores(folder: RunFolder, cfg: TrainConfig, test_logits: torch.Tensor, test_labels: np.ndarray
                       ) -> dict[str, Any]:
    """The run's temperature and, on the test images it was not fitted on, ECE, NLL and reliability bins before
    and after it; for a run without calibration.json, {"temperature": None, "note": how to fit it}."""
    if not folder.calibration_path.exists():
        return {"temperature": None, "note": f"not calibrated: fit the temperature with `fashionlab calibrate "
                                             f"{folder.path}`"}
    fitted = folder.read_calibration()
    unseen = unseen_test_images(cfg, test_labels)
    scores = calibration.before_and_after(test_logits[unseen], test_labels[unseen], fitted.temperature)
    return {"temperature": fitted.temperature, "fitted_on": fitted.info["fitted_on"],
            "measured_on": fitted.info["measured_on"], **scores}


def unseen_test_images(cfg: TrainConfig, test_labels: np.ndarray) -> np.ndarray:
    """Indices of the test images that neither the temperature nor the out-of-distribution threshold saw:
    all of them for a run with validation images, else the half ood.split_test_set holds out."""
    if cfg.val_split > 0:
        return np.arange(len(test_labels))
    return ood.split_test_set(test_labels)[1]


def matches_record(folder: RunFolder, metrics: dict[str, Any]) -> bool:
    """Whether recomputed metrics equal the stored metrics.json (accuracy exactly, loss to 1e-6)."""
    ref = folder.metrics
    return abs(ref["test_accuracy"] - metrics["test_accuracy"]) < 1e-9 and abs(ref["test_loss"] - metrics["test_loss"]) < 1e-6


# --------------------------------------------------------------------------- the out-of-distribution detector

ood_log = logging.getLogger("fashionlab.ood")


def _held_out(folder: RunFolder, dataset: data_mod.Dataset | None, device: str, data_dir, offline: bool | None,
              loaded: tuple[torch.nn.Module, device_mod.Runtime] | None):
    """What fitting the temperature or the detector needs: the settings, the model as predictors run it
    (`loaded`, else the run's on `device` at the recorded precision), the run's held-out images
    (ood_images) and its test-time augmentation (flip, shift)."""
    cfg, info = folder.require_finished().config, folder.model_info
    model, rt = loaded if loaded else load_for_inference(folder, device)
    ds = dataset or folder.dataset(data_dir, offline)
    if list(ds.class_names) != list(info["class_names"]):
        raise RunError(f"{folder.model_json_path}: the run's classes {info['class_names']} differ from the "
                       f"dataset's {list(ds.class_names)}")
    tta = bool(info.get("tta_flip", False)), int(info.get("tta_shift", 0))
    return cfg, model, rt, ood_images(cfg, ds), tta


def calibrate_ood(folder: RunFolder, dataset: data_mod.Dataset | None = None,
                  false_alarm_rate: float = ood.DEFAULT_FALSE_ALARM_RATE, device: str = "auto", data_dir=None,
                  offline: bool | None = None, loaded: tuple[torch.nn.Module, device_mod.Runtime] | None = None,
                  write: bool = True) -> ood.OodDetector:
    """Fit the run's out-of-distribution detector and calibrate its threshold (ood.py), and write
    RUN/ood.safetensors (unless write=False).

    Fitted on at most ood.FIT_IMAGES of the run's training images (stratified, never its validation
    images); the threshold is set for `false_alarm_rate` on the validation images, or, for a run
    without them, on one half of the test set; the rate is then measured on the test images not used.
    The features come from the model as predictors run it (`loaded`: a model and runtime already
    loaded; else the run's, on `device` at the recorded precision)."""
    ood.check_rate(false_alarm_rate)
    cfg, model, rt, images, tta = _held_out(folder, dataset, device, data_dir, offline, loaded)

    def features_of(batch):
        return evaluate.predict_outputs(model, batch, rt, cfg.eval_batch_size, *tta, features=True)[1].numpy()

    try:
        detector = ood.calibrate(features_of, images.fit_images, images.fit_labels, images.calibration,
                                 images.measure, false_alarm_rate,
                                 about={"calibrated_on": images.calibrated_on, "measured_on": images.measured_on,
                                        "precision": rt.precision, "model_sha256": _sha256(folder.weights_path)})
    except ValueError as e:  # a model without a linear last layer has no features to score
        raise ood.OodError(str(e)) from None
    if write:
        with runlock.writing(folder.path):
            folder.write_ood(detector)
    return detector


@dataclass
class OodImages:
    """The images a run's detector is fitted, calibrated and measured on (all in-distribution); its
    temperature is fitted on the same held-out images (`calibration`) and measured on the same others."""
    fit_images: torch.Tensor  # uint8 (N, 1, 28, 28): at most ood.FIT_IMAGES training images, stratified
    fit_labels: np.ndarray
    calibration: torch.Tensor | np.ndarray  # the validation images, or one half of the test set
    calibration_labels: np.ndarray
    measure: np.ndarray  # the test images not in `calibration`
    measure_labels: np.ndarray
    calibrated_on: str
    measured_on: str


def ood_images(cfg: TrainConfig, ds: data_mod.Dataset) -> OodImages:
    """The run's own split (split_data: its validation images stay held out): the detector is fitted on
    its training images, calibrated on its validation images, or without them on one half of the test
    set (ood.split_test_set), and measured on the test images left."""
    split = split_data(cfg, ds, torch.device("cpu"))
    labels = split.Y.numpy()
    fit = ood.fit_subset(labels)
    if split.n_val:
        return OodImages(split.X[fit], labels[fit], split.Xv, split.Yv.numpy(), ds.test_images, ds.test_labels,
                         ood.ON_VALIDATION, "test images")
    calibration, held_out = ood.split_test_set(ds.test_labels)
    return OodImages(split.X[fit], labels[fit], ds.test_images[calibration], ds.test_labels[calibration],
                     ds.test_images[held_out], ds.test_labels[held_out], ood.ON_TEST_HALF,
                     "test images (the other half)")


# --------------------------------------------------------------------------- the temperature

def calibrate_temperature(folder: RunFolder, dataset: data_mod.Dataset | None = None, device: str = "auto",
                          data_dir=None, offline: bool | None = None,
                          loaded: tuple[torch.nn.Module, device_mod.Runtime] | None = None,
                          write: bool = True) -> calibration.Calibration:
    """Fit the run's temperature (calibration.py) and write RUN/calibration.json (unless write=False).

    Fitted on the held-out images the out-of-distribution threshold uses (ood_images: the validation
    images, or for a run without them one half of the test set), and measured, ECE and NLL before and
    after, on test images it never saw (all of them, or the other half). The logits come from the model
    as predictors run it (`loaded`, else the run's on `device` at the recorded precision)."""
    cfg, model, rt, images, tta = _held_out(folder, dataset, device, data_dir, offline, loaded)

    def logits_of(batch):
        return evaluate.predict_logits(model, batch, rt, cfg.eval_batch_size, *tta)

    fitted = calibration.fit(logits_of(images.calibration), images.calibration_labels, logits_of(images.measure),
                             images.measure_labels,
                             about={"fitted_on": images.calibrated_on, "measured_on": images.measured_on,
                                    "precision": rt.precision, "model_sha256": _sha256(folder.weights_path)})
    if write:
        with runlock.writing(folder.path):
            folder.write_calibration(fitted)
    return fitted


def describe_calibration(fitted: calibration.Calibration) -> str:
    """One line: the temperature, what it was fitted on, and the ECE before and after where it was measured."""
    i = fitted.info
    return (f"temperature {fitted.temperature:.4g} fitted on {i['fit_images']:,} {i['fitted_on']}; ECE "
            f"{i['ece_before']:.4f} -> {i['ece_after']:.4f} on {i['measured_images']:,} {i['measured_on']}")


calibration_log = logging.getLogger("fashionlab.calibration")


def load_temperature(folder: RunFolder) -> tuple[float, str]:
    """(temperature, "") from RUN/calibration.json; for a run made before it existed (1.0, why), the reason
    logged once as a warning: its probabilities are served as the model gives them."""
    if folder.calibration_path.exists():
        return folder.read_calibration().temperature, ""
    note = (f"{folder.calibration_path}: not found (the run was made before calibrated probabilities); "
            f"probabilities are the model's own, uncalibrated: fit the temperature with "
            f"`fashionlab calibrate {folder.path}` where its dataset is")
    calibration_log.warning("%s", note)
    return 1.0, note


def describe_ood(detector: ood.OodDetector) -> str:
    """One line: the threshold, what it was calibrated on and the false-alarm rate measured."""
    i = detector.info
    line = (f"out-of-distribution threshold {detector.threshold:.4g} for {i['false_alarm_rate']:.1%} false alarms, "
            f"calibrated on {i['calibration_images']:,} {i['calibrated_on']}")
    if i.get("measured_false_alarm_rate") is not None:
        line += (f"; {i['measured_false_alarm_rate']:.1%} measured on {i.get('measured_images', 0):,} "
                 f"{i.get('measured_on')}")
    return line + f" (fitted on {i['fit_images']:,} training images, {i['feature_size']} features)"


def load_ood(folder: RunFolder, feature_size: int | None, num_classes: int | None, calibrate_missing: bool = True,
             loaded: tuple[torch.nn.Module, device_mod.Runtime] | None = None,
             data_dir=None) -> tuple[ood.OodDetector | None, str]:
    """(detector, "") from RUN/ood.safetensors; for a run made before it existed, the detector calibrated
    now (and kept in the run folder where it can be written) when calibrate_missing and the run's dataset
    is on this machine; otherwise (None, why), and the reason is logged once, as a warning."""
    if folder.ood_path.exists():
        return folder.read_ood(feature_size, num_classes), ""
    missing = f"{folder.ood_path}: not found (the run was made before out-of-distribution scores)"
    fix = f"run `fashionlab calibrate {folder.path}` where its dataset is"
    if not calibrate_missing or not (folder.finished and folder.weights_path.is_file()):
        return _no_ood(f"{missing}; predictions carry no ood_score or unsure flag: {fix}")
    try:
        ds = folder.dataset(data_dir, offline=True)
    except UserError as e:
        return _no_ood(f"{missing}, and its dataset is not on this machine to calibrate it ({_first_line(e)}); "
                       f"predictions carry no ood_score or unsure flag: {fix}")
    ood_log.warning("%s; calibrating it now on the run's dataset (once)", missing)
    try:
        detector = calibrate_ood(folder, ds, loaded=loaded, write=False)
    except UserError as e:  # the dataset found is not the run's, the features cannot be fitted, ...
        return _no_ood(f"{folder.path}: no out-of-distribution detector: {_first_line(e)}; "
                       f"predictions carry no ood_score or unsure flag")
    try:
        with runlock.writing(folder.path):
            folder.write_ood(detector)
    except (OSError, runlock.RunBusy) as e:  # a read-only model folder (a container's, say), or one another
        # process is writing: the detector serves this process only
        ood_log.warning("%s: not kept (%s); it is calibrated again next time", folder.ood_path, _first_line(e))
    return detector, ""


def _no_ood(reason: str) -> tuple[None, str]:
    ood_log.warning("%s", reason)
    return None, reason


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def load_for_inference(folder: RunFolder, device: str = "auto", precision: str = "auto"
                       ) -> tuple[torch.nn.Module, device_mod.Runtime]:
    """The model as a predictor runs it: on `device`, at `precision` ("auto": the recorded precision
    where the device runs it natively, else fp32), in the fastest layout (NHWC for conv models on a CPU)."""
    rt = folder.runtime(device, precision, predicting=True)
    model, _ = folder.load_model(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, rt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- making runs

def default_run_dir(model: str) -> Path:
    """runs/<time>-<model>, with -2, -3, ... when a run of that model started in the same second
    (short runs one after the other, from a script), which would otherwise be refused as existing."""
    base = Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{model}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def train_run(cfg: TrainConfig, out: str | Path | None = None, dataset: DatasetArg = None,
              callbacks: Sequence[Callback] = (), quiet: bool = False, data_dir=None,
              offline: bool | None = None, calibrate: bool = True) -> RunFolder:
    """Train cfg into a new run folder (default runs/<time>-<model>); returns the finished run.
    Another process writing into that folder is refused at once (runlock.RunBusy).
    calibrate=False leaves out the temperature and the out-of-distribution detector (`fashionlab
    calibrate` fits them later): for a benchmark's throwaway runs, where they cost as much as a short
    training."""
    cfg.validate()
    folder = RunFolder(out or default_run_dir(cfg.model))
    created = not folder.path.exists()
    with runlock.writing(folder.path, create=True):  # the check and the training are one step: no one else writes here
        if folder.model_json_path.exists():
            raise FileExistsError(f"{folder.path} already holds a finished run; choose another --out")
        if folder.checkpoint_path.exists():
            raise FileExistsError(f"{folder.path} holds an interrupted run; continue it with --resume {folder.path}")
        return _train(cfg, folder, dataset, callbacks, quiet, data_dir, offline, resume=False, created=created,
                      calibrate=calibrate)


def resume_run(path: str | Path, dataset: DatasetArg = None, callbacks: Sequence[Callback] = (),
               quiet: bool = False, data_dir=None, offline: bool | None = None) -> RunFolder:
    """Continue an interrupted run from its checkpoint, with its recorded settings."""
    folder = RunFolder(path)
    if not folder.path.is_dir():
        raise RunError(f"{folder.path}: no such run folder")
    with runlock.writing(folder.path):
        if folder.status == FINISHED:
            raise RunError(f"{folder.path} is already finished (metrics.json exists); nothing to resume")
        if folder.status == NEW:
            raise RunError(f"{folder.checkpoint_path}: no checkpoint to resume from")
        cfg = folder.config  # validated, model_args included, as `train` validates them
        # What the settings make a resume read beyond what load_state checks against the model and optimiser
        schema.check_resume(folder.checkpoint_path, cfg)
        return _train(cfg, folder, dataset, callbacks, quiet, data_dir, offline, resume=True)


def train_or_reuse(cfg: TrainConfig, path: str | Path, dataset: DatasetArg = None,
                   callbacks: Sequence[Callback] = (), quiet: bool = True, data_dir=None,
                   offline: bool | None = None, wait: Callable[[str], None] | None = None
                   ) -> tuple[RunFolder, str]:
    """The run of cfg in path: reused when finished, resumed when interrupted, trained when new.
    A folder holding a run of other settings is an error, never overwritten.
    Another process writing into path (training the same run, say) is refused at once (RunBusy); with
    `wait` (a function given one line to log) this waits for it, says so once, then looks again: a
    run the other process finished is reused.
    Returns the folder and what was done: "reused", "resumed" or "trained"."""
    folder = RunFolder(path)
    if folder.finished:  # reading a finished run needs no lock
        folder.check_same_settings(cfg)
        return folder, "reused"
    created = not folder.path.exists()
    on_wait = (lambda holder: wait(f"{folder.path} is being written by {runlock.describe_holder(holder)}; "
                                   f"waiting for it to finish")) if wait else None
    with runlock.writing(folder.path, wait=bool(wait), on_wait=on_wait, create=True):
        if folder.config_path.exists():
            folder.check_same_settings(cfg)
        status = folder.status
        if status == FINISHED:
            return folder, "reused"
        if status == INTERRUPTED:
            return resume_run(path, dataset, callbacks, quiet, data_dir, offline), "resumed"
        folder.discard_model()
        return _train(cfg, folder, dataset, callbacks, quiet, data_dir, offline, resume=False,
                      created=created), "trained"


def _train(cfg: TrainConfig, folder: RunFolder, dataset: DatasetArg, callbacks: Sequence[Callback], quiet: bool,
           data_dir, offline, resume: bool, created: bool = False, calibrate: bool = True) -> RunFolder:
    """Train under the folder's writer lock (the caller holds it). `created`: the folder was made for
    this run, so a new run that fails takes it away again when nothing else is in it."""
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))  # flushed: lines reach a log as they happen
    try:
        ds = _dataset(dataset, cfg, data_dir, offline, log)
        cbs = list(callbacks) + ([] if quiet else [ProgressBar()])
        Trainer.set_up(cfg, folder, ds, cbs, log, resume=resume).run(resume=resume)
    except OutputError as e:  # a full disk, a folder made read-only: say what is kept and how to go on
        if not folder.finished:
            folder.discard_model()  # a model written before its metrics failed is not a finished run
        if not resume:
            folder.discard_unusable(remove_folder=created)
        raise e.with_note(what_is_kept(folder, e)) from None
    except BaseException:
        if not resume:
            folder.discard_unusable(remove_folder=created)
        raise
    if calibrate:
        _calibrate_finished(folder, ds, log)
    return folder


def what_is_kept(folder: RunFolder, e: OutputError) -> str:
    """After a write into a training run failed: what is left of it and the command that goes on."""
    until = "once there is space" if e.disk_full else "once the folder can be written"
    if folder.status == INTERRUPTED:
        try:
            epochs = f"of epoch {schema.checkpoint_state(folder.checkpoint_path)['epoch']} "
        except UserError:
            epochs = ""
        return (f"the checkpoint {epochs}is kept; `fashionlab train --resume {folder.path}` continues {until}")
    if folder.finished:  # a callback's write at the end of training failed: the run itself is whole
        return f"the run is finished and kept in {folder.path}"
    return f"no checkpoint had been written yet, so nothing is kept: train again {until}"


def _calibrate_finished(folder: RunFolder, ds: data_mod.Dataset, log: Callable[..., None]) -> None:
    """The finished run's temperature and out-of-distribution detector (after the test evaluation, which
    they leave as it was). A model whose logits or features cannot be fitted keeps its run; its
    probabilities then stay uncalibrated, or its predictions carry no score."""
    try:
        _fit_temperature(folder, ds, log)
        _fit_ood(folder, ds, log)
    except OutputError as e:
        raise e.with_note(f"the run is finished and kept; `fashionlab calibrate {folder.path}` fits its temperature "
                          f"and out-of-distribution detector {'once there is space' if e.disk_full else 'later'}"
                          ) from None


def _fit_temperature(folder: RunFolder, ds: data_mod.Dataset, log: Callable[..., None]) -> None:
    try:
        fitted = calibrate_temperature(folder, ds)
    except calibration.CalibrationError as e:
        log(f"no temperature: {e}")
        return
    log(describe_calibration(fitted) + f" -> {folder.calibration_path}")


def _fit_ood(folder: RunFolder, ds: data_mod.Dataset, log: Callable[..., None]) -> None:
    try:
        detector = calibrate_ood(folder, ds)
    except ood.OodError as e:
        log(f"no out-of-distribution detector: {e}")
        return
    log(describe_ood(detector) + f" -> {folder.ood_path}")


def dataset_for(cfg: TrainConfig, data_dir=None, offline: bool | None = None, progress=None) -> data_mod.Dataset:
    """The dataset cfg trains on (a custom IDX dataset when it names classes), found and verified."""
    return data_mod.load(data_mod.spec_for(cfg.dataset, cfg.class_names), data_dir=data_dir, offline=offline,
                         progress=progress)


def _dataset(dataset: DatasetArg, cfg: TrainConfig, data_dir, offline, log) -> data_mod.Dataset:
    if isinstance(dataset, data_mod.Dataset):
        return dataset
    return dataset() if callable(dataset) else dataset_for(cfg, data_dir, offline, log)

