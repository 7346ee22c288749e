"""The public Python API: what `import fashionlab` offers a notebook, a script or the CLI.

    import fashionlab as fl
    run = fl.train(recipe="fast")                  # a Run: a finished run folder
    run.evaluate()["test_accuracy"]
    run.predict("shirt.png")                       # ranked labels with probabilities
    run.figures()                                  # curves, confusion, ..., inline in Jupyter

Everything here is a thin layer over the library modules: a `Run` is a `run.RunFolder` that
can also resume, evaluate, predict, export, report and draw itself.
"""

from __future__ import annotations

import html
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import config, data as data_mod, models, recipes, run as run_mod, runlock, tracking
from .atomic import OutputError, check_writable
from .errors import ArgumentError
from .run import RunFolder
from .training import Callback


# --------------------------------------------------------------------------- data and models

def load_data(data_dir: str | Path | None = None, offline: bool | None = None, class_names: Sequence[str] | None = None,
              dataset: str = "fashion-mnist", progress=None) -> data_mod.Dataset:
    """The verified dataset as numpy arrays (train/test images (N, 28, 28) uint8, labels, class names).

    Looks in data_dir, $FASHIONLAB_DATA, the user cache and /usr/share/datasets/fashion-mnist, then
    downloads unless offline. class_names makes data_dir a custom IDX dataset (no reference checksums)."""
    if class_names and not data_dir:
        raise data_mod.DataError("class_names describes a custom dataset: give its folder as data_dir")
    return data_mod.load(data_mod.spec_for(dataset, list(class_names) if class_names else None),
                         data_dir=data_dir, offline=offline, progress=progress)


def explore(dataset: data_mod.Dataset | None = None, out: str | Path | None = None) -> "Figures":
    """The dataset at a glance: class counts, samples per class, mean images, pixel histograms and
    which classes look alike, as figures (and as an HTML page when out is given)."""
    from . import exploration as explore_mod
    if out:
        check_writable(out)  # before loading anything: the page and its PNGs go there
    ds = dataset or load_data()
    if out:
        explore_mod.write_exploration(ds, out)
    return Figures(explore_mod.exploration_figures(ds), explore_mod.FIGURE_CAPTIONS)


def list_models() -> list[dict[str, Any]]:
    """Every registered model: name, family, parameters (total and trained) and where it comes from."""
    return models.list_models()


def list_recipes() -> list[dict[str, Any]]:
    """Every recipe: name, description, its settings, the settings it replaces per device type (`on_device`),
    the models its study trains and what it reported."""
    return [{"name": r.name, "description": r.description, "settings": dict(r.settings),
             "on_device": {k: dict(v) for k, v in r.on_device.items()}, "models": list(r.models),
             "reference": dict(r.reference)} for r in recipes.RECIPES.values()]


def build_model(name: str, **kwargs):
    """A registered model (an untrained torch.nn.Module); keyword arguments override its defaults."""
    return models.build_model(name, **kwargs)


# --------------------------------------------------------------------------- runs

