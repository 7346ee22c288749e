"""Experiment tracking: each run's settings, epochs and results in TensorBoard or MLflow.

    tracks = open_tracking(["tensorboard", "mlflow=http://host:5000"], Group.single(out))  # checked now
    with tracks.run(out) as callbacks:          # one logger per tracker, as training Callbacks
        run.train_or_reuse(cfg, out, callbacks=callbacks)

Trackers are fed by training's events (on_train_start, on_epoch_end, on_train_end), so tracking
changes nothing in a run: not its settings, not config.json, not its numbers. A run that was not
trained now (a finished run a study or sweep reuses) is logged from its files, so a study's or
sweep's runs are all there; one logged before is not logged twice.

    tensorboard[=DIR]  event files in DIR/<run> (default: a `tensorboard` folder beside the runs):
                       per epoch loss/accuracy (train, val), lr, images/s; at the end the test
                       metrics, the confusion matrix and curves as images, and the settings as
                       hyperparameters with the final metrics
    mlflow[=URI]       a run in the group's experiment at URI (else $MLFLOW_TRACKING_URI, else
                       sqlite:///<beside the runs>/mlflow.db with artifacts in mlartifacts/): the
                       settings as params, per-epoch metrics with their step, the final metrics,
                       the figures and the run folder's files as artifacts

A study's or sweep's runs are grouped: one TensorBoard subfolder per run under its log folder, and
one MLflow experiment per study or sweep (single runs share the `fashionlab` experiment). An
experiment rather than a parent run with nested runs: it is found or created by name, so parallel
sweep workers (other processes, other machines) and a study resumed days later join it with no
parent run id to hand around, and MLflow compares the runs of one experiment side by side.

Everything that can fail before training does so in `open_tracking`, as one-line TrackingErrors:
an unknown tracker, a missing package, an unwritable folder, an unreachable server. A tracker that
fails later (a server gone mid-run) warns and stops logging that run; training goes on.
"""

from __future__ import annotations

import difflib
import getpass
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .atomic import check_writable
from .config import settings_of
from .errors import UserError
from .run import RunFolder
from .training import Callback, TrainingInterrupted

INSTALL_HINT = "pip install 'fashionlab[track]'"

# (TensorBoard tag, MLflow metric, history row key): what every epoch logs.
EPOCH_SCALARS = (("loss/train", "train_loss", "train_loss"), ("loss/val", "val_loss", "val_loss"),
                 ("accuracy/train", "train_accuracy", "train_accuracy"),
                 ("accuracy/val", "val_accuracy", "val_accuracy"), ("lr", "lr", "lr"),
                 ("speed/images_per_s", "images_per_s", "images_per_s"),
                 ("speed/epoch_seconds", "epoch_seconds", "seconds"))
# The same for the end of a run, from metrics.json.
FINAL_SCALARS = (("test/accuracy", "test_accuracy", "test_accuracy"), ("test/loss", "test_loss", "test_loss"),
                 ("test/ece", "test_ece", "ece"), ("run/train_seconds", "train_seconds", "train_seconds"),
                 ("run/epochs_run", "epochs_run", "epochs_run"))
RUN_KEY_TAG = "fashionlab.run_key"  # which finished run an MLflow run holds: a reused run is logged once
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param's value


class TrackingError(UserError):
    """A tracker that cannot be used: unknown, not installed, or its place cannot be written or reached."""


class TrackingWarning(UserWarning):
    """A tracker failed during a run and stopped logging it; the run itself went on."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _why(e: BaseException) -> str:
    """The reason in an error about a store: for a server that does not answer, the network's own words
    ("Connection refused", "Name or service not known", "timed out"), not the whole request."""
    text = str(e)
    network = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"(Read timed out|timed out)", text)
    return f"the server cannot be reached ({network.group(1).strip()})" if network else _one_line(e)


def redact(uri: str) -> str:
    """A URI as it may be shown: without a password."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)


# --------------------------------------------------------------------------- which trackers

def parse_track(track: str | Sequence[str] | None) -> list[tuple[str, str | None]]:
    """`track` as (name, target) pairs: "tensorboard", "mlflow=URI", comma-separated or a list of them."""
    if track is None:
        return []
    items = [track] if isinstance(track, str) else list(track)
    pairs: list[tuple[str, str | None]] = []
    for item in items:
        if not isinstance(item, str):
            raise TrackingError(f"track={item!r}: expected a tracker name such as 'tensorboard' or 'mlflow=URI'")
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, eq, target = (s.strip() for s in part.partition("="))
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, 1)
                raise TrackingError(f"unknown tracker {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}: "
                                    f"expected {', '.join(f'{n}[={t.target_help}]' for n, t in TRACKERS.items())}")
            if eq and not target:
                raise TrackingError(f"{part!r}: expected {name}={TRACKERS[name].target_help} or {name} alone")
            if any(n == name for n, _ in pairs):
                raise TrackingError(f"tracker {name!r} is given twice")
            pairs.append((name, target or None))
    return pairs


