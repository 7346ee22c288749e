"""ONNX export with a parity check, and an ONNX Runtime predictor that serves the exported file.

The ONNX graph takes what every fashionlab model takes, float pixels in [0, 1] of shape
(batch, 1, 28, 28), with a dynamic batch dimension; normalisation (and any resize) is inside
the graph, and recorded in the metadata with the class names. It returns logits divided by the
run's temperature (RUN/calibration.json, calibration.py; recorded in the metadata), their softmax,
the calibrated probabilities the PyTorch predictor gives, and the penultimate features (the
input of the model's last linear layer, averaged over the run's test-time augmentation as the
logits are), from which the run's out-of-distribution detector
(RUN/ood.safetensors, ood.py) scores each image as PyTorch does. A file is only written after it
matched PyTorch on real test images.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, run, runlock, schema
from .run import RunFolder
from .device import resolve
from .ood import OodDetector
from .predict import Predictor
from .atomic import atomic_write, write_bytes
from .evaluate import feature_layer, tta_outputs
from .errors import UserError

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAMES = "pixels", ("logits", "probabilities", "features")
OPSET = 17
PARITY_IMAGES, PARITY_TOLERANCE = 1000, 1e-4
# Largest difference of the features allowed, relative to their largest magnitude: a few float32
# roundings, not another computation (measured around 1e-6).
FEATURE_TOLERANCE = 1e-4


class ExportError(UserError):
    """The export failed its parity check or could not be produced; nothing was written."""


class _Exported(torch.nn.Module):
    """The model as served: logits averaged over the run's test-time augmentation and divided by its
    temperature, their softmax, and the penultimate features averaged the same way (tta_outputs)."""

    def __init__(self, model: torch.nn.Module, tta_flip: bool, tta_shift: int, temperature: float = 1.0):
        super().__init__()
        self.model, self.tta_flip, self.tta_shift, self.temperature = model, tta_flip, tta_shift, temperature

    def forward(self, pixels: torch.Tensor):
        logits, features = tta_outputs(self.model, pixels, self.tta_flip, self.tta_shift)
        logits = logits / self.temperature  # folded into the graph: one division
        return logits, torch.softmax(logits, 1), features


def _to_onnx_bytes(module: torch.nn.Module) -> bytes:
    example = torch.rand(2, 1, 28, 28)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            # The TorchScript exporter takes about a second; the dynamo one about half a minute.
            torch.onnx.export(module, (example,), f, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        except Exception:
            f = io.BytesIO()
            torch.onnx.export(module, (example,), f, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes=axes, opset_version=18, dynamo=True)
    return f.getvalue()


def _with_metadata(blob: bytes, props: dict[str, str]) -> bytes:
    import onnx
    proto = onnx.load_from_string(blob)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "fashionlab", __version__
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def parity(reference: Predictor, onnx_blob: bytes, images: np.ndarray) -> dict[str, Any]:
    """Compare ONNX Runtime with PyTorch (fp32, CPU) on uint8 images: max |dp| and top-1 agreement, the
    features' largest difference relative to their largest magnitude, and with the run's
    out-of-distribution detector, the largest score difference and how many unsure flags differ."""
    torch_probs, torch_features = reference.outputs(images)
    onnx_probs, onnx_features = OnnxPredictor(onnx_blob, reference.class_names, reference.info).outputs(images)
    same = torch_probs.argmax(1) == onnx_probs.argmax(1)
    result = {"images": int(len(images)), "max_abs_prob_diff": float(np.abs(torch_probs - onnx_probs).max()),
              "top1_mismatches": int((~same).sum()),
              "max_rel_feature_diff": float(np.abs(torch_features - onnx_features).max()
                                            / max(float(np.abs(torch_features).max()), 1e-12))}
    if reference.ood is not None:
        a, b = reference.ood.scores(torch_features), reference.ood.scores(onnx_features)
        result.update(max_abs_ood_score_diff=float(np.abs(a - b).max()),
                      unsure_mismatches=int((reference.ood.unsure(a) != reference.ood.unsure(b)).sum()))
    return result


def export_onnx(run_dir: str | Path, images: np.ndarray, out: str | Path | None = None,
                tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Export a run to ONNX, check it against PyTorch on `images` (uint8, (N, 28, 28)), write it atomically.

    Raises ExportError, writing nothing, when any top-1 differs or a probability differs by more
    than `tolerance`. Returns the parity figures and the path written.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / ONNX_FILE
    with runlock.writing_into(run_dir, out):  # no other process writes the run folder meanwhile
        return _export_onnx(RunFolder(run_dir), images, out, tolerance)


def _export_onnx(folder: RunFolder, images: np.ndarray, out: Path, tolerance: float) -> dict[str, Any]:
    run_dir = folder.path
    model, info = folder.load_model()  # fp32 on CPU: the reference the file must match
    detector = folder.read_ood(feature_layer(model).in_features, len(info["class_names"])) \
        if folder.ood_path.exists() else None
    temperature, calibration_note = run.load_temperature(folder)
    reference = Predictor(model, info, resolve("cpu", "fp32", conv_model=False), detector,
                          temperature=temperature, calibration_note=calibration_note)
    if len(images) == 0:
        raise ExportError("parity check needs at least one test image")
    try:
        blob = _to_onnx_bytes(_Exported(model, reference.tta_flip, reference.tta_shift, temperature).eval())
    except Exception as e:
        raise ExportError(f"{run_dir}: {info['architecture'].get('name')} could not be exported to ONNX ({e})") from None
    result = parity(reference, blob, images)
    result.update(tolerance=tolerance, feature_tolerance=FEATURE_TOLERANCE)
    if result["top1_mismatches"] or not result["max_abs_prob_diff"] <= tolerance \
            or not result["max_rel_feature_diff"] <= FEATURE_TOLERANCE:
        raise ExportError(
            f"{run_dir}: ONNX export failed its parity check on {result['images']} images "
            f"(max |dp| {result['max_abs_prob_diff']:.3g}, tolerance {tolerance:g}; "
            f"{result['top1_mismatches']} different top-1; features differ by up to "
            f"{result['max_rel_feature_diff']:.3g} of their scale, tolerance {FEATURE_TOLERANCE:g}); no file written")
    meta = {
        "class_names": json.dumps(info["class_names"]),
        "input": json.dumps({"name": INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32",
                             "scale": "uint8 pixel / 255", "layout": "object light on black, as the dataset"}),
        "normalisation": json.dumps({**info.get("input", {}).get("normalisation", {}), "applied": "inside the graph"}),
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "features": json.dumps({"size": feature_layer(model).in_features,
                                "what": "the input of the model's last linear layer, averaged over test-time "
                                        "augmentation; scored by the run's ood.safetensors"}),
        "architecture": json.dumps(info["architecture"]),
        "tta_flip": json.dumps(reference.tta_flip),
        "tta_shift": json.dumps(reference.tta_shift),
        "temperature": json.dumps(temperature),
        "parity": json.dumps(result),
    }
    blob = _with_metadata(blob, meta)
    write_bytes(out, blob)
    return {**result, "path": str(out), "bytes": len(blob)}


class OnnxPredictor:
    """The same interface as Predictor (probabilities, outputs, infer, rank, predict), on ONNX Runtime.
    Out-of-distribution scores need the file's features output and a detector (`attach_ood`; from_run
    loads the run's)."""

    def __init__(self, onnx_blob_or_path: bytes | str | Path, class_names: list[str] | None = None,
                 info: dict[str, Any] | None = None, threads: int | None = None):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # Idle worker threads spin by default: that steals the cores a server's other requests
        # (and other processes) need. Measured in benchmarks/serve_latency.py.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        source = onnx_blob_or_path if isinstance(onnx_blob_or_path, bytes) else str(onnx_blob_or_path)
        label = "ONNX model" if isinstance(source, bytes) else source
        try:
            self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"{label}: cannot be loaded by ONNX Runtime ({e})") from None
        self.label = label
        self.class_names: list[str] = self._class_names(class_names, label)
        self.info = info or {"class_names": self.class_names}
        features = [o for o in self.session.get_outputs() if o.name == "features"]
        # None: a file exported before the features output existed
        self.feature_size: int | str | None = features[0].shape[-1] if features else None
        self.ood: OodDetector | None = None
        # what the graph divides its logits by (files exported before calibration: 1.0, the model's own)
        self.temperature = self._temperature(label)
        self.calibration_note = "" if self.temperature != 1.0 else \
            f"{label}: exported without a temperature; its probabilities are the model's own, uncalibrated"
        self.ood_note = (f"{label} has no features output (exported before out-of-distribution scores); export "
                         f"it again for ood_score and unsure" if not features else "no out-of-distribution detector loaded")

    def attach_ood(self, detector: OodDetector | None, note: str = "") -> None:
        """Score images with `detector` (None: no scores, `note` says why); it must take this file's features."""
        if detector is not None and self.feature_size is None:
            return  # the file cannot give features: ood_note already says so
        if detector is not None and isinstance(self.feature_size, int) and detector.feature_size != self.feature_size:
            raise ExportError(f"{self.label}: gives {self.feature_size} features; the out-of-distribution detector "
                              f"takes {detector.feature_size} (export the run again)")
        self.ood, self.ood_note = detector, ("" if detector else note or self.ood_note)

    def _temperature(self, label: str) -> float:
        """The temperature in the file's metadata, checked as calibration.json's is; 1.0 when there is none."""
        meta = self.session.get_modelmeta().custom_metadata_map
        if "temperature" not in meta:
            return 1.0
        value = schema.parse_json(meta["temperature"], f"{label}: metadata temperature")
        checked = schema.check_fields({"temperature": value}, {"temperature": schema.CALIBRATION["temperature"]},
                                      f"{label}: metadata")
        return float(checked["temperature"])

    def _class_names(self, given: list[str] | None, label: str) -> list[str]:
        """The given names or the file's, checked as model.json's are: distinct strings, one per output."""
        meta = self.session.get_modelmeta().custom_metadata_map
        if given is None and "class_names" not in meta:
            raise ExportError(f"{label}: no class_names in its metadata; give them explicitly")
        where = f"{label}: metadata" if given is None else label
        names = schema.check_class_names(list(given) if given is not None else
                                         schema.parse_json(meta["class_names"], f"{where} class_names"), where)
        probabilities = [o for o in self.session.get_outputs() if o.name == "probabilities"]
        if not probabilities:
            raise ExportError(f"{label}: no 'probabilities' output; not a file `fashionlab export` writes")
        outputs = probabilities[0].shape[-1]  # (batch, classes)
        if isinstance(outputs, int) and outputs != len(names):
            raise ExportError(f"{where}: {len(names)} class names for {outputs} outputs")
        return names

    @classmethod
    def from_run(cls, run_dir: str | Path, threads: int | None = None, data_dir=None) -> "OnnxPredictor":
        run_dir = Path(run_dir)
        path = run_dir / ONNX_FILE if run_dir.is_dir() else run_dir
        if not path.is_file():
            raise ExportError(f"{path}: file not found; create it with `fashionlab export {run_dir} --format onnx`")
        folder = RunFolder(path.parent)
        info = folder.model_info if folder.model_json_path.is_file() else None
        predictor = cls(path, None, info, threads)
        if folder.calibration_path.is_file():
            wanted = folder.read_calibration().temperature
            if wanted != predictor.temperature:
                predictor.calibration_note = (f"{path}: exported with temperature {predictor.temperature:g}, the run's "
                                              f"is {wanted:g} (calibrated since): export it again with "
                                              f"`fashionlab export {folder.path}`")
                run.calibration_log.warning("%s", predictor.calibration_note)
        if predictor.feature_size is not None:
            size = predictor.feature_size if isinstance(predictor.feature_size, int) else None
            predictor.attach_ood(*run.load_ood(folder, size, len(predictor.class_names), data_dir=data_dir))
        return predictor

    def probabilities(self, batch: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, classes) float32 probabilities."""
        return self._run(batch, batch_size, ["probabilities"])[0]

    def outputs(self, batch: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """(N, 28, 28) uint8 -> (probabilities (N, classes), features (N, D)), float32, from the same pass."""
        if self.feature_size is None:
            raise ExportError(self.ood_note)
        probs, features = self._run(batch, batch_size, ["probabilities", "features"])
        return probs, features

    def _run(self, batch: np.ndarray, batch_size: int, names: list[str]) -> list[np.ndarray]:
        """The named outputs for uint8 images, batch_size at a time."""
        if len(batch) == 0:
            widths = {"probabilities": len(self.class_names), "features": self.feature_size}
            return [np.zeros((0, widths[n] if isinstance(widths[n], int) else 0), np.float32) for n in names]
        parts = []
        for i in range(0, len(batch), batch_size):
            x = np.ascontiguousarray(batch[i: i + batch_size], dtype=np.float32)[:, None] / np.float32(255.0)
            parts.append(self.session.run(names, {INPUT_NAME: x}))
        return [np.concatenate(values) for values in zip(*parts)]

    # Scoring and ranking need only these outputs, the detector and the class names: share the PyTorch
    # predictor's, so both backends answer alike.
    infer = Predictor.infer
    rank = Predictor.rank
    predict = Predictor.predict
    ood_status = Predictor.ood_status
    calibration_status = Predictor.calibration_status


# --------------------------------------------------------------------------- SageMaker model archive

PACKAGE_FILES = (run.MODEL_JSON, run.MODEL_WEIGHTS, ONNX_FILE, run.OOD, run.CALIBRATION, run.CONFIG, run.METRICS)


def package(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write the model.tar.gz SageMaker unpacks into /opt/ml/model: the model files at the archive's root.

    model.json and model.safetensors are required (the service and its saliency need them);
    model.onnx is included when the run has been exported, so `serve --backend onnx` works too, and
    ood.safetensors when it exists, so predictions carry their out-of-distribution scores, and
    calibration.json, so the PyTorch backend's probabilities are calibrated (the ONNX file holds its own).
    """
    run_dir = Path(run_dir)
    RunFolder(run_dir).load_model()  # refuse to package a run that cannot be served
    out = Path(out) if out else run_dir / "model.tar.gz"
    with runlock.writing_into(run_dir, out):  # no other process writes the run folder meanwhile
        return _package(run_dir, out)


def _package(run_dir: Path, out: Path) -> dict[str, Any]:
    import tarfile
    present = [name for name in PACKAGE_FILES if (run_dir / name).is_file()]
    with atomic_write(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for name in present:
            info = tar.gettarinfo(str(run_dir / name), arcname=name)
            info.uid = info.gid = 0
            info.mode = 0o644  # readable by whatever user the serving container runs as
            info.uname = info.gname = ""
            with open(run_dir / name, "rb") as fh:
                tar.addfile(info, fh)
    return {"path": str(out), "files": present, "bytes": out.stat().st_size}