class Run(RunFolder):
    """A run folder: `.config`, `.history`, `.metrics`, `.status` (new / interrupted / finished), and
    the things to do with it. In Jupyter a Run shows a short summary when it ends a cell."""

    def resume(self, quiet: bool = False, dataset: data_mod.Dataset | None = None,
               callbacks: Sequence[Callback] = (), data_dir=None, offline: bool | None = None,
               track: str | Sequence[str] | None = None) -> "Run":
        """Continue an interrupted run from its checkpoint (identical to a run never interrupted).
        track: as for `train`; the tracker gets the whole run, the epochs before the interruption too."""
        if self.path.is_dir():
            check_writable(self.path, folder=True)  # checkpoints, the model and metrics go there
        tracks = tracking.open_tracking(track, tracking.Group.single(self.path))  # before any training
        with tracks.run(self.path) as trackers:
            run_mod.resume_run(self.path, dataset, [*callbacks, *trackers], quiet, data_dir, offline)
        return self

    def evaluate(self, dataset: data_mod.Dataset | None = None, device: str | None = None,
                 precision: str | None = None, data_dir=None, offline: bool | None = None) -> dict[str, Any]:
        """Test metrics recomputed from the saved model: accuracy, loss, per-class scores, confusion,
        calibration. On the training device and precision they equal metrics.json."""
        return run_mod.evaluate_run(self.require_finished(), dataset, device, precision, data_dir, offline)

    def predict(self, images, top_k: int | None = 3, device: str = "auto") -> list:
        """Ranked labels with probabilities for each image, each list carrying the image's
        out-of-distribution score (`.ood_score`) and whether it is above the run's threshold (`.unsure`:
        probably not a garment). images: a file path (PNG, JPEG, .npy, ...), a PIL image, a uint8 array
        (28, 28) or (N, 28, 28), or a list of these. Photos are converted to the dataset's style (light
        garment on black, centred) first. top_k: classes per image, an integer >= 1 (at most every class
        is listed), or None for every class."""
        from .images import as_images
        return self.predictor(device).predict(as_images(images), top_k)

    def predictor(self, device: str = "auto"):
        """The loaded model, kept for repeated predictions (predict.Predictor)."""
        from .predict import Predictor
        cache = self.__dict__.setdefault("_predictors", {})
        if device not in cache:
            cache[device] = Predictor.from_run(self.require_finished().path, device=device)
        return cache[device]

    def calibrate_ood(self, false_alarm_rate: float = 0.05, dataset: data_mod.Dataset | None = None,
                      device: str = "auto", data_dir=None, offline: bool | None = None) -> dict[str, Any]:
        """Fit the run's out-of-distribution detector and calibrate its threshold for `false_alarm_rate`
        (the share of in-distribution images flagged unsure) on held-out images; writes RUN/ood.safetensors
        (training does this itself; this is for runs made before, or another rate). Returns the threshold
        and how it was calibrated."""
        from . import ood
        ood.check_rate(false_alarm_rate)
        with self._writing(None, "calibrate"):
            detector = run_mod.calibrate_ood(self, dataset, false_alarm_rate, device, data_dir, offline)
        self.__dict__.pop("_predictors", None)  # loaded predictors hold the old detector
        return detector.describe()

    def calibrate_temperature(self, dataset: data_mod.Dataset | None = None, device: str = "auto", data_dir=None,
                              offline: bool | None = None) -> dict[str, Any]:
        """Fit the temperature that calibrates the run's probabilities on held-out images (the validation
        images, or one half of the test set for a run trained on all training images) and write
        RUN/calibration.json (training does this itself; this is for runs made before). Returns the
        temperature with the ECE and NLL before and after, measured on test images it never saw."""
        with self._writing(None, "calibrate"):
            fitted = run_mod.calibrate_temperature(self, dataset, device, data_dir, offline)
        self.__dict__.pop("_predictors", None)  # loaded predictors hold the old temperature
        return fitted.to_dict()

    def robustness(self, images: int | None = None, dataset: data_mod.Dataset | None = None, device: str = "auto",
                   data_dir=None, offline: bool | None = None, write: bool = True, progress=None) -> dict[str, Any]:
        """Accuracy, ECE and the share flagged unsure on the run's held-out test images under 15 corruptions at
        5 severities (robustness.py), and their means; written to RUN/robustness.json unless write=False.
        images: score a stratified subset of that many held-out test images (None: all of them)."""
        from . import robustness
        robustness.check_images(images)
        if not write:
            return robustness.measure_run(self.require_finished().path, dataset, images, device, data_dir, offline,
                                          write, progress)
        with self._writing(None, "robustness"):
            return robustness.measure_run(self.path, dataset, images, device, data_dir, offline, write, progress)

    def export(self, path: str | Path | None = None, format: str = "onnx", parity_images: int = 1000,
               tolerance: float = 1e-4, dataset: data_mod.Dataset | None = None, data_dir=None,
               offline: bool | None = None) -> dict[str, Any]:
        """An ONNX file (default RUN/model.onnx), written only after it matches PyTorch on test images."""
        from . import export
        if format != "onnx":
            raise ArgumentError(f"format={format!r}: only 'onnx' is supported")
        if isinstance(parity_images, bool) or not isinstance(parity_images, int) or parity_images < 1:
            raise ArgumentError(f"parity_images={parity_images!r}: expected an integer >= 1 (test images compared)")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < math.inf:
            raise ArgumentError(f"tolerance={tolerance!r}: expected a finite number >= 0 (the largest allowed "
                             f"probability difference)")
        with self._writing(path, "export"):
            ds = dataset or self.dataset(data_dir, offline)
            n = min(parity_images, len(ds.test_images))
            return export.export_onnx(self.path, ds.test_images[:n], path, tolerance)

    def package(self, out: str | Path | None = None) -> dict[str, Any]:
        """The model.tar.gz SageMaker expects (default RUN/model.tar.gz)."""
        from . import export
        with self._writing(out, "package"):
            return export.package(self.path, out)

    def report(self, out: str | Path | None = None, with_explain: bool = True,
               dataset: data_mod.Dataset | None = None, device: str = "auto", data_dir=None,
               offline: bool | None = None) -> Path:
        """Write report.html (figures embedded, PNGs beside it); returns its path."""
        from . import report
        with self._writing(out, "report"):
            return report.write_run_report(self.path, dataset, out, with_explain, data_dir, offline, device)

    def figures(self, which: str | Sequence[str] | None = None, dataset: data_mod.Dataset | None = None,
                device: str = "auto") -> "Figures":
        """matplotlib Figures by name: curves, confusion, per_class, probabilities, filters,
        feature_maps, gradcam, embedding, calibration (reliability before and after the temperature) and
        robustness (accuracy on corrupted images) (those the run has). which: None for all, one name or a
        list of names. Each shows inline in Jupyter, and so does the whole set."""
        from . import report
        names = report.figure_names(which)  # checked before the run's model and data are loaded
        view = report.RunView(self.require_finished(), dataset or self.dataset(), device)
        return Figures(report.run_figures(view, names), {k: v[0] for k, v in report.FIGURES.items()})

    @contextmanager
    def _writing(self, out: str | Path | None, command: str) -> Iterator[None]:
        """Before any work: the run is finished, `out` (default: a file in the run folder) can be written,
        and, when it goes into the run folder, no other process writes there (its lock is held for the
        block; runlock.RunBusy names the process that holds it). A write that fails (a full disk) says
        that the finished run is as it was and which command writes the file later."""
        self.require_finished()
        if out:
            check_writable(out)
        else:
            check_writable(self.path, folder=True)
        with runlock.writing_into(self.path, out):
            try:
                yield
            except OutputError as e:
                raise e.with_note(f"the finished run is unchanged; `fashionlab {command} {self.path}` writes it "
                                  f"{'once there is space' if e.disk_full else 'once that can be written'}") from None

    def _repr_html_(self) -> str:
        return run_summary_html(self)


