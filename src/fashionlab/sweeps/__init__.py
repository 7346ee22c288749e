"""Controlled experiments: a declared design, several seeds per point, run on Optuna RDB storage.

A spec file (TOML) names the base model and recipe, the factors and their levels, the seeds, the
budget and the sampler (grid, random or TPE). One (design point, seed) pair is one Optuna trial,
identified by its key; each trial trains through `train.train` into `<folder>/runs/<key>`.

    spec      the spec file, validated into a Spec
    design    the design's points, trial keys and each trial's TrainConfig; the sampler
    storage   Optuna storage (SQLite or PostgreSQL) and the study, with its design enqueued once
    worker    a worker claiming trials, with heartbeats and retries; run_point trains one trial
    progress  the tally of a sweep's trials and the live progress line
    runner    `fashionlab sweep`: local workers, in this process or in child processes
    report    `fashionlab sweep-report`: means, spreads, Welch tests with Holm's correction, HTML
"""

from __future__ import annotations

from .design import (Point, all_points, describe_point, design_points, make_sampler, point_id, trial_attrs,
                     trial_config, trial_key)
from .progress import ProgressLine, Tally, tally
from .runner import run_sweep
from .spec import Factor, Spec, SpecError, level_label, load_spec
from .storage import open_storage, open_study, quiet_optuna
from .worker import Worker, run_point

# The report's names load with the report (and matplotlib) on first use, so a worker process never pays for them.
_REPORT_NAMES = ("RunResult", "Row", "SweepResults", "collect", "welch", "holm", "compare_to_best", "analyse",
                 "text_table", "markdown_table", "main_effects_figure", "heatmap_figure", "render_html", "write_report")

__all__ = ["Point", "all_points", "describe_point", "design_points", "make_sampler", "point_id", "trial_attrs",
           "trial_config", "trial_key", "ProgressLine", "Tally", "tally", "run_sweep", "Factor", "Spec", "SpecError",
           "level_label", "load_spec", "open_storage", "open_study", "quiet_optuna", "Worker", "run_point",
           *_REPORT_NAMES]


def __getattr__(name: str):
    if name in _REPORT_NAMES:
        from . import report
        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_REPORT_NAMES))
