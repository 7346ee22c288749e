"""The reference recipes' results as markdown tables, generated from run folders, and the marked blocks
of README.md and docs/ that hold them.

The runs live in one fixed layout, `<runs>/<recipe>/<model>-s<seed>`, with seeds the recipe's seed and
the next N-1, each trained with exactly `make_config(recipe=R, model=M, seed=S)`. So the tables can be
rendered from whatever has finished while the rest trains, and a run is trained once whoever asks for
it (benchmarks/reproduce.py trains or reuses them, then rewrites the blocks).

A block sits between `<!-- reproduce:NAME:begin -->` and `<!-- reproduce:NAME:end -->`; only the text
between the markers is ever rewritten, and a file missing its markers is an error naming the file.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import atomic, pages, stats, studies
from .config import TrainConfig, make_config
from .errors import UserError
from .recipes import RECIPES, Recipe, get_recipe
from .run import RunFolder

# block name -> the recipes its table shows
BLOCKS: dict[str, tuple[str, ...]] = {
    "recipes": tuple(RECIPES),  # every reference recipe, as `fashionlab recipes` lists them
    "records": ("fast", "best"),  # the record recipes, in docs/records.md
}
# file (relative to the repository root) -> the blocks it holds
TARGETS: dict[str, tuple[str, ...]] = {"README.md": ("recipes",), "docs/records.md": ("records",)}
SCRIPT = "python benchmarks/reproduce.py"
ALPHA = 0.05  # the level of the one-sample test against the reported figure


class TableError(UserError, ValueError):
    """A recipe, seed count or marked block that cannot be used; the message names it."""


# --------------------------------------------------------------------------- which runs

@dataclass(frozen=True)
class PlannedRun:
    """One (recipe, model, seed) of the reference runs and its folder."""
    recipe: str
    model: str
    seed: int
    path: Path

    def config(self) -> TrainConfig:
        return make_config(recipe=self.recipe, model=self.model, seed=self.seed)


def recipe_seeds(recipe: Recipe, seeds: int) -> list[int]:
    """The recipe's own seed, then the next ones: `seeds` in all."""
    base = recipe.settings.get("seed", TrainConfig.seed)
    return [base + i for i in range(seeds)]


def check_request(recipe_names: Iterable[str], seeds: int) -> list[str]:
    """The recipe names, checked (known recipes, at least one seed); TableError otherwise."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise TableError(f"seeds={seeds!r}: expected an integer >= 1")
    names = list(recipe_names)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise TableError(f"unknown recipe(s) {', '.join(unknown)}; the reference recipes are {', '.join(RECIPES)}")
    return names


def plan(runs_dir: str | Path, recipe_names: Iterable[str], seeds: int) -> list[PlannedRun]:
    """Every run of these recipes, seed-major: stopped early, every recipe and model has its first seeds."""
    names = check_request(recipe_names, seeds)
    runs = []
    for i in range(seeds):
        for name in names:
            recipe = get_recipe(name)
            seed = recipe_seeds(recipe, seeds)[i]
            runs += [PlannedRun(name, model, seed, Path(runs_dir) / name / f"{model}-s{seed}")
                     for model in recipe.models]
    return runs


def train_all(runs_dir: str | Path, recipe_names: Iterable[str], seeds: int, dataset=None,
              log: Callable[[str], None] = lambda message: None) -> list[PlannedRun]:
    """Train every planned run that is not finished (an interrupted one is resumed, a finished one reused);
    returns the runs trained now. dataset: a Dataset or a function returning one (loaded once, when needed)."""
    from . import api
    trained = []
    for run in plan(runs_dir, recipe_names, seeds):
        folder = RunFolder(run.path)
        if folder.finished:
            folder.check_same_settings(run.config())
            continue
        log(f"{run.recipe} {run.model} seed {run.seed}: training -> {run.path}")
        done = api.train(recipe=run.recipe, model=run.model, out=run.path, reuse=True, seed=run.seed, quiet=True,
                         dataset=dataset() if callable(dataset) else dataset)
        log(f"{run.recipe} {run.model} seed {run.seed}: test accuracy {done.metrics['test_accuracy']:.4f} in "
            f"{done.metrics['train_seconds']:.0f} s of training")
        trained.append(run)
    return trained


# --------------------------------------------------------------------------- what finished

@dataclass
class RecipeRow:
    """One (recipe, model) row: its finished runs (of the seeds asked for) and the reported figure."""
    recipe: str
    model: str
    planned: list[PlannedRun]
    finished: list[dict[str, Any]]  # studies.load_run of each finished run
    reference: float | None

    @property
    def summary(self) -> dict[str, Any] | None:
        """studies.summarise of the finished runs: mean, spread, per-class recall, timings (None: no run)."""
        return studies.summarise({self.model: self.finished})[self.model] if self.finished else None

    @property
    def accuracies(self) -> list[float]:
        return [r["metrics"]["test_accuracy"] for r in self.finished]


def collect(runs_dir: str | Path, recipe_names: Iterable[str], seeds: int) -> list[RecipeRow]:
    """The finished runs of every (recipe, model), in plan order. A finished run trained with other settings
    than its recipe's is an error naming its folder: it is never mixed in."""
    planned = plan(runs_dir, recipe_names, seeds)
    rows: dict[tuple[str, str], RecipeRow] = {}
    for run in sorted(planned, key=lambda r: (list(RECIPES).index(r.recipe), r.model, r.seed)):
        row = rows.setdefault((run.recipe, run.model), RecipeRow(run.recipe, run.model, [], [],
                                                                 get_recipe(run.recipe).reference.get(run.model)))
        row.planned.append(run)
        folder = RunFolder(run.path)
        if folder.finished:
            folder.check_same_settings(run.config())
            row.finished.append(studies.load_run(run.path))
    return list(rows.values())