def run_summary_html(r: RunFolder) -> str:
    """A short HTML card: model, recipe, status, test accuracy and the per-class table."""
    esc = html.escape
    if not r.finished:
        return f"<p><b>Run</b> <code>{esc(str(r.path))}</code>: {r.status}</p>"
    m = r.metrics
    rows = "".join(f"<tr><td>{esc(n)}</td><td>{s['precision']:.3f}</td><td>{s['recall']:.3f}</td>"
                   f"<td>{s['f1']:.3f}</td><td>{s['support']}</td></tr>" for n, s in m["per_class"].items())
    return (f"<div><p><b>Run</b> <code>{esc(str(r.path))}</code>: model <b>{esc(str(m.get('model')))}</b>, recipe "
            f"{esc(str(m.get('recipe') or 'none'))}, seed {m.get('seed')}, {m['epochs_run']} epochs in "
            f"{m['train_seconds']:.1f} s<br>test accuracy <b>{m['test_accuracy']:.2%}</b>, loss "
            f"{m['test_loss']:.4f}, {m['params']:,} parameters</p><table><tr><th>class</th><th>precision</th>"
            f"<th>recall</th><th>F1</th><th>support</th></tr>{rows}</table></div>")


class Figures(dict):
    """Figures by name; shows every figure with its caption when it ends a notebook cell."""

    def __init__(self, figures: dict[str, Any], captions: dict[str, str]):
        super().__init__(figures)
        self.captions = captions

    def _repr_html_(self) -> str:
        from . import pages
        return "".join(pages.figure_html(fig, self.captions.get(name, name), name) for name, fig in self.items())


