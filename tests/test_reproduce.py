"""The results tables generated from runs: the marked blocks in README.md and docs/, the runs' layout,
reuse, and a table rendered from a few tiny runs (synthetic data: seconds, not hours)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from conftest import ROOT, synthetic_dataset
from fashionlab import tables
from fashionlab.errors import UserError

DS = synthetic_dataset(n_train=200, n_test=100)
# Faint bars in strong noise on the test images: seeds then differ in accuracy, and classes in recall.
NOISE = np.random.default_rng(1).integers(0, 180, DS.test_images.shape)
DS.test_images = (DS.test_images * 0.3 + NOISE).astype(np.uint8)
SCRIPT = ROOT / "benchmarks" / "reproduce.py"


def test_readme_and_docs_hold_the_marked_blocks():
    tables.check_targets(ROOT)
    for rel, names in tables.TARGETS.items():
        text = (ROOT / rel).read_text()
        for name in names:
            begin, end = tables.markers(name)
            assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), rel
    assert set(tables.BLOCKS["recipes"]) >= {"dense-vs-conv", "dropout-cnn", "cnn-vs-rnn", "augmented-cnn",
                                             "vgg-early-stop", "fast", "best"}


def test_the_runs_layout_is_the_recipe_seed_and_the_next():
    planned = tables.plan("R", ["cnn-vs-rnn", "fast"], 2)
    assert [(r.recipe, r.model, r.seed, str(r.path)) for r in planned] == [
        ("cnn-vs-rnn", "cnn_small", 4, "R/cnn-vs-rnn/cnn_small-s4"), ("cnn-vs-rnn", "lstm", 4, "R/cnn-vs-rnn/lstm-s4"),
        ("fast", "fast_lean", 0, "R/fast/fast_lean-s0"),
        ("cnn-vs-rnn", "cnn_small", 5, "R/cnn-vs-rnn/cnn_small-s5"), ("cnn-vs-rnn", "lstm", 5, "R/cnn-vs-rnn/lstm-s5"),
        ("fast", "fast_lean", 1, "R/fast/fast_lean-s1")]
    assert planned[0].config().to_dict() == tables.make_config(recipe="cnn-vs-rnn", model="cnn_small", seed=4).to_dict()
    with pytest.raises(UserError, match="unknown recipe.s. nope; the reference recipes are dense-vs-conv"):
        tables.plan("R", ["nope"], 3)
    with pytest.raises(UserError, match="seeds=0: expected an integer >= 1"):
        tables.plan("R", ["fast"], 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """dropout-cnn over 3 seeds, cnn-vs-rnn over 3 seeds with cnn_small's third seed missing; nothing else."""
    out = tmp_path_factory.mktemp("reproduce-runs")
    trained = tables.train_all(out, ["dropout-cnn", "cnn-vs-rnn"], 3, dataset=DS)
    assert len(trained) == 9
    shutil.rmtree(out / "cnn-vs-rnn" / "cnn_small-s6")
    return out


def _metrics(runs, recipe, model, seeds):
    return [json.loads((runs / recipe / f"{model}-s{s}" / "metrics.json").read_text()) for s in seeds]


def _steady_seconds(run_dir) -> float:
    """Epochs run times the median epoch's seconds, from the run's history."""
    seconds = [json.loads(line)["seconds"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return float(np.median(seconds)) * len(seconds)


def _table_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            rows[(cells[0].strip("`"), cells[1].strip("`"))] = cells[2:]
    return rows


def _hardest(ms):
    names = list(ms[0]["per_class"])
    recall = {n: np.mean([m["per_class"][n]["recall"] for m in ms]) for n in names}
    hardest = min(names, key=lambda n: recall[n])
    return f"{hardest} ({recall[hardest]:.1%})"


def test_the_table_is_rendered_from_the_runs(runs):
    rows = tables.collect(runs, tables.BLOCKS["recipes"], 3)
    block = tables.render_block("recipes", rows, 3, "Test CPU (2 cores)", "2026-01-02")
    table = _table_rows(block)
    assert list(table) == [(r, m) for r in tables.BLOCKS["recipes"] for m in tables.get_recipe(r).models]

    ms = _metrics(runs, "dropout-cnn", "cnn_dropout", (0, 1, 2))
    acc = np.array([m["test_accuracy"] for m in ms]) * 100
    p = scipy_stats.ttest_1samp(acc / 100, 0.8936).pvalue
    verdict = "within" if p >= 0.05 else "outside"
    assert len(set(acc)) > 1  # a real spread, so the test has something to test
    assert table[("dropout-cnn", "cnn_dropout")] == [
        f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f}%", "3", "89.36%",
        f"{verdict} (p = {'< 0.0001' if p < 1e-4 else f'{p:.3g}'})", _hardest(ms),
        f"{np.mean([_steady_seconds(runs / 'dropout-cnn' / f'cnn_dropout-s{s}') for s in (0, 1, 2)]):,.0f} s"]

    # two of three seeds: mean and spread, but no test
    small = _metrics(runs, "cnn-vs-rnn", "cnn_small", (4, 5))
    row = table[("cnn-vs-rnn", "cnn_small")]
    assert row[:5] == [f"{np.mean([m['test_accuracy'] for m in small]) * 100:.2f} ± "
                       f"{np.std([m['test_accuracy'] for m in small], ddof=1) * 100:.2f}%", "2 of 3", "88.00%",
                       "n < 3: not enough runs", _hardest(small)]
    assert table[("cnn-vs-rnn", "lstm")][1:3] == ["3", "86.20%"]
    # no runs: "not run" with the command that runs them
    assert table[("vgg-early-stop", "vgg")] == [
        "not run: `python benchmarks/reproduce.py --seeds 3 --recipes vgg-early-stop`", "0 of 3",
        "—", "—", "—", "—"]
    assert table[("fast", "fast_lean")][3] == "—"

    # between a recipe's models: Welch's test, or not enough runs to say
    assert "- `cnn-vs-rnn`: " in block and "not enough runs to say which is better" in block
    footer = block.strip().splitlines()[-1]
    planned = 3 * sum(len(tables.get_recipe(r).models) for r in tables.BLOCKS["recipes"])  # every recipe's models
    assert footer.startswith(f"Generated by `python benchmarks/reproduce.py --seeds 3` on 2026-01-02 from 8 of {planned} "
                             "runs finished; CPU Test CPU (2 cores); torch ")
    assert "device cpu; precision " in footer and "threads." in footer
    # the records block shows only its own recipes
    records = _table_rows(tables.render_block("records", rows, 3, "Test CPU", "2026-01-02"))
    assert list(records) == [("fast", "fast_lean"), ("best", "best")]


def test_finished_runs_are_reused_and_runs_of_other_settings_refused(runs, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("model.safetensors")}
    assert tables.train_all(runs, ["dropout-cnn"], 3, dataset=DS) == []
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("model.safetensors")} == before

    import fashionlab as fl
    odd = tmp_path / "dropout-cnn" / "cnn_dropout-s0"
    fl.train(recipe="dropout-cnn", out=odd, dataset=DS, quiet=True, epochs=1)
    with pytest.raises(UserError, match=f"{odd} holds a run trained with other settings .epochs: saved 1, asked 5"):
        tables.collect(tmp_path, ["dropout-cnn"], 3)