# --------------------------------------------------------------------------- the markdown

def reference_test(values: Sequence[float], reported: float | None) -> str:
    """Whether the reported figure lies within our runs' spread: a two-sided one-sample t-test of their mean."""
    if reported is None:
        return "no reported figure"
    if len(values) < stats.MIN_RUNS:
        return f"n < {stats.MIN_RUNS}: not enough runs"
    p = stats.one_sample(list(values), reported)
    # three significant digits: a p-value of 0.0497 must not read as 0.05 beside "outside"
    return f"{'within' if p >= ALPHA else 'outside'} (p = {'< 0.0001' if p < 1e-4 else f'{p:.3g}'})"


def command(recipe_names: Sequence[str] | None = None, seeds: int = 3, runs_dir: str | None = None) -> str:
    """The command that trains (or reuses) these runs and rewrites the tables."""
    parts = [SCRIPT, f"--seeds {seeds}"]
    if recipe_names:
        parts.append(f"--recipes {','.join(recipe_names)}")
    if runs_dir:
        parts.append(f"--runs {runs_dir}")
    return " ".join(parts)


def _row_cells(row: RecipeRow, seeds: int, runs_dir: str | None) -> list[str]:
    reported = f"{row.reference:.2%}" if row.reference is not None else "—"
    s = row.summary
    if s is None:
        return [f"`{row.recipe}`", f"`{row.model}`", f"not run: `{command([row.recipe], seeds, runs_dir)}`",
                f"0 of {seeds}", reported, "—", "—", "—"]
    n = f"{len(row.finished)}" if len(row.finished) == seeds else f"{len(row.finished)} of {seeds}"
    hardest = s["hardest_class"]
    return [f"`{row.recipe}`", f"`{row.model}`", pages.fmt_mean_std(row.accuracies, 100, 2, "%"), n, reported,
            reference_test(row.accuracies, row.reference),
            f"{hardest} ({s['per_class_accuracy'][hardest]['mean']:.1%})",
            f"{sum(map(steady_train_seconds, row.finished)) / len(row.finished):,.0f} s"]


def steady_train_seconds(run: dict[str, Any]) -> float:
    """A run's training time at its typical pace: the epochs it ran times its median epoch's seconds. An
    epoch slowed by other work on the machine, or by the run being paused, counts as a typical one, and
    so does a first epoch that still holds the one-time warm-up (runs trained before it was timed apart)."""
    seconds = [row["seconds"] for row in run["history"] if "seconds" in row]
    return statistics.median(seconds) * len(seconds) if seconds else run["metrics"]["train_seconds"]


