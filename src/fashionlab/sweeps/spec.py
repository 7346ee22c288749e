"""The experiment spec: a TOML file read and validated into a Spec; every error names the file and the field.

A spec names the base model and recipe, the factors and their levels, the seeds, the budget and
the sampler (grid, random or TPE), the data and what the report shows.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import config, models
from ..errors import UserError
from .design import all_points, describe_point, trial_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

SAMPLERS = ("grid", "random", "tpe")
METRICS = {"test_accuracy": "maximize", "test_loss": "minimize", "val_accuracy": "maximize", "val_loss": "minimize"}
# What may choose between settings (the objective), and the test score reported beside each: choosing on
# the test set would make every reported test score optimistic.
OBJECTIVES = {"val_accuracy": "test_accuracy", "val_loss": "test_loss"}
DIRECTIONS = ("maximize", "minimize")
# Training settings a factor or [train] may not set: the spec names them elsewhere, or they are per trial.
RESERVED_TRAIN = {"model", "model_args", "recipe", "seed", "class_names", "dataset"}
# Convnet factors that together build `channels`: block i has filters * 2**i channels, depth blocks.
DERIVED = ("filters", "depth")
SECTIONS = ("experiment", "train", "model_args", "factors", "data", "report")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
EXPERIMENT_FIELDS = {"name", "description", "model", "recipe", "metric", "direction", "seeds", "sampler", "points",
                     "sampler_seed", "folder"}


class SpecError(UserError):
    """An experiment spec (or the study stored for it) is invalid; names the file and the field."""


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
    def reported_metric(self) -> str:
        """The test score shown beside the objective, after selection; it never chooses."""
        return OBJECTIVES[self.metric]

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
        from .storage import sqlite_url
        return sqlite_url(self.folder / "sweep.db")

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


def _check_setting(path: Path, where: str, name: str, value: Any) -> None:
    """A training setting's value, checked by the settings table itself (config.py)."""
    try:
        config.check_setting(name, value)
    except config.ConfigError as e:
        raise _spec_error(path, where, str(e)) from None


def _family_args(model: str) -> set[str]:
    import inspect
    family = models.FAMILIES[models.MODELS[model].family]
    return {p for p in inspect.signature(family).parameters if p not in ("self", "num_classes")}


def load_spec(path: str | Path, folder: str | Path | None = None) -> Spec:
    """Read and validate a spec file; every error names the file, the field and what was expected."""
    path = Path(path)
    raw = _read_spec_file(path)
    exp = _validate_experiment(path, raw.get("experiment", {}))
    train_settings = _validate_train(path, raw.get("train", {}))
    family_args = _family_args(exp["model"])
    model_args = _validate_model_args(path, raw.get("model_args", {}), exp["model"], family_args)
    factors = _validate_factors(path, raw.get("factors", {}), exp["model"], family_args, train_settings, model_args)
    data_dir, class_names = _validate_data(path, raw.get("data", {}))
    heatmap, alpha = _validate_report(path, raw.get("report", {}), factors)
    exp["folder"] = Path(folder) if folder else Path(exp["folder"])
    spec = Spec(path=path, **exp, train=train_settings, model_args=model_args, factors=factors, data_dir=data_dir,
                class_names=class_names, heatmap=heatmap, alpha=float(alpha))
    _validate_points(spec)
    return spec


def _read_spec_file(path: Path) -> dict[str, Any]:
    """The file's TOML, every top-level entry a known [section]."""
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
    return raw


def _experiment_field(path: Path, exp: dict, key: str, kinds: tuple, expected: str, default: Any = ...) -> Any:
    """[experiment] key, type-checked; missing: the default, or an error when there is none."""
    where = f"[experiment] {key}"
    if key not in exp:
        if default is ...:
            raise _spec_error(path, where, f"missing; expected {expected}")
        return default
    return _check_type(path, where, exp[key], kinds, expected)