@dataclass(frozen=True)
class Group:
    """Runs that belong together: where they live and what groups them in a tracker."""
    home: Path  # the default TensorBoard folder (home/tensorboard) and MLflow store (home/mlflow.db) go here
    runs: Path  # run folders are named by their path under this one
    experiment: str  # the MLflow experiment

    @classmethod
    def single(cls, run_dir: str | Path) -> "Group":
        """A run trained on its own: beside the other runs (runs/), in the `fashionlab` experiment."""
        parent = Path(run_dir).parent
        return cls(parent, parent, "fashionlab")

    @classmethod
    def study(cls, name: str, folder: str | Path) -> "Group":
        return cls(Path(folder), Path(folder), f"study {name}")

    @classmethod
    def sweep(cls, name: str, folder: str | Path) -> "Group":
        return cls(Path(folder), Path(folder) / "runs", f"sweep {name}")

    def run_name(self, run_dir: str | Path) -> str:
        """cnn/seed-0 in a study, the trial key in a sweep, the folder's name for a run of its own."""
        path = Path(run_dir).resolve()
        with suppress(ValueError):
            return path.relative_to(self.runs.resolve()).as_posix()
        return path.name


# --------------------------------------------------------------------------- one run in one tracker

class RunLogger(Callback):
    """One run in one tracker: fed by training's events, or replayed from a finished run's files.

    A tracker implements begin (settings), epoch (a history row), end (final metrics and figures,
    at the end of training), finish (the run folder's files, once everything that makes a run has
    written them) and abort. Any failure of the tracker warns and stops logging this run, nothing more."""

    tracker = ""

    def __init__(self, name: str, run_dir: Path, figures: RunFigures):
        self.name, self.run_dir, self.figures = name, Path(run_dir), figures
        self.started = self.closed = False

    def begin(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def epoch(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def end(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """The run folder is complete."""

    def abort(self, interrupted: bool) -> None:
        raise NotImplementedError

    def logged_before(self, folder: RunFolder) -> bool:
        """Whether this finished run is already in the tracker (so a reused run is not logged twice)."""
        return False

    # ---- training events

    def on_train_start(self, trainer) -> None:
        self._call(self.begin, trainer.folder.record)
        for row in trainer.state.history:  # a resumed run: the epochs before the interruption
            self._call(self.epoch, row)

    def on_epoch_end(self, trainer, row: dict[str, Any]) -> None:
        self._call(self.epoch, row)

    def on_train_end(self, trainer, metrics: dict[str, Any]) -> None:
        self._call(self.end, metrics, trainer.state.history)

    def on_interrupt(self, trainer) -> None:
        self.stop(interrupted=True)

    # ---- the rest of a run's life

    def replay(self, folder: RunFolder) -> None:
        """Log a finished run from its files, as if it had been tracked while it trained."""
        self._call(self.begin, folder.record)
        for row in folder.history:
            self._call(self.epoch, row)
        self._call(self.end, folder.metrics, folder.history)
        self.complete()

    def complete(self) -> None:
        """After training returned: the run folder holds all its files now."""
        self._call(self.finish)
        self.closed = True

    def stop(self, interrupted: bool) -> None:
        """Training ended without finishing: the tracker's run ends as interrupted or failed."""
        if self.started and not self.closed:
            self.closed = True
            with suppress(Exception):
                self.abort(interrupted)

    def _call(self, step, *args) -> None:
        if self.closed:
            return
        self.started = True
        try:
            step(*args)
        except Exception as e:
            warnings.warn(f"{self.tracker} tracking of {self.run_dir} stopped: {_one_line(e)}; the run goes on and "
                          f"its folder keeps everything", TrackingWarning, stacklevel=2)
            self.stop(interrupted=False)


class RunFigures:
    """The end-of-run figures every tracker of a run shows, as PNG bytes, drawn once for all of them:
    training curves and the confusion matrix."""

    def __init__(self):
        self._pngs: dict[str, bytes] | None = None

    def pngs(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, bytes]:
        if self._pngs is None:
            from . import pages, report
            figures = {"curves": report.curves_figure(history), "confusion_matrix": report.confusion_figure(
                metrics["confusion_matrix"], list(metrics["per_class"]))}
            self._pngs = {name: pages.figure_png(fig) for name, fig in figures.items()}
        return self._pngs


def _final_step(history: list[dict[str, Any]]) -> int:
    return max(len(history), 1)


# --------------------------------------------------------------------------- TensorBoard

class TensorBoardRun(RunLogger):
    tracker = "tensorboard"

    def __init__(self, name: str, run_dir: Path, figures: RunFigures, logdir: Path):
        super().__init__(name, run_dir, figures)
        self.logdir = logdir
        self.writer = None

    def begin(self, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        self.settings = settings_of(record)
        # purge_step=1: TensorBoard drops whatever an earlier attempt at this run logged in this folder
        # (an interrupted run resumed, a run logged again), so the folder reads as one clean run.
        self.writer = SummaryWriter(str(self.logdir), purge_step=1)

    def epoch(self, row: dict[str, Any]) -> None:
        for tag, _, key in EPOCH_SCALARS:
            if key in row:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()  # TensorBoard shows each epoch as it ends

    def end(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        import numpy as np
        from PIL import Image
        from torch.utils.tensorboard.summary import hparams
        step = _final_step(history)
        for tag, _, key in FINAL_SCALARS:
            if metrics.get(key) is not None:
                self.writer.add_scalar(tag, metrics[key], step)
        for name, png in self.figures.pngs(metrics, history).items():
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            self.writer.add_image(f"test/{name}" if name == "confusion_matrix" else name, image, step,
                                  dataformats="HWC")
        # The HParams dashboard: the settings beside the final metrics. hparams() reads only the metrics'
        # names; their values are the scalars of this run.
        shown = [tag for tag, _, _ in FINAL_SCALARS[:2]]
        if history and "val_accuracy" in history[-1]:
            shown.append("accuracy/val")
        for summary in hparams(_hparam_values(self.settings), dict.fromkeys(shown, 0.0)):
            self.writer.file_writer.add_summary(summary, step)
        self.writer.close()

    def abort(self, interrupted: bool) -> None:
        if self.writer is not None:
            self.writer.close()

    def logged_before(self, folder: RunFolder) -> bool:
        # Event files written after the run finished hold its end (a trained run's are written after metrics.json).
        events = list(self.logdir.glob("events.out.tfevents.*")) if self.logdir.is_dir() else []
        return bool(events) and max(p.stat().st_mtime for p in events) >= folder.metrics_path.stat().st_mtime


def _hparam_values(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as TensorBoard hyperparameters: numbers, text and booleans; lists and tables as JSON; unset ones out."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in settings.items() if v is not None}


class TensorBoardTracker:
    name = "tensorboard"
    target_help = "DIR"

    def __init__(self, target: str | None, group: Group):
        self.group = group
        self.root = Path(target) if target else group.home / "tensorboard"

    def check(self) -> None:
        try:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise TrackingError(f"tensorboard: the tensorboard package is not installed: {INSTALL_HINT}") from None
        check_writable(self.root, folder=True)

    def run_logger(self, run_dir: Path, figures: RunFigures) -> TensorBoardRun:
        name = self.group.run_name(run_dir)
        return TensorBoardRun(name, run_dir, figures, self.root / name)


# --------------------------------------------------------------------------- MLflow

class MlflowRun(RunLogger):
    tracker = "mlflow"

    def __init__(self, name: str, run_dir: Path, figures: RunFigures, client, experiment_id: str):
        super().__init__(name, run_dir, figures)
        self.client, self.experiment_id = client, experiment_id
        self.run_id: str | None = None

    def begin(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Param
        tags = {"fashionlab.run_dir": str(self.run_dir.resolve()), "fashionlab.host": socket.gethostname(),
                "mlflow.source.name": "fashionlab", "mlflow.user": _user(),
                **{f"environment.{k}": str(v) for k, v in (record.get("environment") or {}).items()},
                **({"data.source": str(record["data"].get("source"))} if isinstance(record.get("data"), dict) else {})}
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.name, tags=tags).info.run_id
        self.client.log_batch(self.run_id, params=[Param(k, _param_text(v)) for k, v in settings_of(record).items()])

    def epoch(self, row: dict[str, Any]) -> None:
        self._log_metrics(row, EPOCH_SCALARS, row["epoch"])

    def end(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        self._log_metrics(metrics, FINAL_SCALARS, _final_step(history))
        with tempfile.TemporaryDirectory(prefix="fashionlab-figures-") as tmp:
            for name, png in self.figures.pngs(metrics, history).items():
                (Path(tmp) / f"{name}.png").write_bytes(png)
            self.client.log_artifacts(self.run_id, tmp, "figures")

    def finish(self) -> None:
        # The run folder as it is once finished and written (temporary and hidden files left out).
        for path in sorted(p for p in self.run_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.run_dir)
            if not any(part.startswith(".") for part in rel.parts):
                self.client.log_artifact(self.run_id, str(path), rel.parent.as_posix() if rel.parent.parts else None)
        self.client.set_tag(self.run_id, RUN_KEY_TAG, _run_key(RunFolder(self.run_dir)))
        self.client.set_terminated(self.run_id, "FINISHED")

    def abort(self, interrupted: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "KILLED" if interrupted else "FAILED")

    def logged_before(self, folder: RunFolder) -> bool:
        found = self.client.search_runs([self.experiment_id], max_results=1, filter_string=(
            f"tags.`{RUN_KEY_TAG}` = '{_run_key(folder)}' and attributes.status = 'FINISHED'"))
        return bool(found)

    def _log_metrics(self, values: dict[str, Any], names, step: int) -> None:
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(values[key]), now, step)
                                                    for _, name, key in names if values.get(key) is not None])


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."


def _run_key(folder: RunFolder) -> str:
    """Names one finished run: this host's folder and its metrics.json (a run trained again differs)."""
    h = hashlib.sha256(f"{socket.gethostname()}:{folder.path.resolve()}\0".encode())
    h.update(folder.metrics_path.read_bytes())
    return h.hexdigest()[:32]


def _user() -> str:
    with suppress(Exception):
        return getpass.getuser()
    return "unknown"


@contextmanager
def _fail_fast():
    """No retries and a short timeout while checking the store: an unreachable server fails in seconds,
    not after MLflow's minutes of back-off. Values the user set are kept."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    added = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class MlflowTracker:
    name = "mlflow"
    target_help = "URI"

    def __init__(self, target: str | None, group: Group):
        self.group = group
        # MLflow 3 refuses its old folder store (./mlruns); its own default is a SQLite database.
        self.uri = (target or os.environ.get("MLFLOW_TRACKING_URI")
                    or f"sqlite:///{(group.home / 'mlflow.db').resolve()}")
        self.client = self.experiment_id = None

    @property
    def database(self) -> Path | None:
        """The SQLite file of a local store (None for a server or another database)."""
        return Path(self.uri[len("sqlite:///"):].split("?")[0]) if self.uri.startswith("sqlite:///") else None

    @property
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its files: mlartifacts/ beside a SQLite database (MLflow's own
        default is ./mlruns in whatever folder the command ran from); a server decides for itself."""
        return (self.database.parent / "mlartifacts").resolve().as_uri() if self.database else None

    def check(self) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise TrackingError(f"mlflow: the mlflow package is not installed: {INSTALL_HINT}") from None
        if self.database:  # the database and the artifacts beside it are written there
            check_writable(self.database.parent, folder=True)
        with _fail_fast():
            try:
                self.client = MlflowClient(tracking_uri=self.uri)
                self.experiment_id = self._experiment()
            except TrackingError:
                raise
            except Exception as e:
                raise TrackingError(f"mlflow: cannot use the tracking store at {redact(self.uri)}: {_why(e)}") \
                    from None

    def _experiment(self) -> str:
        """The group's experiment, created when missing (another worker may be creating it at the same time)."""
        name = self.group.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=self.artifact_location)
            except Exception:
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"mlflow: the experiment {name!r} at {redact(self.uri)} is deleted; restore it "
                                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or remove it "
                                f"for good")
        return exp.experiment_id

    def run_logger(self, run_dir: Path, figures: RunFigures) -> MlflowRun:
        return MlflowRun(self.group.run_name(run_dir), run_dir, figures, self.client, self.experiment_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


# --------------------------------------------------------------------------- a session

@dataclass
class Tracking:
    """The trackers asked for, opened and checked: `run(run_dir)` gives each run its loggers."""
    group: Group | None = None
    trackers: list = field(default_factory=list)
    specs: list[str] = field(default_factory=list)  # as given ("mlflow=URI"), for worker processes

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @contextmanager
    def run(self, run_dir: str | Path) -> Iterator[list[Callback]]:
        """Callbacks that log the run trained in the block. A run the block did not train (a finished
        run reused) is logged from its files, unless a tracker already holds it; a block that raises
        ends the tracker's run as interrupted or failed."""
        figures = RunFigures()
        loggers = [t.run_logger(Path(run_dir), figures) for t in self.trackers]
        try:
            yield loggers
        except BaseException as e:
            for logger in loggers:
                logger.stop(interrupted=isinstance(e, (TrainingInterrupted, KeyboardInterrupt)))
            raise
        folder = RunFolder(run_dir)
        for logger in loggers:
            if logger.started:
                logger.complete()  # trained in the block, which wrote everything a run holds
            elif folder.finished and not _quietly(logger.logged_before, folder):
                logger.replay(folder)


def _quietly(check, folder: RunFolder) -> bool:
    """A failed look-up counts as not logged: logging again beats a run missing from its group."""
    try:
        return check(folder)
    except Exception:
        return False


def open_tracking(track: str | Sequence[str] | None, group: Group) -> Tracking:
    """Parse `track` and open every tracker, checking before any training that each can be used."""
    pairs = parse_track(track)
    trackers = [TRACKERS[name](target, group) for name, target in pairs]
    for tracker in trackers:
        tracker.check()
    return Tracking(group, trackers, [f"{n}={t}" if t else n for n, t in pairs])