def train(recipe: str | None = None, model: str | None = None, out: str | Path | None = None, *,
          reuse: bool = False, dataset: data_mod.Dataset | None = None, callbacks: Sequence[Callback] = (),
          quiet: bool = False, data_dir=None, offline: bool | None = None,
          track: str | Sequence[str] | None = None, report: bool = False, **settings) -> Run:
    """Train and evaluate on the test set; returns the finished Run (folder `out`, default
    runs/<time>-<model>). Any training setting is a keyword (epochs=3, lr=0.01, augment={"flip": 0.5},
    ...); recipe values come first and explicit settings override them. Unknown settings raise with
    the valid names (`fashionlab.TrainConfig` lists them with their help).

    reuse=True makes re-running cheap: a finished run in `out` trained with exactly these settings is
    returned as it is, an interrupted one is resumed, and one with other settings is an error. A run
    that another process is training in `out` is waited for (said once on stderr), then reused;
    without reuse, another process writing into `out` raises RunBusy at once, naming it.

    track logs the run to experiment trackers as it trains: "tensorboard[=DIR]", "mlflow[=URI]", a
    list of them or a comma-separated string (fashionlab.tracking). Tracking is not a training setting:
    it changes nothing in the run and is not recorded in config.json.

    exclude trains without some training images: an audit's CSV (a path, or the AuditResult `audit`
    returns; its training suspects, checked against the dataset) or a list of image indices. config.json
    records the indices themselves, so reuse and resume know exactly which images were left out.

    report=True also writes the run's report.html, as `fashionlab train` does unless --no-report; it is
    off here because a notebook shows the same figures with `run.figures()`."""
    exclude = settings.pop("exclude", None)
    cfg = config.make_config(recipe=recipe, model=model, **settings)
    if reuse and out is None:
        raise ArgumentError("reuse=True needs out: the run folder to reuse")
    out = out or run_mod.default_run_dir(cfg.model)
    if not (reuse and RunFolder(out).finished):  # reusing a finished run writes nothing
        check_writable(out, folder=True)  # before loading data or training: a bad --out fails at once
    if exclude is not None:  # read and checked against the data before any training
        settings, dataset = _with_exclusions({**settings, "exclude": exclude}, cfg, dataset, data_dir, offline)
        cfg = config.make_config(recipe=recipe, model=model, **settings)
    tracks = tracking.open_tracking(track, tracking.Group.single(out))  # so is a tracker that cannot be used
    with tracks.run(out) as trackers:
        callbacks = [*callbacks, *trackers]
        if not reuse:
            run = Run(run_mod.train_run(cfg, out, dataset, callbacks, quiet, data_dir, offline).path)
        else:
            run = Run(run_mod.train_or_reuse(cfg, out, dataset, callbacks, quiet, data_dir, offline,
                                             wait=lambda line: print(line, file=sys.stderr, flush=True))[0].path)
    if report:
        run.report(dataset=dataset, data_dir=data_dir, offline=offline)
    return run


def _with_exclusions(settings: dict[str, Any], cfg: config.TrainConfig, dataset: data_mod.Dataset | None,
                     data_dir, offline: bool | None) -> tuple[dict[str, Any], data_mod.Dataset | None]:
    """settings with `exclude` as the sorted image indices config.json keeps, read from an audit's CSV (or
    checked as given) against the dataset cfg trains on, which is loaded for that and returned."""
    if settings.get("exclude") is None:
        return settings, dataset
    from . import label_audit as audit_mod
    ds = dataset or run_mod.dataset_for(cfg, data_dir, offline)
    return {**settings, "exclude": audit_mod.exclusions(settings["exclude"], ds)}, ds


# --------------------------------------------------------------------------- the label audit