def recipe_table(rows: Sequence[RecipeRow], seeds: int, runs_dir: str | None = None) -> str:
    """The markdown table: one row per (recipe, model)."""
    head = ["recipe", "model", "test accuracy (mean ± sd)", "n (seeds)", "reported by its study",
            f"reported figure within our spread? (one-sample t-test, {ALPHA})", "hardest class (mean recall)",
            "mean train time (epochs × median epoch)"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---|---|---:|"]
    lines += ["| " + " | ".join(_row_cells(r, seeds, runs_dir)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def model_comparisons(rows: Sequence[RecipeRow]) -> list[str]:
    """For each recipe with several models: each against the best by Welch's t-test (studies.claims),
    "not enough runs to say" below MIN_RUNS seeds per side."""
    lines = []
    for name in dict.fromkeys(r.recipe for r in rows):
        ran = [r for r in rows if r.recipe == name and r.finished]
        if len(ran) > 1:
            summary = {r.model: r.summary for r in ran}
            # with no caveats and no references, claims() starts with one line per model against the best
            lines += [f"- `{name}`: {line}" for line in studies.claims(summary, {})[:len(ran) - 1]]
    return lines


def machine_line(rows: Sequence[RecipeRow], cmd: str, cpu: str, date: str) -> str:
    """The command, the machine and the date: the CPU is the one the command ran on; torch, device,
    precision and threads are what the runs recorded."""
    runs = [r for row in rows for r in row.finished]
    total = sum(len(row.planned) for row in rows)

    def recorded(get) -> str:
        return ", ".join(sorted({str(get(r)) for r in runs})) or "—"
    env = lambda r: r["config"].get("environment", {})  # noqa: E731
    return (f"Generated by `{cmd}` on {date} from {len(runs)} of {total} runs finished; CPU {cpu}; torch "
            f"{recorded(lambda r: env(r).get('torch'))}; device {recorded(lambda r: r['metrics'].get('device'))}; "
            f"precision {recorded(lambda r: r['metrics'].get('precision'))}; "
            f"{recorded(lambda r: env(r).get('threads'))} threads.")


def legend() -> str:
    """What the columns mean."""
    return ("Test accuracy on the 10,000 test images, mean ± sample standard deviation over seeds (the recipe's "
            "seed and the next ones). \"Within\": a one-sample t-test finds the study's reported figure consistent "
            "with our runs' mean; \"outside\": it does not. The hardest class is the one of lowest mean recall. "
            "Train time is each run's epochs times its median epoch's seconds, without the one-time warm-up, so "
            "that an epoch slowed or paused by other work on the machine counts as a typical one; it depends on "
            "the machine and the threads.")


def render_block(name: str, rows: Sequence[RecipeRow], seeds: int, cpu: str, date: str,
                 runs_dir: str | None = None) -> str:
    """A block's markdown: the table of its recipes, the comparisons between a recipe's models, the legend,
    and the line with the command, the machine and the date."""
    shown = [r for r in rows if r.recipe in BLOCKS[name]]
    parts = [recipe_table(shown, seeds, runs_dir)]
    comparisons = model_comparisons(shown)
    if comparisons:
        parts.append("Between the models of one recipe:\n\n" + "\n".join(comparisons) + "\n")
    parts += [legend() + "\n", machine_line(shown, command(None, seeds, runs_dir), cpu, date) + "\n"]
    return "\n".join(parts)


# --------------------------------------------------------------------------- the marked blocks

def markers(name: str) -> tuple[str, str]:
    return f"<!-- reproduce:{name}:begin -->", f"<!-- reproduce:{name}:end -->"


def replace_block(text: str, name: str, body: str, where: str) -> str:
    """text with the part between the named table's markers replaced by body."""
    begin, end = markers(name)
    return replace_between(text, begin, end, body, where, f"where the {name} table goes")


def replace_between(text: str, begin: str, end: str, body: str, where: str, place: str = "") -> str:
    """text with the part between the begin and end markers replaced by body (the one way generated
    blocks are written into README.md and docs/); TableError naming `where` when the markers are
    missing, repeated or out of order."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise TableError(f"{where}: expected one {begin} followed by one {end} (found {text.count(begin)} and "
                         f"{text.count(end)}); add them {place or 'where the block goes'}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{body}{end}{tail}"


def _rewritten(path: Path, names: Sequence[str], bodies: dict[str, str]) -> tuple[str, str]:
    """The file's text and the text with each named block's body replaced."""
    if not path.is_file():
        raise TableError(f"{path}: no such file (it should hold the {', '.join(names)} table)")
    text = path.read_text()
    new = text
    for name in names:
        new = replace_block(new, name, bodies.get(name, ""), str(path))
    return text, new


def check_targets(root: str | Path, targets: dict[str, Sequence[str]] = TARGETS) -> None:
    """Every target file exists and holds its blocks' markers: checked before any training."""
    for rel, names in targets.items():
        _rewritten(Path(root) / rel, names, {})


def write_blocks(root: str | Path, bodies: dict[str, str], targets: dict[str, Sequence[str]] = TARGETS) -> list[Path]:
    """Write each block's body between its markers in every target file (each file replaced whole,
    atomically); returns the files that changed. Every file is checked before any is written."""
    changed = {}
    for rel, names in targets.items():
        path = Path(root) / rel
        text, new = _rewritten(path, names, bodies)
        if new != text:
            changed[path] = new
    for path, text in changed.items():
        atomic.write_text(path, text)
    return list(changed)
