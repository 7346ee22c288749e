"""A run is a folder; this module owns it.

    config.json        every training setting, the environment and the data source
    history.jsonl      one line per epoch
    checkpoint.safetensors   present only while a run is interrupted (resume continues it)
    model.safetensors  the weights (never a pickle) and model.json, their description
    metrics.json       test metrics: written last, so its presence means "finished"
    report.html        the run's report

`RunFolder` reads and writes those files and knows a run's status, its settings and what
"the same settings" means. Every file is checked as it is read (schema.py: types, ranges, sizes,
and the weights against the model their description builds), so a damaged or tampered folder is
refused with one line naming the file and the field, whoever reads it. `train_run`, `resume_run`
and `train_or_reuse` are the one way to make a run: the CLI, studies, sweeps, benchmarks and the
public API all go through them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import checkpoint, data as data_mod, device as device_mod, evaluate, schema
from .checkpoint import write_json
from .schema import RunError, read_json
from .config import TrainConfig, settings_of
from .training import Callback, ProgressBar, Trainer

CONFIG = "config.json"
HISTORY = "history.jsonl"
METRICS = "metrics.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_JSON = "model.json"
CHECKPOINT = "checkpoint.safetensors"
REPORT = "report.html"

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

    def runtime(self, device: str = "auto", precision: str = "auto") -> device_mod.Runtime:
        return device_mod.inference_runtime(self.model_info, device, precision)

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
        if remove_folder and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def discard_model(self) -> None:
        """A run killed between writing its model and its metrics is not finished: its model goes."""
        for path in (self.weights_path, self.model_json_path):
            path.unlink(missing_ok=True)


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
    return evaluate.evaluate_model(model, ds.test_images, ds.test_labels, ds.class_names, rt, cfg.eval_batch_size,
                                   bool(info.get("tta_flip", False)), int(info.get("tta_shift", 0)))


def matches_record(folder: RunFolder, metrics: dict[str, Any]) -> bool:
    """Whether recomputed metrics equal the stored metrics.json (accuracy exactly, loss to 1e-6)."""
    ref = folder.metrics
    return abs(ref["test_accuracy"] - metrics["test_accuracy"]) < 1e-9 and abs(ref["test_loss"] - metrics["test_loss"]) < 1e-6


# --------------------------------------------------------------------------- making runs

def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{model}"


def train_run(cfg: TrainConfig, out: str | Path | None = None, dataset: DatasetArg = None,
              callbacks: Sequence[Callback] = (), quiet: bool = False, data_dir=None,
              offline: bool | None = None) -> RunFolder:
    """Train cfg into a new run folder (default runs/<time>-<model>); returns the finished run."""
    cfg.validate()
    folder = RunFolder(out or default_run_dir(cfg.model))
    if folder.model_json_path.exists():
        raise FileExistsError(f"{folder.path} already holds a finished run; choose another --out")
    if folder.checkpoint_path.exists():
        raise FileExistsError(f"{folder.path} holds an interrupted run; continue it with --resume {folder.path}")
    return _train(cfg, folder, dataset, callbacks, quiet, data_dir, offline, resume=False)


def resume_run(path: str | Path, dataset: DatasetArg = None, callbacks: Sequence[Callback] = (),
               quiet: bool = False, data_dir=None, offline: bool | None = None) -> RunFolder:
    """Continue an interrupted run from its checkpoint, with its recorded settings."""
    folder = RunFolder(path)
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
                   offline: bool | None = None) -> tuple[RunFolder, str]:
    """The run of cfg in path: reused when finished, resumed when interrupted, trained when new.
    A folder holding a run of other settings is an error, never overwritten.
    Returns the folder and what was done: "reused", "resumed" or "trained"."""
    folder = RunFolder(path)
    if folder.config_path.exists():
        folder.check_same_settings(cfg)
    status = folder.status
    if status == FINISHED:
        return folder, "reused"
    if status == INTERRUPTED:
        return resume_run(path, dataset, callbacks, quiet, data_dir, offline), "resumed"
    folder.discard_model()
    return _train(cfg, folder, dataset, callbacks, quiet, data_dir, offline, resume=False), "trained"


def _train(cfg: TrainConfig, folder: RunFolder, dataset: DatasetArg, callbacks: Sequence[Callback], quiet: bool,
           data_dir, offline, resume: bool) -> RunFolder:
    created = not folder.path.exists()
    folder.path.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))  # flushed: lines reach a log as they happen
    try:
        ds = _dataset(dataset, cfg, data_dir, offline, log)
        cbs = list(callbacks) + ([] if quiet else [ProgressBar()])
        Trainer.set_up(cfg, folder, ds, cbs, log, resume=resume).run(resume=resume)
    except BaseException:
        if not resume:
            folder.discard_unusable(remove_folder=created)
        raise
    return folder


def dataset_for(cfg: TrainConfig, data_dir=None, offline: bool | None = None, progress=None) -> data_mod.Dataset:
    """The dataset cfg trains on (a custom IDX dataset when it names classes), found and verified."""
    return data_mod.load(data_mod.spec_for(cfg.dataset, cfg.class_names), data_dir=data_dir, offline=offline,
                         progress=progress)


def _dataset(dataset: DatasetArg, cfg: TrainConfig, data_dir, offline, log) -> data_mod.Dataset:
    if isinstance(dataset, data_mod.Dataset):
        return dataset
    return dataset() if callable(dataset) else dataset_for(cfg, data_dir, offline, log)

