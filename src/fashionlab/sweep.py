"""Controlled experiments: a declared design, several seeds per point, run on Optuna RDB storage.

A spec file (TOML) names the base model and recipe, the factors and their levels, the seeds, the
budget and the sampler (grid, random or TPE). One (design point, seed) pair is one Optuna trial,
identified by its key; each trial trains through `train.train` into `<folder>/runs/<key>`.

Sharing the design without duplicates. Optuna's GridSampler repeats points when several workers
ask at once, so grid and random designs are enqueued instead: the process that creates the study
enqueues every key once, and workers claim WAITING trials with the storage's atomic
WAITING -> RUNNING update (on SQLite every transaction is made IMMEDIATE so that update really is
atomic). TPE asks the sampler for new points and enqueues each new point's other seeds. Should a
key ever be queued or claimed twice (a starter killed half-way through enqueueing, a race), the
later trial closes itself as PRUNED with `duplicate_of`, so no key is trained or counted twice.

Fault tolerance. A running trial records a heartbeat every `heartbeat_interval` seconds; any
worker that finds one older than `grace_period` marks it FAIL and re-queues it
(optuna's RetryHeartbeatStaleTrialCallback), so a killed worker's point is redone by another. A
run folder with a checkpoint is resumed; one with metrics.json is reused, never trained again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import checkpoint, models
from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

SAMPLERS = ("grid", "random", "tpe")
METRICS = {"test_accuracy": "maximize", "test_loss": "minimize", "val_accuracy": "maximize", "val_loss": "minimize"}
DIRECTIONS = ("maximize", "minimize")
# Training settings a factor or [train] may not set: the spec names them elsewhere, or they are per trial.
RESERVED_TRAIN = {"model", "model_args", "recipe", "seed", "class_names", "dataset"}
# Convnet factors that together build `channels`: block i has filters * 2**i channels, depth blocks.
DERIVED = ("filters", "depth")
SECTIONS = ("experiment", "train", "model_args", "factors", "data", "report")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_TPE_DUPLICATES = 50  # consecutive repeats of tried points before TPE is considered exhausted


class SpecError(UserError):
    """An experiment spec (or the study stored for it) is invalid; names the file and the field."""


# --------------------------------------------------------------------------- spec

def level_label(value: Any) -> str:
    """A level's stable text form: Optuna categorical values and folder names need plain strings."""
    return value if isinstance(value, str) else json.dumps(value)


@dataclass(frozen=True)
class Factor:
    name: str
    levels: tuple  # the values, in the spec's order
    target: str  # "train" (a TrainConfig setting), "model" (a model argument) or "derived" (filters/depth)

    @property
    def labels(self) -> list[str]:
        return [level_label(v) for v in self.levels]

    def value(self, label: str) -> Any:
        return self.levels[self.labels.index(label)]


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    description: str
    model: str
    recipe: str | None
    metric: str
    direction: str
    seeds: tuple[int, ...]
    sampler: str
    points: int | None  # random/TPE: the number of design points
    sampler_seed: int
    folder: Path
    train: dict[str, Any]
    model_args: dict[str, Any]
    factors: tuple[Factor, ...]
    data_dir: str | None = None
    class_names: tuple[str, ...] | None = None
    heatmap: tuple[str, str] | None = None
    alpha: float = 0.05

    def factor(self, name: str) -> Factor:
        return next(f for f in self.factors if f.name == name)

    @property
    def grid_size(self) -> int:
        return math.prod(len(f.levels) for f in self.factors)

    def design(self) -> dict[str, Any]:
        """Everything that decides what the trials compute; stored with the study to detect edits."""
        return {"model": self.model, "recipe": self.recipe, "metric": self.metric, "direction": self.direction,
                "seeds": list(self.seeds), "sampler": self.sampler, "points": self.points,
                "sampler_seed": self.sampler_seed, "train": self.train, "model_args": self.model_args,
                "factors": {f.name: f.labels for f in self.factors}, "data_dir": self.data_dir,
                "class_names": list(self.class_names) if self.class_names else None}

    def default_storage(self) -> str:
        return f"sqlite:///{(self.folder / 'sweep.db').resolve()}"

    @property
    def total_trials(self) -> int:
        return self.n_points * len(self.seeds)

    @property
    def n_points(self) -> int:
        return self.grid_size if self.sampler == "grid" else min(self.points or 0, self.grid_size)


def _spec_error(path: Path, where: str, message: str) -> SpecError:
    return SpecError(f"{path}: {where}: {message}")


