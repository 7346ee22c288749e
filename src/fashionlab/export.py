"""ONNX export with a parity check, and an ONNX Runtime predictor that serves the exported file.

The ONNX graph takes what every fashionlab model takes, float pixels in [0, 1] of shape
(batch, 1, 28, 28), with a dynamic batch dimension; normalisation (and any resize) is inside
the graph, and recorded in the metadata with the class names. It returns logits and
probabilities. A file is only written after it matched PyTorch on real test images.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, run, schema
from .run import RunFolder
from .device import resolve
from .predict import Predictor
from .atomic import atomic_write, write_bytes
from .evaluate import tta_logits
from .errors import UserError

ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAMES = "pixels", ("logits", "probabilities")
OPSET = 17
PARITY_IMAGES, PARITY_TOLERANCE = 1000, 1e-4


class ExportError(UserError):
    """The export failed its parity check or could not be produced; nothing was written."""


class _Exported(torch.nn.Module):
    """The model as served: logits averaged over the run's test-time augmentation, and softmax."""

    def __init__(self, model: torch.nn.Module, tta_flip: bool, tta_shift: int):
        super().__init__()
        self.model, self.tta_flip, self.tta_shift = model, tta_flip, tta_shift

    def forward(self, pixels: torch.Tensor):
        logits = tta_logits(self.model, pixels, self.tta_flip, self.tta_shift)
        return logits, torch.softmax(logits, 1)


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
    """Compare ONNX Runtime with PyTorch (fp32, CPU) on uint8 images: max |dp| and top-1 agreement."""
    torch_probs = reference.probabilities(images)
    onnx_probs = OnnxPredictor(onnx_blob, reference.class_names, reference.info).probabilities(images)
    same = torch_probs.argmax(1) == onnx_probs.argmax(1)
    return {"images": int(len(images)), "max_abs_prob_diff": float(np.abs(torch_probs - onnx_probs).max()),
            "top1_mismatches": int((~same).sum())}


def export_onnx(run_dir: str | Path, images: np.ndarray, out: str | Path | None = None,
                tolerance: float = PARITY_TOLERANCE) -> dict[str, Any]:
    """Export a run to ONNX, check it against PyTorch on `images` (uint8, (N, 28, 28)), write it atomically.

    Raises ExportError, writing nothing, when any top-1 differs or a probability differs by more
    than `tolerance`. Returns the parity figures and the path written.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / ONNX_FILE
    model, info = RunFolder(run_dir).load_model()  # fp32 on CPU: the reference the file must match
    reference = Predictor(model, info, resolve("cpu", "fp32", conv_model=False))
    if len(images) == 0:
        raise ExportError("parity check needs at least one test image")
    try:
        blob = _to_onnx_bytes(_Exported(model, reference.tta_flip, reference.tta_shift).eval())
    except Exception as e:
        raise ExportError(f"{run_dir}: {info['architecture'].get('name')} could not be exported to ONNX ({e})") from None
    result = parity(reference, blob, images)
    result["tolerance"] = tolerance
    if result["top1_mismatches"] or not result["max_abs_prob_diff"] <= tolerance:
        raise ExportError(
            f"{run_dir}: ONNX export failed its parity check on {result['images']} images "
            f"(max |dp| {result['max_abs_prob_diff']:.3g}, tolerance {tolerance:g}; "
            f"{result['top1_mismatches']} different top-1); no file written")
    meta = {
        "class_names": json.dumps(info["class_names"]),
        "input": json.dumps({"name": INPUT_NAME, "shape": ["batch", 1, 28, 28], "dtype": "float32",
                             "scale": "uint8 pixel / 255", "layout": "object light on black, as the dataset"}),
        "normalisation": json.dumps({**info.get("input", {}).get("normalisation", {}), "applied": "inside the graph"}),
        "outputs": json.dumps(list(OUTPUT_NAMES)),
        "architecture": json.dumps(info["architecture"]),
        "tta_flip": json.dumps(reference.tta_flip),
        "tta_shift": json.dumps(reference.tta_shift),
        "parity": json.dumps(result),
    }
    blob = _with_metadata(blob, meta)
    write_bytes(out, blob)
    return {**result, "path": str(out), "bytes": len(blob)}


class OnnxPredictor:
    """The same interface as Predictor (probabilities, rank, predict), on ONNX Runtime."""

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
        self.class_names: list[str] = self._class_names(class_names, label)
        self.info = info or {"class_names": self.class_names}

    def _class_names(self, given: list[str] | None, label: str) -> list[str]:
        """The given names or the file's, checked as model.json's are: distinct strings, one per output."""
        meta = self.session.get_modelmeta().custom_metadata_map
        if given is None and "class_names" not in meta:
            raise ExportError(f"{label}: no class_names in its metadata; give them explicitly")
        where = f"{label}: metadata" if given is None else label
        names = schema.check_class_names(list(given) if given is not None else
                                         schema.parse_json(meta["class_names"], f"{where} class_names"), where)
        outputs = self.session.get_outputs()[-1].shape[-1]  # probabilities: (batch, classes)
        if isinstance(outputs, int) and outputs != len(names):
            raise ExportError(f"{where}: {len(names)} class names for {outputs} outputs")
        return names

    @classmethod
    def from_run(cls, run_dir: str | Path, threads: int | None = None) -> "OnnxPredictor":
        run_dir = Path(run_dir)
        path = run_dir / ONNX_FILE if run_dir.is_dir() else run_dir
        if not path.is_file():
            raise ExportError(f"{path}: file not found; create it with `fashionlab export {run_dir} --format onnx`")
        folder = RunFolder(path.parent)
        info = folder.model_info if folder.model_json_path.is_file() else None
        return cls(path, None, info, threads)

    def probabilities(self, batch: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """(N, 28, 28) uint8 -> (N, classes) float32 probabilities."""
        out = []
        for i in range(0, len(batch), batch_size):
            x = np.ascontiguousarray(batch[i: i + batch_size], dtype=np.float32)[:, None] / np.float32(255.0)
            out.append(self.session.run(["probabilities"], {INPUT_NAME: x})[0])
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    # Ranking only needs class names: share the PyTorch predictor's, so both backends answer alike.
    rank = Predictor.rank
    predict = Predictor.predict


# --------------------------------------------------------------------------- SageMaker model archive

PACKAGE_FILES = (run.MODEL_JSON, run.MODEL_WEIGHTS, ONNX_FILE, run.CONFIG, run.METRICS)


def package(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Write the model.tar.gz SageMaker unpacks into /opt/ml/model: the model files at the archive's root.

    model.json and model.safetensors are required (the service and its saliency need them);
    model.onnx is included when the run has been exported, so `serve --backend onnx` works too.
    """
    import tarfile
    run_dir = Path(run_dir)
    RunFolder(run_dir).load_model()  # refuse to package a run that cannot be served
    out = Path(out) if out else run_dir / "model.tar.gz"
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