def _docs(root, readme_tail="end of readme\n"):
    (root / "docs").mkdir(parents=True, exist_ok=True)
    b, e = tables.markers("recipes")
    (root / "README.md").write_text(f"# title\n\nbefore\n{b}\nold table\n{e}\n{readme_tail}")
    b, e = tables.markers("records")
    (root / "docs" / "records.md").write_text(f"records\n{b}\n{e}\nafter\n")


def test_blocks_are_written_between_their_markers_only(tmp_path):
    _docs(tmp_path)
    changed = tables.write_blocks(tmp_path, {"recipes": "| new |\n", "records": "| fast |\n"})
    assert sorted(changed) == [tmp_path / "README.md", tmp_path / "docs" / "records.md"]
    assert (tmp_path / "README.md").read_text() == ("# title\n\nbefore\n<!-- reproduce:recipes:begin -->\n| new |\n"
                                                    "<!-- reproduce:recipes:end -->\nend of readme\n")
    assert (tmp_path / "docs" / "records.md").read_text() == ("records\n<!-- reproduce:records:begin -->\n| fast |\n"
                                                              "<!-- reproduce:records:end -->\nafter\n")
    assert tables.write_blocks(tmp_path, {"recipes": "| new |\n", "records": "| fast |\n"}) == []  # unchanged
    assert not list(tmp_path.rglob("*.part"))


def test_a_missing_marker_is_an_error_naming_the_file_and_nothing_is_written(tmp_path):
    _docs(tmp_path)
    records = tmp_path / "docs" / "records.md"
    records.write_text("records without markers\n")
    readme = (tmp_path / "README.md").read_text()
    with pytest.raises(UserError, match=f"{records}: expected one <!-- reproduce:records:begin --> followed by one "
                                        f"<!-- reproduce:records:end -->"):
        tables.write_blocks(tmp_path, {"recipes": "| new |\n", "records": "x\n"})
    assert (tmp_path / "README.md").read_text() == readme  # checked before anything is written
    (tmp_path / "README.md").unlink()
    with pytest.raises(UserError, match="README.md: no such file"):
        tables.check_targets(tmp_path)


def _script(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "FASHIONLAB_OFFLINE": "1"})


def test_the_script_renders_finished_runs_without_training(runs, tmp_path):
    _docs(tmp_path)
    before = sorted(p.relative_to(runs) for p in runs.rglob("*"))
    proc = _script("--no-train", "--runs", str(runs), "--root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.relative_to(runs) for p in runs.rglob("*")) == before  # nothing trained or written there
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# title\n\nbefore\n")
    assert readme.endswith("<!-- reproduce:recipes:end -->\nend of readme\n")
    assert "| `dropout-cnn` | `cnn_dropout` | " in readme and f"--runs {runs}`" in readme
    assert "| `fast` | `fast_lean` |" in (tmp_path / "docs" / "records.md").read_text()

    bad = _script("--no-train", "--recipes", "fast,nope", "--root", str(tmp_path))
    assert bad.returncode == 2 and bad.stderr.startswith("reproduce.py: error: unknown recipe(s) nope")
    (tmp_path / "docs" / "records.md").write_text("no markers\n")
    missing = _script("--no-train", "--runs", str(runs), "--root", str(tmp_path))
    assert missing.returncode == 2 and f"{tmp_path / 'docs' / 'records.md'}: expected one" in missing.stderr
    assert "Traceback" not in bad.stderr + missing.stderr


def test_train_time_counts_a_paused_or_crowded_epoch_as_a_typical_one():
    run = {"history": [{"epoch": 1, "seconds": 140.0}, {"epoch": 2, "seconds": 1450.0},  # paused mid-epoch
                       {"epoch": 3, "seconds": 100.0}, {"epoch": 4, "seconds": 110.0}],
           "metrics": {"train_seconds": 1800.0}}
    assert tables.steady_train_seconds(run) == 125.0 * 4
    assert tables.steady_train_seconds({"history": [], "metrics": {"train_seconds": 7.0}}) == 7.0