def _check_type(path: Path, where: str, value: Any, kinds: tuple, expected: str) -> Any:
    # bool is an int in Python; a TOML `true` is never meant as a number.
    if isinstance(value, bool) and bool not in kinds:
        raise _spec_error(path, where, f"expected {expected}, got {value!r}")
    if not isinstance(value, kinds):
        raise _spec_error(path, where, f"expected {expected}, got {value!r}")
    return value


def _train_field_kinds() -> dict[str, tuple[tuple, str]]:
    """TrainConfig field -> (accepted Python types, words for the error message)."""
    from .train import TrainConfig
    words = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "str": ((str,), "a string"),
             "bool": ((bool,), "true or false"), "int | None": ((int,), "an integer"),
             "float | None": ((int, float), "a number"), "dict[str, Any]": ((dict,), "a table"),
             "list[str] | None": ((list,), "a list of strings"), "str | None": ((str,), "a string")}
    return {f.name: words.get(str(f.type), ((object,), "a value")) for f in dataclasses.fields(TrainConfig)}


def _family_args(model: str) -> set[str]:
    import inspect
    family = models.FAMILIES[models.MODELS[model].family]
    return {p for p in inspect.signature(family).parameters if p not in ("self", "num_classes")}


def load_spec(path: str | Path, folder: str | Path | None = None) -> Spec:
    """Read and validate a spec file; every error names the file, the field and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: experiment spec not found")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML ({e})") from None
    for section in raw:
        if section not in SECTIONS:
            raise _spec_error(path, f"[{section}]", f"unknown section; expected one of {', '.join(SECTIONS)}")
        if not isinstance(raw[section], dict):
            raise _spec_error(path, section, "expected a [table]")
    exp = dict(raw.get("experiment", {}))
    known = {"name", "description", "model", "recipe", "metric", "direction", "seeds", "sampler", "points",
             "sampler_seed", "folder"}
    for key in exp:
        if key not in known:
            raise _spec_error(path, f"[experiment] {key}", f"unknown field; known fields: {', '.join(sorted(known))}")

    def get(key, kinds, expected, default=...):
        where = f"[experiment] {key}"
        if key not in exp:
            if default is ...:
                raise _spec_error(path, where, f"missing; expected {expected}")
            return default
        return _check_type(path, where, exp[key], kinds, expected)

    name = get("name", (str,), "a name of letters, digits, '-', '_' or '.'")
    if not NAME_RE.match(name):
        raise _spec_error(path, "[experiment] name", f"expected letters, digits, '-', '_' or '.', got {name!r}")
    model = get("model", (str,), "a registered model name")
    if model not in models.MODELS:
        raise _spec_error(path, "[experiment] model",
                          f"unknown model {model!r}; expected one of {', '.join(sorted(models.MODELS))}")
    recipe = get("recipe", (str,), "a recipe name", None)
    if recipe is not None:
        from .recipes import RECIPES
        if recipe not in RECIPES:
            raise _spec_error(path, "[experiment] recipe",
                              f"unknown recipe {recipe!r}; expected one of {', '.join(sorted(RECIPES))}")
    metric = get("metric", (str,), f"one of {', '.join(METRICS)}", "test_accuracy")
    if metric not in METRICS:
        raise _spec_error(path, "[experiment] metric", f"expected one of {', '.join(METRICS)}, got {metric!r}")
    direction = get("direction", (str,), "maximize or minimize", METRICS[metric])
    if direction not in DIRECTIONS:
        raise _spec_error(path, "[experiment] direction", f"expected maximize or minimize, got {direction!r}")
    seeds_raw = get("seeds", (int, list), "a number of seeds (>= 1) or a list of distinct integer seeds", 3)
    if isinstance(seeds_raw, int):
        if seeds_raw < 1:
            raise _spec_error(path, "[experiment] seeds", f"expected a number of seeds >= 1, got {seeds_raw}")
        seeds = tuple(range(seeds_raw))
    else:
        if not seeds_raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw) \
                or len(set(seeds_raw)) != len(seeds_raw):
            raise _spec_error(path, "[experiment] seeds", f"expected a list of distinct integers >= 0, got {seeds_raw!r}")
        seeds = tuple(seeds_raw)
    sampler = get("sampler", (str,), f"one of {', '.join(SAMPLERS)}", "grid")
    if sampler not in SAMPLERS:
        raise _spec_error(path, "[experiment] sampler", f"expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    points = get("points", (int,), "a number of design points >= 1", None)
    if sampler != "grid" and points is None:
        raise _spec_error(path, "[experiment] points", f"missing; the {sampler} sampler needs the number of "
                                                       "design points to try (an integer >= 1)")
    if points is not None and points < 1:
        raise _spec_error(path, "[experiment] points", f"expected an integer >= 1, got {points}")
    if sampler == "grid" and points is not None:
        raise _spec_error(path, "[experiment] points", "the grid sampler runs every point; remove `points` "
                                                       "or choose sampler = \"random\" or \"tpe\"")
    sampler_seed = get("sampler_seed", (int,), "an integer", 0)
    folder_value = get("folder", (str,), "a folder path", f"runs/sweeps/{name}")
    description = get("description", (str,), "a string", "")

    train_settings = _validate_train(path, raw.get("train", {}))
    family_args = _family_args(model)
    model_args = dict(raw.get("model_args", {}))
    for key in model_args:
        if key not in family_args:
            raise _spec_error(path, f"[model_args] {key}", f"not an argument of model {model!r} "
                                                           f"(family {models.MODELS[model].family}); expected one of "
                                                           f"{', '.join(sorted(family_args))}")
    factors = _validate_factors(path, raw.get("factors", {}), model, family_args, train_settings, model_args)

    data_section = dict(raw.get("data", {}))
    for key in data_section:
        if key not in ("data_dir", "class_names"):
            raise _spec_error(path, f"[data] {key}", "unknown field; expected data_dir or class_names")
    data_dir = data_section.get("data_dir")
    if data_dir is not None:
        _check_type(path, "[data] data_dir", data_dir, (str,), "a folder path")
    class_names = data_section.get("class_names")
    if class_names is not None:
        if not isinstance(class_names, list) or len(class_names) < 2 or not all(isinstance(c, str) for c in class_names):
            raise _spec_error(path, "[data] class_names", f"expected a list of at least 2 strings, got {class_names!r}")
        if data_dir is None:
            raise _spec_error(path, "[data] class_names", "a custom dataset needs its folder: add data_dir")
        class_names = tuple(class_names)

    report = dict(raw.get("report", {}))
    for key in report:
        if key not in ("heatmap", "alpha"):
            raise _spec_error(path, f"[report] {key}", "unknown field; expected heatmap or alpha")
    alpha = report.get("alpha", 0.05)
    _check_type(path, "[report] alpha", alpha, (float, int), "a significance level in (0, 1)")
    if not 0 < alpha < 1:
        raise _spec_error(path, "[report] alpha", f"expected a significance level in (0, 1), got {alpha}")
    heatmap = report.get("heatmap")
    names = [f.name for f in factors]
    if heatmap is not None:
        if not (isinstance(heatmap, list) and len(heatmap) == 2 and all(h in names for h in heatmap)
                and heatmap[0] != heatmap[1]):
            raise _spec_error(path, "[report] heatmap", f"expected two different factor names from "
                                                        f"{', '.join(names)}, got {heatmap!r}")
        heatmap = tuple(heatmap)
    elif len(names) >= 2:
        heatmap = (names[0], names[1])

    spec = Spec(path=path, name=name, description=description, model=model, recipe=recipe, metric=metric,
                direction=direction, seeds=seeds, sampler=sampler, points=points, sampler_seed=sampler_seed,
                folder=Path(folder) if folder else Path(folder_value), train=train_settings, model_args=model_args,
                factors=factors, data_dir=data_dir, class_names=class_names, heatmap=heatmap, alpha=float(alpha))
    _validate_points(spec)
    return spec


def _validate_train(path: Path, table: dict) -> dict[str, Any]:
    kinds = _train_field_kinds()
    for key, value in table.items():
        where = f"[train] {key}"
        if key in RESERVED_TRAIN:
            raise _spec_error(path, where, "set this in [experiment] (model, recipe, seeds), [model_args] or [data]")
        if key not in kinds:
            raise _spec_error(path, where, f"unknown training setting; expected one of "
                                           f"{', '.join(sorted(set(kinds) - RESERVED_TRAIN))}")
        _check_type(path, where, value, *kinds[key])
    return dict(table)


def _validate_factors(path: Path, table: dict, model: str, family_args: set[str], train_settings: dict,
                      model_args: dict) -> tuple[Factor, ...]:
    if not table:
        raise _spec_error(path, "[factors]", "missing or empty; expected at least one factor with its levels, "
                                             "e.g. kernel = [3, 5, 7]")
    kinds = _train_field_kinds()
    is_convnet = models.MODELS[model].family == "convnet"
    factors = []
    for name, levels in table.items():
        where = f"[factors] {name}"
        if name in DERIVED and is_convnet:
            target = "derived"
            for lvl in levels if isinstance(levels, list) else []:
                _check_type(path, where, lvl, (int,), "integer levels >= 1")
                if lvl < 1:
                    raise _spec_error(path, where, f"expected integer levels >= 1, got {lvl}")
            if "channels" in table or "channels" in model_args:
                raise _spec_error(path, where, "filters/depth build `channels`; do not also set channels")
        elif name in family_args:
            target = "model"
            if name in model_args:
                raise _spec_error(path, where, "also set in [model_args]; a factor's value comes from its levels")
        elif name in kinds and name not in RESERVED_TRAIN:
            target = "train"
            if name in train_settings:
                raise _spec_error(path, where, "also set in [train]; a factor's value comes from its levels")
        else:
            choices = sorted(family_args | (set(DERIVED) if is_convnet else set()) | (set(kinds) - RESERVED_TRAIN))
            raise _spec_error(path, where, f"not a training setting or an argument of model {model!r}; "
                                           f"expected one of {', '.join(choices)}")
        if not isinstance(levels, list) or not levels:
            raise _spec_error(path, where, f"expected a non-empty list of levels, got {levels!r}")
        if target == "train":
            for lvl in levels:
                _check_type(path, where, lvl, *kinds[name])
        labels = [level_label(v) for v in levels]
        if len(set(labels)) != len(labels):
            raise _spec_error(path, where, f"expected distinct levels, got {levels!r}")
        factors.append(Factor(name, tuple(levels), target))
    return tuple(factors)


def _validate_points(spec: Spec) -> None:
    """Build the configuration and the model of every distinct point, so a bad level fails now, not at trial 57."""
    checked: set[str] = set()
    for point in itertools.islice(all_points(spec), 2000):
        try:
            cfg = trial_config(spec, point, spec.seeds[0])
        except (ValueError, KeyError) as e:
            raise _spec_error(spec.path, f"design point {describe_point(point)}", str(e)) from None
        key = json.dumps(cfg.model_args, sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        try:
            models.build_model(cfg.model, **cfg.model_args)
        except (ValueError, TypeError) as e:
            raise _spec_error(spec.path, f"design point {describe_point(point)}", str(e)) from None


# --------------------------------------------------------------------------- design

Point = dict  # factor name -> level label, in the spec's factor order


def all_points(spec: Spec):
    for combo in itertools.product(*(f.labels for f in spec.factors)):
        yield dict(zip((f.name for f in spec.factors), combo))


def design_points(spec: Spec) -> list[Point]:
    """The points a grid or random design runs; random draws distinct points with the sampler's seed."""
    if spec.sampler == "grid":
        return list(all_points(spec))
    if spec.sampler == "random":
        rng = random.Random(spec.sampler_seed)
        chosen = sorted(rng.sample(range(spec.grid_size), spec.n_points))
        grid = list(all_points(spec))
        return [grid[i] for i in chosen]
    return []  # TPE chooses its points as it goes