@dataclass
class AuditResult:
    """A label audit: its folder, the suspected label errors (training and test images, most certain first)
    and the files that show them. `suspects` is one dict per suspect, as audit.csv has it."""
    folder: Path
    csv: Path
    page: Path
    summary: dict[str, Any]
    suspects: list[dict[str, Any]]
    folds: list[Run]

    def _repr_html_(self) -> str:
        s = self.summary
        return (f"<p><b>Label audit</b> of {html.escape(s['dataset'])} ({s['folds']} folds, "
                f"{html.escape(str(s['recipe'] or s['model']))}): {s['suspects']['train']:,} suspected label errors "
                f"among {s['images']['train']:,} training images, {s['suspects']['test']:,} among "
                f"{s['images']['test']:,} test images; page <code>{html.escape(str(self.page))}</code>, "
                f"CSV <code>{html.escape(str(self.csv))}</code></p>")


def audit(recipe: str | None = "fast-full", model: str | None = None, out: str | Path | None = None, *,
          folds: int = 5, dataset: data_mod.Dataset | None = None, data_dir=None, offline: bool | None = None,
          class_names: Sequence[str] | None = None, device: str = "auto", log=None,
          callbacks: Sequence[Callback] = (), **settings) -> AuditResult:
    """Audit the training labels: out-of-sample probabilities for every training image by `folds`-fold
    cross-validation with `recipe` (each fold an ordinary run folder under out/folds, reused when
    finished, resumed when interrupted), the test images' as the mean of the fold models', then the
    suspected label errors by confident learning. Writes out/audit.csv, audit.html, audit.json and
    probabilities.npz (out default: audits/<recipe or model>). settings override the recipe (epochs, seed,
    ...); class_names with data_dir audit a custom IDX dataset."""
    from . import label_audit as audit_mod
    audit_mod.check_folds(folds)
    if "exclude" in settings:
        raise audit_mod.AuditError("the audit chooses each fold's held-out images itself: exclude is not a "
                                   "setting of an audit")
    if class_names and not data_dir and dataset is None:
        raise data_mod.DataError("class_names describes a custom dataset: give its folder as data_dir")
    if class_names:
        settings["class_names"] = list(class_names)
    cfg = config.make_config(recipe=recipe, model=model, device=device, **settings)  # folds train where they predict
    out = check_writable(out or Path("audits") / (recipe or cfg.model), folder=True)  # before any training
    ds = dataset or run_mod.dataset_for(cfg, data_dir, offline, log)
    result = audit_mod.audit_dataset(cfg, ds, out, folds, log, device, callbacks)
    return AuditResult(out, out / audit_mod.CSV_NAME, out / audit_mod.PAGE_NAME, result["summary"],
                       result["suspects"], [Run(p) for p in result["summary"]["fold_runs"]])


# --------------------------------------------------------------------------- many runs

@dataclass
class StudyResult:
    """A study's runs (trained now or reused), its comparison page and the numbers on it."""
    name: str
    runs: list[Run]
    trained: list[Run]
    reused: list[Run]
    report: Path
    summary: dict[str, Any]

    def _repr_html_(self) -> str:
        return _summary_table_html(f"Study {self.name}", self.summary, self.report)


@dataclass
class Comparison:
    """Runs side by side: mean and spread per model, and the page that shows them."""
    runs: list[Run]
    report: Path
    summary: dict[str, Any]

    def _repr_html_(self) -> str:
        return _summary_table_html("Comparison", self.summary, self.report)


def _summary_table_html(title: str, summary: dict[str, Any], page: Path) -> str:
    from . import pages
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{s['runs']}</td>"
                   f"<td>{pages.fmt_mean_std(s['test_accuracy']['values'], 100)}</td>"
                   f"<td>{html.escape(s['hardest_class'])}</td></tr>" for k, s in summary.items())
    return (f"<div><p><b>{html.escape(title)}</b>: <code>{html.escape(str(page))}</code></p><table><tr><th>model</th>"
            f"<th>runs</th><th>test accuracy (%)</th><th>hardest class</th></tr>{rows}</table></div>")


