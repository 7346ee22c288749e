"""What a sweep found: per-level and per-point mean, spread and seeds, tests, figures, HTML.

Main effects pool every run at a level (all other factors and seeds), so on a full grid each
level is compared over the same set of other settings. The test between the best level and
each other level is Welch's t-test (unequal variances) with Holm's correction over the
comparisons of that factor, so "significant" holds at the stated level for the whole factor,
not just for one lucky pair.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import pages
from ..stats import holm, welch
from .design import describe_point, point_id
from .spec import Spec, SpecError
from .storage import open_storage, quiet_optuna


@dataclass(frozen=True)
class RunResult:
    point: dict[str, str]  # factor -> level label
    seed: int
    value: float
    metrics: dict[str, Any]


@dataclass
class Row:
    """One level of a factor, or one design point: its runs' summary and its comparison with the best."""
    label: str
    values: list[float]  # the objective (a validation score): what chooses
    seeds: int
    test_values: list[float] = field(default_factory=list)  # the test score of the same runs: reported only
    diff: float | None = None  # this row minus the best row
    p: float | None = None  # Welch's two-sided p-value against the best
    p_adj: float | None = None  # Holm-adjusted over the group's comparisons
    verdict: str = ""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return _mean(self.values)

    @property
    def std(self) -> float:
        return _std(self.values)

    @property
    def test_mean(self) -> float:
        return _mean(self.test_values)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    m = sum(values) / len(values)
    return math.sqrt(sum((x - m) ** 2 for x in values) / (len(values) - 1))


@dataclass
class SweepResults:
    spec: Spec
    runs: list[RunResult]
    levels: dict[str, list[Row]]  # factor -> rows in the spec's level order
    points: list[Row]  # best first
    expected: int


def collect(spec: Spec, storage) -> list[RunResult]:
    """Every complete (point, seed) from the storage: the database alone is enough, wherever runs trained."""
    from optuna.trial import TrialState
    quiet_optuna()
    try:
        study_id = storage.get_study_id_from_name(spec.name)
    except KeyError:
        raise SpecError(f"{spec.path}: no study {spec.name!r} in this storage yet; run `fashionlab sweep "
                        f"{spec.path}` first (with the same --storage)") from None
    runs = []
    for t in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.COMPLETE,)):
        if "key" not in t.user_attrs:
            continue
        runs.append(RunResult({f.name: t.params[f.name] for f in spec.factors}, t.user_attrs["seed"], t.value,
                              t.user_attrs.get("metrics", {})))
    return runs


def compare_to_best(rows: list[Row], direction: str, alpha: float) -> list[Row]:
    """Mark the best row and test every other row against it (Welch, Holm-corrected)."""
    filled = [r for r in rows if r.values]
    if not filled:
        return rows
    sign = 1 if direction == "maximize" else -1
    best = max(filled, key=lambda r: sign * r.mean)
    tested = []
    for r in filled:
        if r is best:
            r.verdict = "best"
            continue
        r.diff = r.mean - best.mean
        r.p = welch(r.values, best.values)
        if r.p is None:
            r.verdict = "too few runs to test"
        else:
            tested.append(r)
    for r, p_adj in zip(tested, holm([r.p for r in tested])):
        r.p_adj = p_adj
        r.verdict = (f"{'worse' if sign * r.diff < 0 else 'differs'}, significant" if p_adj < alpha
                     else "not significantly different")
    for r in rows:
        if not r.values:
            r.verdict = "no runs yet"
    return rows


def _row(label: str, runs: list[RunResult], spec: Spec) -> Row:
    tests = [r.metrics.get(spec.reported_metric) for r in runs]
    return Row(label, [r.value for r in runs], len({r.seed for r in runs}),
               [float(t) for t in tests if t is not None])


def analyse(spec: Spec, runs: list[RunResult]) -> SweepResults:
    levels = {}
    for f in spec.factors:
        rows = []
        for label in f.labels:
            at = [r for r in runs if r.point[f.name] == label]
            rows.append(_row(label, at, spec))
        levels[f.name] = compare_to_best(rows, spec.direction, spec.alpha)
    by_point: dict[str, list[RunResult]] = {}
    for r in runs:
        by_point.setdefault(point_id(r.point), []).append(r)
    points = [_row(describe_point(group[0].point), group, spec) for group in by_point.values()]
    compare_to_best(points, spec.direction, spec.alpha)
    sign = 1 if spec.direction == "maximize" else -1
    points.sort(key=lambda r: -sign * r.mean)
    return SweepResults(spec, runs, levels, points, spec.total_trials)


