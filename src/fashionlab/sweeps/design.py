"""The design: its points, their keys and folder names, each trial's training configuration, the sampler."""

from __future__ import annotations

import itertools
import random
import re
from typing import TYPE_CHECKING, Any

from .. import models

if TYPE_CHECKING:
    from .spec import Spec

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
    from ..config import make_config
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


def make_sampler(spec: Spec):
    import optuna
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.sampler_seed)
    # Grid and random designs are enqueued; this sampler only ever sees fixed parameters.
    return optuna.samplers.RandomSampler(seed=spec.sampler_seed)


def trial_attrs(point: Point, seed: int) -> dict[str, Any]:
    """The user attributes that identify a queued trial: its key, its point and its seed."""
    return {"key": trial_key(point, seed), "point": point_id(point), "seed": seed}