def point_id(point: Point) -> str:
    """A readable folder-safe name: kernel3_filters32_poolmax."""
    return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", f"{k}{v}").strip("-") for k, v in point.items())


def trial_key(point: Point, seed: int) -> str:
    return f"{point_id(point)}-s{seed}"


def describe_point(point: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


def trial_config(spec: Spec, point: Point, seed: int):
    """The TrainConfig of one (point, seed): recipe, then [train], then the factors' values."""
    from .train import make_config
    settings = dict(spec.train)
    margs = dict(spec.model_args)
    derived = {}
    for f in spec.factors:
        value = f.value(point[f.name])
        if f.target == "train":
            settings[f.name] = value
        elif f.target == "model":
            margs[f.name] = list(value) if isinstance(value, list) else value
        else:
            derived[f.name] = value
    if derived:
        base = list(models.MODELS[spec.model].kwargs.get("channels", (32, 64)))
        filters = derived.get("filters", base[0])
        depth = derived.get("depth", len(base))
        margs["channels"] = [filters * 2 ** i for i in range(depth)]
    if spec.class_names:
        settings["class_names"] = list(spec.class_names)
    return make_config(recipe=spec.recipe, model=spec.model, model_args=margs, seed=seed, **settings)


# --------------------------------------------------------------------------- storage

def open_storage(url: str, heartbeat_interval: int = 10, grace_period: int = 30, max_retry: int = 2):
    """Optuna RDB storage with heartbeats and retry of stale trials; SQLite transactions serialised."""
    import optuna
    quiet_optuna()
    url = _with_installed_driver(url)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}
    # Optuna 5 renamed the retry callback and its argument; older releases have the first names.
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    retry = {"heartbeat_stale_trial_callback": retry_cls(max_retry=max_retry)} if retry_cls else \
        {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)}
    with _sqlite_schema_lock(url):
        storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                             grace_period=grace_period, **retry)
    if url.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    return storage