# --------------------------------------------------------------------------- text

def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _p(x: float | None) -> str:
    return "-" if x is None else ("<0.0001" if x < 1e-4 else f"{x:.4f}")


def selection_note(spec: Spec) -> str:
    """Which score chose and which is reported: the objective is a validation score, the test score
    of the same runs is shown beside it and never chooses."""
    return (f"chosen by {spec.metric} ({spec.direction}, validation split); {spec.reported_metric} of the same "
            f"runs reported beside it, never used to choose; Welch's t-test against the best, Holm-corrected, "
            f"alpha {spec.alpha}")


def text_table(res: SweepResults, top_points: int = 10) -> str:
    spec = res.spec
    lines = [f"{spec.name}: {len(res.runs)}/{res.expected} runs complete; {selection_note(spec)}", ""]
    head = (f"{'factor':<12} {'level':<14} {'val mean':>8} {'std':>8} {'runs':>5} {'seeds':>5} {'diff':>8} "
            f"{'p (Holm)':>9} {'test mean':>9}  verdict")
    lines += [head, "-" * len(head)]
    for name, rows in res.levels.items():
        for r in rows:
            lines.append(f"{name:<12} {r.label:<14} {_fmt(r.mean):>8} {_fmt(r.std):>8} {r.n:>5} {r.seeds:>5} "
                         f"{_fmt(r.diff):>8} {_p(r.p_adj):>9} {_fmt(r.test_mean):>9}  {r.verdict}")
    lines += ["", f"design points (best first, top {min(top_points, len(res.points))} of {len(res.points)}):",
              f"{'point':<48} {'val mean':>8} {'std':>8} {'seeds':>5} {'p (Holm)':>9} {'test mean':>9}  verdict"]
    for r in res.points[:top_points]:
        lines.append(f"{r.label:<48} {_fmt(r.mean):>8} {_fmt(r.std):>8} {r.seeds:>5} {_p(r.p_adj):>9} "
                     f"{_fmt(r.test_mean):>9}  {r.verdict}")
    return "\n".join(lines)