def study(name: str, seeds: int = 3, out: str | Path | None = None, *, run_reports: bool = True,
          dataset: data_mod.Dataset | None = None, data_dir=None, offline: bool | None = None,
          log=None, track: str | Sequence[str] | None = None, **settings) -> StudyResult:
    """A reference study (`dense-vs-conv`, `cnn-vs-rnn`, `zoo`) over several seeds, resumable: finished
    runs in `out` (default studies/<name>) are reused. settings override the recipe (epochs, subset, ...).
    `audit-exclude` trains the fast-full recipe with and without a label audit's suspects (exclude=, as for
    `train`: the audit's CSV) and tests the difference.
    track: as for `train`; every run is logged, reused ones from their files, grouped by study."""
    from . import studies
    studies.get_study(name)  # an unknown name fails before any folder is made
    out = check_writable(out or Path("studies") / name, folder=True)  # before any training
    if settings.get("exclude") is not None:  # the study's dataset: Fashion-MNIST
        settings, dataset = _with_exclusions(settings, config.make_config(recipe=studies.get_study(name).recipe),
                                             dataset, data_dir, offline)
    result = studies.run_study(name, out, seeds=seeds, dataset=dataset, overrides=settings,
                               log=log, run_reports=run_reports, data_dir=data_dir, offline=offline, track=track)
    return StudyResult(name, [Run(d) for d in result["runs"]], [Run(d) for d in result["trained"]],
                       [Run(d) for d in result["reused"]], Path(result["report"]), result["summary"])


def compare(runs: Sequence[str | Path | RunFolder], out: str | Path = "compare.html",
            title: str = "Comparison of runs") -> Comparison:
    """Finished runs side by side (grouped by model: mean and spread over seeds) on one page."""
    from . import studies
    if isinstance(runs, (str, Path, RunFolder)) or not runs:
        raise ArgumentError(f"runs={runs!r}: expected a non-empty list of finished run folders")
    check_writable(out)  # the page, its PNGs and summary.json go there
    paths = [Path(r.path if isinstance(r, RunFolder) else r) for r in runs]
    page, summary = studies.write_comparison(paths, out, title=title)
    return Comparison([Run(p) for p in paths], Path(page), summary)


def sweep(spec: str | Path, storage: str | None = None, workers: int = 1, out: str | Path | None = None,
          report: bool = True, quiet: bool = False, track: str | Sequence[str] | None = None,
          **options) -> "SweepResult":
    """Run a controlled experiment (a TOML spec) on Optuna storage (default: a SQLite file in the
    experiment folder) with `workers` local processes; resumable. When every training is done and
    report is true, the results (per-level table, effects, tests) and report.html come with it.
    options: heartbeat_interval, grace_period, max_retry, threads, worker_only. track: as for `train`;
    every trial's run is logged, grouped by sweep."""
    from . import sweeps
    loaded = sweeps.load_spec(spec, folder=out)
    check_writable(loaded.folder, folder=True)  # its storage, runs and report go there
    tally = sweeps.run_sweep(loaded, storage, workers=workers, quiet=quiet, track=track, **options)
    if not (report and tally.finished) or options.get("worker_only"):
        return SweepResult(loaded, tally)
    results, page = sweeps.write_report(loaded, storage)
    return SweepResult(loaded, tally, results, Path(page))


@dataclass
class SweepResult:
    """A sweep's state after `sweep()`: its spec, the tally of trainings and, once every training is
    done, the results (per-level means, effects, Welch tests with verdicts) and the report page."""
    spec: Any  # sweeps.Spec
    tally: Any  # sweeps.Tally: trainings done, failed, total
    results: Any = None  # sweeps.SweepResults, when the sweep finished and was reported
    report: Path | None = None

    def table(self) -> str:
        """The per-level table with its significance verdicts, as text."""
        from . import sweeps
        return sweeps.text_table(self.results) if self.results is not None else "(no results: the sweep is not finished)"

    def _repr_html_(self) -> str:
        t = self.tally
        return (f"<p><b>Sweep {html.escape(self.spec.name)}</b>: {t.done} of {t.total} trainings done, "
                f"{t.failed} failed; folder <code>{html.escape(str(self.spec.folder))}</code></p>"
                f"<pre>{html.escape(self.table())}</pre>")