def _validate_experiment(path: Path, table: dict) -> dict[str, Any]:
    """The [experiment] table as Spec fields (folder as the spec's text; `--out` may replace it)."""
    exp = dict(table)
    for key in exp:
        if key not in EXPERIMENT_FIELDS:
            raise _spec_error(path, f"[experiment] {key}",
                              f"unknown field; known fields: {', '.join(sorted(EXPERIMENT_FIELDS))}")
    name = _experiment_field(path, exp, "name", (str,), "a name of letters, digits, '-', '_' or '.'")
    if not NAME_RE.match(name):
        raise _spec_error(path, "[experiment] name", f"expected letters, digits, '-', '_' or '.', got {name!r}")
    model, recipe = _validate_model_and_recipe(path, exp)
    metric, direction = _validate_metric(path, exp)
    seeds = _validate_seeds(path, exp)
    sampler, points = _validate_sampler(path, exp)
    return {"name": name, "model": model, "recipe": recipe, "metric": metric, "direction": direction,
            "seeds": seeds, "sampler": sampler, "points": points,
            "sampler_seed": _experiment_field(path, exp, "sampler_seed", (int,), "an integer", 0),
            "folder": _experiment_field(path, exp, "folder", (str,), "a folder path", f"runs/sweeps/{name}"),
            "description": _experiment_field(path, exp, "description", (str,), "a string", "")}


def _validate_model_and_recipe(path: Path, exp: dict) -> tuple[str, str | None]:
    model = _experiment_field(path, exp, "model", (str,), "a registered model name")
    if model not in models.MODELS:
        raise _spec_error(path, "[experiment] model",
                          f"unknown model {model!r}; expected one of {', '.join(sorted(models.MODELS))}")
    recipe = _experiment_field(path, exp, "recipe", (str,), "a recipe name", None)
    if recipe is not None:
        from ..recipes import RECIPES
        if recipe not in RECIPES:
            raise _spec_error(path, "[experiment] recipe",
                              f"unknown recipe {recipe!r}; expected one of {', '.join(sorted(RECIPES))}")
    return model, recipe


def _validate_metric(path: Path, exp: dict) -> tuple[str, str]:
    metric = _experiment_field(path, exp, "metric", (str,), f"one of {', '.join(OBJECTIVES)}", "val_accuracy")
    if metric in METRICS and metric not in OBJECTIVES:
        raise _spec_error(path, "[experiment] metric", (
            f"{metric} is a test score, and the metric is what the sweep chooses settings by: choosing on the "
            f"test set makes every reported test score optimistic. Use {_validation_twin(metric)} (measured on "
            f"the validation split, [train] val_split); test scores are still recorded and reported beside it"))
    if metric not in OBJECTIVES:
        raise _spec_error(path, "[experiment] metric", f"expected one of {', '.join(OBJECTIVES)}, got {metric!r}")
    direction = _experiment_field(path, exp, "direction", (str,), "maximize or minimize", METRICS[metric])
    if direction not in DIRECTIONS:
        raise _spec_error(path, "[experiment] direction", f"expected maximize or minimize, got {direction!r}")
    return metric, direction


def _validation_twin(test_metric: str) -> str:
    return next(v for v, t in OBJECTIVES.items() if t == test_metric)


def _validate_seeds(path: Path, exp: dict) -> tuple[int, ...]:
    seeds_raw = _experiment_field(path, exp, "seeds", (int, list),
                                  "a number of seeds (>= 1) or a list of distinct integer seeds", 3)
    if isinstance(seeds_raw, int):
        if seeds_raw < 1:
            raise _spec_error(path, "[experiment] seeds", f"expected a number of seeds >= 1, got {seeds_raw}")
        return tuple(range(seeds_raw))
    if not seeds_raw or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds_raw) \
            or len(set(seeds_raw)) != len(seeds_raw):
        raise _spec_error(path, "[experiment] seeds", f"expected a list of distinct integers >= 0, got {seeds_raw!r}")
    return tuple(seeds_raw)