@contextlib.contextmanager
def _sqlite_schema_lock(url: str):
    # RDBStorage creates its tables on first open, outside any transaction: two processes opening a
    # new SQLite file at once both try CREATE TABLE and one fails ("table ... already exists"). An
    # exclusive lock on a file beside the database makes the openings take turns. PostgreSQL and
    # in-memory SQLite need none.
    path = url.split(":///", 1)[1] if url.startswith("sqlite:///") else ""
    if not path:
        yield
        return
    import fcntl
    with open(f"{path}.open-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed, whatever happens inside
        yield


def _with_installed_driver(url: str) -> str:
    """postgresql://... with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg 3, the
    sweep extra installs psycopg2-binary; an explicit postgresql+driver:// is left alone."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _serialise_sqlite(engine) -> None:
    # pysqlite starts transactions lazily, so two processes can both read a trial as WAITING and
    # both claim it. BEGIN IMMEDIATE takes the write lock up front (the SQLAlchemy-documented
    # recipe); the busy timeout makes the others wait rather than fail.
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed must not be reused


def quiet_optuna() -> None:
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")


def make_sampler(spec: Spec):
    import optuna
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    # Grid and random designs are enqueued; this sampler only ever sees fixed parameters.
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def open_study(spec: Spec, storage, wait_s: float = 60.0):
    """Create the study and enqueue its design once, or join the existing one and check it is the same design."""
    import optuna
    design = spec.design()
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, direction=spec.direction,
                                    sampler=make_sampler(spec), load_if_exists=False)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=make_sampler(spec))
        created = False
    if created:
        study.set_user_attr("design", design)
        _enqueue_missing(spec, study)
        study.set_user_attr("enqueued", spec.total_trials)
        return study
    deadline = time.monotonic() + wait_s
    while True:  # the creator sets `design`, enqueues, then sets `enqueued`
        attrs = study.user_attrs
        if "design" in attrs and attrs["design"] != design:
            changed = sorted(k for k in set(design) | set(attrs["design"]) if design.get(k) != attrs["design"].get(k))
            raise SpecError(f"{spec.path}: the study {spec.name!r} in this storage was created from a different "
                            f"design (differs in: {', '.join(changed)}); give the experiment a new name or use "
                            f"another storage")
        if "enqueued" in attrs or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if "enqueued" not in study.user_attrs:
        # The creator died before finishing; queue what is missing (any overlap is pruned as duplicate).
        if "design" not in study.user_attrs:
            study.set_user_attr("design", design)
        _enqueue_missing(spec, study)
        study.set_user_attr("enqueued", spec.total_trials)
    return study


def _enqueue_missing(spec: Spec, study) -> None:
    existing = {t.user_attrs.get("key") for t in study.get_trials(deepcopy=False)}
    points = design_points(spec)
    for seed in spec.seeds:  # seed-major: every point gets its first seed before any gets a second
        for point in points:
            key = trial_key(point, seed)
            if key not in existing:
                study.enqueue_trial(point, user_attrs=_trial_attrs(point, seed))


def _trial_attrs(point: Point, seed: int) -> dict[str, Any]:
    return {"key": trial_key(point, seed), "point": point_id(point), "seed": seed}


# --------------------------------------------------------------------------- progress

@dataclass
class Tally:
    total: int
    done: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0  # keys whose every attempt failed and that are not queued again
    points_tried: int = 0
    best: tuple[str, float, float, int] | None = None  # (point, mean, std, seeds)

    @property
    def finished(self) -> bool:
        return self.running == 0 and self.waiting == 0 and self.done + self.failed >= self.total

    def line(self, spec: Spec) -> str:
        s = f"{spec.name}: {self.done}/{self.total} done, {self.running} running, {self.failed} failed"
        if self.best:
            point, mean, std, n = self.best
            s += f" | best {spec.metric} {mean:.4f} ± {std:.4f} (n={n}) at {point}"
        return s


def tally(spec: Spec, trials) -> Tally:
    from optuna.trial import TrialState
    t = Tally(total=spec.total_trials)
    by_key: dict[str, list] = {}
    for tr in trials:
        if tr.state == TrialState.RUNNING:
            t.running += 1
        elif tr.state == TrialState.WAITING:
            t.waiting += 1
        key = tr.user_attrs.get("key")
        if key:
            by_key.setdefault(key, []).append(tr)
    values: dict[str, list[float]] = {}
    labels: dict[str, str] = {}
    points = set()
    for key, group in by_key.items():
        states = {tr.state for tr in group}
        if states != {TrialState.PRUNED}:
            points.add(group[0].user_attrs["point"])
        complete = [tr for tr in group if tr.state == TrialState.COMPLETE]
        if complete:
            t.done += 1
            pid = complete[0].user_attrs["point"]
            values.setdefault(pid, []).append(complete[0].value)
            labels[pid] = describe_point({f.name: complete[0].params.get(f.name) for f in spec.factors})
        elif TrialState.FAIL in states and not states & {TrialState.RUNNING, TrialState.WAITING}:
            t.failed += 1
    t.points_tried = len(points)
    if values:
        sign = 1 if spec.direction == "maximize" else -1
        pid = max(values, key=lambda p: sign * _mean(values[p]))
        v = values[pid]
        t.best = (labels[pid], _mean(v), _std(v), len(v))
    return t


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _std(v: list[float]) -> float:
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


class ProgressLine:
    """Prints the live progress line: rewritten in place on a terminal, one line per change otherwise."""

    def __init__(self, spec: Spec, storage, every: float = 2.0, stream=None):
        self.spec, self.storage, self.every = spec, storage, every
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last = ""

    def current(self) -> Tally:
        study_id = self.storage.get_study_id_from_name(self.spec.name)
        return tally(self.spec, self.storage.get_all_trials(study_id, deepcopy=False))

    def show(self, final: bool = False) -> Tally:
        t = self.current()
        line = t.line(self.spec)
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        elif line != self._last or final:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line
        return t

    def _run(self):
        while not self._stop.wait(self.every):
            try:
                self.show()
            except Exception:  # a busy database must not kill the sweep; the next tick retries
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------- worker

class _Heartbeat:
    """Records the trial's heartbeat every interval until stopped (the stale-trial detector reads it)."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:
                pass  # a transient database error; the grace period covers a missed beat

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@dataclass
class Worker:
    """One worker: claims trials until the design is done; run it on as many processes and machines as you like."""

    spec: Spec
    storage: Any
    log: Callable[[str], None] = lambda m: None  # trial starts; failures always go to stderr
    poll_s: float = 1.0
    ident: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    trained: int = 0
    reused: int = 0
    _dataset: Any = None

    def run(self) -> Tally:
        import optuna
        self.study = open_study(self.spec, self.storage)
        # The study's own (caching) view of the storage: trials claimed here must be known to it.
        self.store = self.study._storage
        self.study_id = self.study._study_id
        duplicates = 0
        rechecked = False
        while True:
            optuna.storages.fail_stale_trials(self.study)
            trial_id = self._claim_waiting()
            if trial_id is None:
                t = self._tally()
                if self.spec.sampler == "tpe" and duplicates < MAX_TPE_DUPLICATES \
                        and t.points_tried < min(self.spec.n_points, self.spec.grid_size):
                    trial_id = self.study.ask()._trial_id
                elif (t.finished or (t.running == 0 and t.waiting == 0)) and t.failed and not rechecked:
                    # Another worker may have just failed a stale trial and be queueing its retry
                    # (two separate writes): look once more before calling the failure final.
                    rechecked = True
                    time.sleep(self.poll_s)
                    continue
                elif t.finished or (t.running == 0 and t.waiting == 0):
                    return t
                else:
                    time.sleep(self.poll_s)  # others are running; stay to redo their points should they die
                    continue
            rechecked = False
            outcome = self._run_trial(trial_id)
            duplicates = duplicates + 1 if outcome == "duplicate" else 0

    def _tally(self) -> Tally:
        return tally(self.spec, self.store.get_all_trials(self.study_id, deepcopy=False))

    def _claim_waiting(self) -> int | None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState
        for t in self.store.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if self.store.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                    return t._trial_id
            except UpdateFinishedTrialError:
                continue
        return None

    def _run_trial(self, trial_id: int) -> str:
        import optuna
        from optuna.trial import TrialState
        from .train import TrainingInterrupted
        with _Heartbeat(self.store, trial_id, self.store.get_heartbeat_interval()):
            trial = optuna.Trial(self.study, trial_id)
            attrs = trial.user_attrs
            fresh = "key" not in attrs  # a TPE proposal: its factors come from the sampler
            point = {f.name: trial.suggest_categorical(f.name, f.labels) for f in self.spec.factors}
            seed = attrs.get("seed", self.spec.seeds[0])
            if fresh:
                for k, v in _trial_attrs(point, seed).items():
                    trial.set_user_attr(k, v)
            key = trial_key(point, seed)
            trial.set_user_attr("worker", self.ident)
            reason, other = self._redundant(trial.number, key, point_id(point), fresh)
            if reason:
                trial.set_user_attr("duplicate_of" if reason == "duplicate" else "over_budget", other)
                self.study.tell(trial, state=TrialState.PRUNED)
                return reason
            if fresh:
                self._enqueue_other_seeds(point, seed)
            run_dir = self.spec.folder / "runs" / key
            self.log(f"{self.ident}: trial {trial.number} {key}")
            try:
                metrics, reused = run_point(self.spec, point, seed, run_dir, self._get_dataset)
            except TrainingInterrupted:
                self.study.tell(trial, state=TrialState.FAIL)
                self._requeue(trial_id)  # an interruption by the user is no failure: queue it again
                raise
            except Exception as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                print(f"\n{self.ident}: trial {trial.number} ({key}) failed: {type(e).__name__}: {e}", file=sys.stderr)
                self.study.tell(trial, state=TrialState.FAIL)
                callback = getattr(self.store, "get_heartbeat_stale_trial_callback", None) \
                    or self.store.get_failed_trial_callback
                callback = callback()
                if callback:
                    callback(self.study, self.store.get_trial(trial_id))
                return "failed"
            self.reused += reused
            self.trained += not reused
            trial.set_user_attr("metrics", {k: metrics.get(k) for k in (
                "test_accuracy", "test_loss", "val_accuracy", "val_loss", "train_seconds", "wall_seconds",
                "params", "epochs_run")})
            trial.set_user_attr("run_dir", str(run_dir))
            trial.set_user_attr("reused_run", bool(reused))
            # A last guard against a race the claim-time check cannot see: never complete a key twice.
            if self._complete_elsewhere(key, trial.number) is not None:
                trial.set_user_attr("duplicate_of", self._complete_elsewhere(key, trial.number))
                self.study.tell(trial, state=TrialState.PRUNED)
                return "duplicate"
            self.study.tell(trial, metrics[self.spec.metric])
            return "reused" if reused else "trained"

    def _redundant(self, number: int, key: str, pid: str, fresh: bool) -> tuple[str | None, int | None]:
        """('duplicate', n) when trial n already holds this key; ('over_budget', None) for a TPE point too many."""
        from optuna.trial import TrialState
        if fresh:
            self._wait_for_earlier_keys(number)
        trials = self.store.get_all_trials(self.study_id, deepcopy=False)
        live = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
        for t in trials:
            if t.number == number or t.user_attrs.get("key") != key:
                continue
            if t.state == TrialState.COMPLETE or (t.state in live and t.number < number):
                return "duplicate", t.number
        if fresh:
            earlier = {t.user_attrs.get("point") for t in trials if t.number < number
                       and t.state != TrialState.PRUNED and t.user_attrs.get("point")}
            if pid in earlier:
                return "duplicate", None
            if len(earlier) >= self.spec.n_points:
                return "over_budget", None
        return None, None

    def _wait_for_earlier_keys(self, number: int, timeout: float = 10.0) -> None:
        # A TPE trial proposed just before this one may not have written its key yet.
        from optuna.trial import TrialState
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [t for t in self.store.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.RUNNING,))
                       if t.number < number and "key" not in t.user_attrs]
            if not pending:
                return
            time.sleep(0.2)

    def _complete_elsewhere(self, key: str, number: int) -> int | None:
        from optuna.trial import TrialState
        for t in self.store.get_all_trials(self.study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("key") == key and t.number != number:
                return t.number
        return None

    def _enqueue_other_seeds(self, point: Point, first_seed: int) -> None:
        existing = {t.user_attrs.get("key") for t in self.store.get_all_trials(self.study_id, deepcopy=False)}
        for seed in self.spec.seeds:
            if seed != first_seed and trial_key(point, seed) not in existing:
                self.study.enqueue_trial(point, user_attrs=_trial_attrs(point, seed))

    def _requeue(self, trial_id: int) -> None:
        import optuna
        old = self.store.get_trial(trial_id)
        self.study.add_trial(optuna.create_trial(
            state=optuna.trial.TrialState.WAITING, params=old.params, distributions=old.distributions,
            user_attrs={k: v for k, v in old.user_attrs.items() if k in ("key", "point", "seed")},
            system_attrs=old.system_attrs))

    def _get_dataset(self):
        if self._dataset is None:
            from . import data
            spec = data.custom_spec(list(self.spec.class_names)) if self.spec.class_names else data.FASHION_MNIST
            self._dataset = data.load(spec, data_dir=self.spec.data_dir)
        return self._dataset


def run_point(spec: Spec, point: Point, seed: int, run_dir: Path, get_dataset) -> tuple[dict[str, Any], bool]:
    """Train one (point, seed) into run_dir; returns (metrics, reused). Finished runs are reused, interrupted ones resumed."""
    from . import train
    cfg = trial_config(spec, point, seed)
    expected = json.loads(json.dumps(cfg.to_dict()))
    config_path = run_dir / "config.json"
    if config_path.exists():
        saved = checkpoint.read_json(config_path)
        saved = {k: v for k, v in saved.items() if k not in ("environment", "data", "split")}
        if saved != expected:
            changed = sorted(k for k in set(saved) | set(expected) if saved.get(k) != expected.get(k))
            raise SpecError(f"{run_dir} holds a run with a different configuration (differs in: {', '.join(changed)}); "
                            f"move it away or use another experiment folder")
    finished = (run_dir / "metrics.json").exists() and not (run_dir / checkpoint.STATE_FILE).exists()
    if finished:
        metrics, reused = checkpoint.read_json(run_dir / "metrics.json"), True
    elif (run_dir / checkpoint.STATE_FILE).exists():
        metrics, reused = train.resume(run_dir, quiet=True, dataset=get_dataset()), False
    else:
        # Killed after writing the model but before metrics.json: the half-written run goes.
        for name in (checkpoint.MODEL_JSON, checkpoint.MODEL_WEIGHTS):
            (run_dir / name).unlink(missing_ok=True)
        metrics, reused = train.train(cfg, run_dir, dataset=get_dataset(), quiet=True), False
    return {**metrics, **_validation_scores(run_dir)}, reused


def _validation_scores(run_dir: Path) -> dict[str, float]:
    """The last epoch's validation accuracy and loss (metrics.json holds test scores only)."""
    path = run_dir / "history.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    last = rows[-1] if rows else {}
    return {k: last[k] for k in ("val_accuracy", "val_loss") if k in last}


# --------------------------------------------------------------------------- command

def run_sweep(spec: Spec, storage_url: str | None = None, workers: int = 1, heartbeat_interval: int = 10,
              grace_period: int = 30, max_retry: int = 2, threads: int | None = None, worker_only: bool = False,
              quiet: bool = False, stream=None) -> Tally:
    """`fashionlab sweep`: run N local workers against the storage and show progress; returns the final tally."""
    stream = stream or sys.stderr
    spec.folder.mkdir(parents=True, exist_ok=True)
    url = storage_url or spec.default_storage()
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected an integer >= 1")
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise ValueError(f"--grace-period {grace_period} must exceed --heartbeat-interval {heartbeat_interval} (>= 1 s)")
    storage = open_storage(url, heartbeat_interval, grace_period, max_retry)
    if threads:
        import torch
        torch.set_num_threads(threads)
    if worker_only:
        return Worker(spec, storage).run()
    open_study(spec, storage)  # create and enqueue before the workers start
    progress = ProgressLine(spec, storage, stream=stream)
    if not quiet:
        stream.write(f"sweep {spec.name}: {spec.n_points} points x {len(spec.seeds)} seeds = {spec.total_trials} "
                     f"trainings, {workers} worker(s), storage {_redact(url)}\n")
    if workers == 1:
        worker = Worker(spec, storage)
        if quiet:
            worker.run()
        else:
            with progress:
                worker.run()
    else:
        _run_child_workers(spec, url, workers, heartbeat_interval, grace_period, max_retry, threads, progress, quiet)
    return progress.show(final=True) if not quiet else progress.current()


def _run_child_workers(spec, url, workers, heartbeat_interval, grace_period, max_retry, threads, progress, quiet):
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "fashionlab", "sweep", str(spec.path), "--storage", url, "--out", str(spec.folder),
           "--heartbeat-interval", str(heartbeat_interval), "--grace-period", str(grace_period),
           "--max-retry", str(max_retry), "--threads", str(threads), "--worker-only"]
    children = [subprocess.Popen(cmd, preexec_fn=_die_with_parent) for _ in range(workers)]

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)
    old = signal.signal(signal.SIGTERM, forward)
    try:
        if quiet:
            for c in children:
                c.wait()
        else:
            with progress:
                for c in children:
                    c.wait()
    except KeyboardInterrupt:  # the children got the same SIGINT from the terminal: let them checkpoint
        for c in children:
            c.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _die_with_parent() -> None:
    # Linux: a worker whose parent `fashionlab sweep` dies gets SIGTERM (it checkpoints and re-queues).
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)