def markdown_table(res: SweepResults) -> str:
    """The per-level table as Markdown, for docs."""
    spec = res.spec
    out = [f"| factor | level | {spec.metric} mean | std | runs | seeds | diff vs best | p (Welch, Holm) | verdict | "
           f"{spec.reported_metric} mean (reported, not used to choose) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for name, rows in res.levels.items():
        for r in rows:
            out.append(f"| {name} | {r.label} | {_fmt(r.mean)} | {_fmt(r.std)} | {r.n} | {r.seeds} | "
                       f"{_fmt(r.diff)} | {_p(r.p_adj)} | {r.verdict} | {_fmt(r.test_mean)} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- figures

def main_effects_figure(res: SweepResults):
    names = list(res.levels)
    fig = pages.new_figure(3.2 * len(names) + 0.6, 3.4)
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = res.levels[name]
        xs = range(len(rows))
        for x, r in zip(xs, rows):  # every run, jittered, behind the means
            jitter = [x + 0.08 * ((i % 5) - 2) / 2 for i in range(r.n)]
            ax.scatter(jitter, r.values, s=9, color="#9db4d0", zorder=1)
        means = [r.mean for r in rows]
        stds = [0 if math.isnan(r.std) else r.std for r in rows]
        ax.errorbar(list(xs), means, yerr=stds, fmt="o-", color="#1f4e8c", capsize=4, zorder=2)
        ax.set_xticks(list(xs), [r.label for r in rows])
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(res.spec.metric)
    fig.suptitle("main effects: mean ± standard deviation over all runs at each level (dots: runs)", fontsize=9)
    return fig


def heatmap_figure(res: SweepResults, a: str, b: str):
    import numpy as np
    fa, fb = res.spec.factor(a), res.spec.factor(b)
    grid = np.full((len(fa.labels), len(fb.labels)), np.nan)
    counts = np.zeros_like(grid, dtype=int)
    for i, la in enumerate(fa.labels):
        for j, lb in enumerate(fb.labels):
            v = [r.value for r in res.runs if r.point[a] == la and r.point[b] == lb]
            if v:
                grid[i, j], counts[i, j] = sum(v) / len(v), len(v)
    fig = pages.new_figure(1.3 * len(fb.labels) + 2.4, 1.0 * len(fa.labels) + 1.6)
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis" if res.spec.direction == "maximize" else "viridis_r", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if counts[i, j]:
                ax.text(j, i, f"{grid[i, j]:.4f}\nn={counts[i, j]}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_xticks(range(len(fb.labels)), fb.labels)
    ax.set_yticks(range(len(fa.labels)), fa.labels)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    fig.colorbar(im, ax=ax, label=f"mean {res.spec.metric}")
    ax.set_title(f"{a} x {b} (mean over seeds and other factors)", fontsize=9)
    return fig


# --------------------------------------------------------------------------- HTML
def _rows_html(rows: list[Row], first_col: str | None = None) -> str:
    out = []
    for r in rows:
        cls = "best" if r.verdict == "best" else ("sig" if "significant" in r.verdict and "not" not in r.verdict else "")
        cells = ([f"<td>{html.escape(first_col)}</td>"] if first_col else []) + [
            f"<td>{html.escape(r.label)}</td>", f"<td class=num>{_fmt(r.mean)}</td>", f"<td class=num>{_fmt(r.std)}</td>",
            f"<td class=num>{r.n}</td>", f"<td class=num>{r.seeds}</td>", f"<td class=num>{_fmt(r.diff)}</td>",
            f"<td class=num>{_p(r.p)}</td>", f"<td class=num>{_p(r.p_adj)}</td>",
            f"<td class=verdict>{html.escape(r.verdict)}</td>", f"<td class=num>{_fmt(r.test_mean)}</td>"]
        out.append(f"<tr class=\"{cls}\">" + "".join(cells) + "</tr>")
    return "\n".join(out)


def render_html(res: SweepResults) -> str:
    spec = res.spec
    head = (f"<th>{spec.metric} mean</th><th>std</th><th>runs</th><th>seeds</th><th>diff vs best</th>"
            f"<th>p (Welch)</th><th>p (Holm)</th><th>verdict</th><th>{spec.reported_metric} mean (reported)</th>")
    parts = [f"<p>{html.escape(spec.description)}</p>" if spec.description else "",
             f"<p class=meta>{len(res.runs)} of {res.expected} runs complete · model {spec.model}"
             f"{' · recipe ' + spec.recipe if spec.recipe else ''} · {html.escape(selection_note(spec))} · "
             f"{len(spec.seeds)} seeds per point · sampler {spec.sampler} · spec {html.escape(str(spec.path))} · "
             f"written {datetime.now():%Y-%m-%d %H:%M}</p>",
             "<h2>Main effects</h2>",
             f"<p>Each level pools every run at that level. The best level is compared with each other level by "
             f"Welch's t-test; p-values are Holm-corrected within a factor; significant means below {spec.alpha}.</p>"]
    if res.runs:
        parts.append(pages.figure_html(main_effects_figure(res), "main effects", "main_effects"))
    parts.append(f"<table><tr><th>factor</th><th>level</th>{head}</tr>")
    for name, rows in res.levels.items():
        parts.append(_rows_html(rows, name))
    parts.append("</table>")
    if spec.heatmap and res.runs:
        a, b = spec.heatmap
        parts += [f"<h2>{html.escape(a)} × {html.escape(b)}</h2>",
                  pages.figure_html(heatmap_figure(res, a, b), f"heatmap {a} x {b}", "heatmap")]
    parts += ["<h2>Design points</h2>",
              "<p>Mean and spread over seeds; each point is tested against the best point (Welch, Holm over all points).</p>",
              f"<table><tr><th>point</th>{head}</tr>", _rows_html(res.points), "</table>"]
    return pages.html_page(f"Sweep {spec.name}", [pages.Section("Results", [p for p in parts if p])])


def write_report(spec: Spec, storage_url: str | None = None, html_path: str | Path | None = None):
    """Analyse the stored results; write the HTML report; returns (results, path)."""
    if storage_url is None and not (spec.folder / "sweep.db").exists():
        raise SpecError(f"{spec.path}: no results in {spec.folder / 'sweep.db'}; run `fashionlab sweep {spec.path}` "
                        f"first, or give the --storage (and --out) the sweep used")
    storage = open_storage(storage_url or spec.default_storage())
    res = analyse(spec, collect(spec, storage))
    path = Path(html_path) if html_path else spec.folder / "report.html"
    from ..atomic import write_text
    write_text(path, render_html(res))
    return res, path