def _validate_sampler(path: Path, exp: dict) -> tuple[str, int | None]:
    sampler = _experiment_field(path, exp, "sampler", (str,), f"one of {', '.join(SAMPLERS)}", "grid")
    if sampler not in SAMPLERS:
        raise _spec_error(path, "[experiment] sampler", f"expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    points = _experiment_field(path, exp, "points", (int,), "a number of design points >= 1", None)
    if sampler != "grid" and points is None:
        raise _spec_error(path, "[experiment] points", f"missing; the {sampler} sampler needs the number of "
                                                       "design points to try (an integer >= 1)")
    if points is not None and points < 1:
        raise _spec_error(path, "[experiment] points", f"expected an integer >= 1, got {points}")
    if sampler == "grid" and points is not None:
        raise _spec_error(path, "[experiment] points", "the grid sampler runs every point; remove `points` "
                                                       "or choose sampler = \"random\" or \"tpe\"")
    return sampler, points


def _validate_train(path: Path, table: dict) -> dict[str, Any]:
    kinds = set(config.setting_names())
    for key, value in table.items():
        where = f"[train] {key}"
        if key in RESERVED_TRAIN:
            raise _spec_error(path, where, "set this in [experiment] (model, recipe, seeds), [model_args] or [data]")
        if key not in kinds:
            raise _spec_error(path, where, f"unknown training setting; expected one of "
                                           f"{', '.join(sorted(set(kinds) - RESERVED_TRAIN))}")
        _check_setting(path, where, key, value)
    return dict(table)


def _validate_model_args(path: Path, table: dict, model: str, family_args: set[str]) -> dict[str, Any]:
    model_args = dict(table)
    for key in model_args:
        if key not in family_args:
            raise _spec_error(path, f"[model_args] {key}", f"not an argument of model {model!r} "
                                                           f"(family {models.MODELS[model].family}); expected one of "
                                                           f"{', '.join(sorted(family_args))}")
    return model_args


def _validate_factors(path: Path, table: dict, model: str, family_args: set[str], train_settings: dict,
                      model_args: dict) -> tuple[Factor, ...]:
    if not table:
        raise _spec_error(path, "[factors]", "missing or empty; expected at least one factor with its levels, "
                                             "e.g. kernel = [3, 5, 7]")
    kinds = set(config.setting_names())
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
                _check_setting(path, where, name, lvl)
        labels = [level_label(v) for v in levels]
        if len(set(labels)) != len(labels):
            raise _spec_error(path, where, f"expected distinct levels, got {levels!r}")
        factors.append(Factor(name, tuple(levels), target))
    return tuple(factors)


def _validate_data(path: Path, table: dict) -> tuple[str | None, tuple[str, ...] | None]:
    """[data]: (data_dir, class_names); a custom dataset's class names need its folder."""
    data_section = dict(table)
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
    return data_dir, class_names


def _validate_report(path: Path, table: dict,
                     factors: tuple[Factor, ...]) -> tuple[tuple[str, str] | None, float]:
    """[report]: (heatmap, alpha); the heatmap defaults to the first two factors."""
    report = dict(table)
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
    return heatmap, alpha


def _validate_points(spec: Spec) -> None:
    """Build the configuration and the model of every distinct point, so a bad level fails now, not at trial 57."""
    checked: set[str] = set()
    for point in itertools.islice(all_points(spec), 2000):
        try:
            cfg = trial_config(spec, point, spec.seeds[0])
        except (ValueError, KeyError) as e:
            raise _spec_error(spec.path, f"design point {describe_point(point)}", str(e)) from None
        if not cfg.val_split:
            raise _spec_error(spec.path, "[train] val_split", f"the metric {spec.metric} is measured on a validation "
                                                              f"split: set val_split > 0 (the recipe's is 0)")
        key = json.dumps(cfg.model_args, sort_keys=True, default=str)
        if key in checked:
            continue
        checked.add(key)
        try:
            models.build_model(cfg.model, **cfg.model_args)
        except (ValueError, TypeError) as e:
            raise _spec_error(spec.path, f"design point {describe_point(point)}", str(e)) from None
