"""The label audit (fashionlab.label_audit): confident learning, the folds, the audit's files, training
without the suspects, and the refusals of bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import fashionlab as fl
from fashionlab import data as data_mod, label_audit, run as run_mod, studies
from fashionlab.config import ConfigError
from fashionlab.schema import RunError

from conftest import run_cli, synthetic_dataset

FLIPS = 24  # of 400 training images: 6%


@pytest.fixture(scope="module")
def flipped():
    """Tiny learnable data with FLIPS training labels moved to the next class; the flipped indices."""
    ds = synthetic_dataset(400, 100)
    flips = np.sort(np.random.default_rng(1).choice(400, FLIPS, replace=False))
    ds.train_labels[flips] = (ds.train_labels[flips] + 1) % 10
    return ds, flips


@pytest.fixture(scope="module")
def audited(flipped, tmp_path_factory):
    ds, _ = flipped
    return fl.audit("fast-full", out=tmp_path_factory.mktemp("audit"), folds=2, dataset=ds, epochs=4)


# --------------------------------------------------------------------------- confident learning

def _noisy_probabilities(n=3000, classes=5, flip_share=0.05, seed=0):
    """Probabilities of a fair model of the true labels, and given labels with some flipped."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = true.copy()
    flips = rng.choice(n, int(flip_share * n), replace=False)
    given[flips] = (true[flips] + rng.integers(1, classes, len(flips))) % classes
    return probs, given, set(flips.tolist())


def test_confident_learning_finds_flipped_labels_and_ranks_the_surest_first():
    probs, given, flips = _noisy_probabilities()
    found = label_audit.find_label_issues(probs, given)
    hits = flips & set(found.index.tolist())
    assert len(hits) / len(flips) > 0.8 and len(hits) / len(found) > 0.6
    assert np.all(np.diff(found.p_given) >= 0)  # least probable given label first
    assert np.all(found.suggested != found.given) and np.all(found.suggested == probs[found.index].argmax(1))
    assert found.joint.sum() <= len(given) and found.joint.shape == (5, 5)
    assert abs(found.estimated_errors - len(flips)) < 0.5 * len(flips)


def test_clean_labels_of_a_confident_model_have_no_suspects():
    probs, given, _ = _noisy_probabilities(flip_share=0.0)
    correct = probs.argmax(1) == given  # the model's own mistakes aside
    found = label_audit.find_label_issues(probs[correct], given[correct])
    assert len(found) == 0


def test_folds_cover_every_image_once_and_keep_class_shares():
    labels = np.repeat(np.arange(3), [50, 31, 19])
    folds = label_audit.stratified_folds(labels, 4, seed=7)
    assert sorted(np.concatenate(folds).tolist()) == list(range(100))
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for f in folds:
        counts = np.bincount(labels[f], minlength=3)
        assert np.all(np.abs(counts - np.array([50, 31, 19]) / 4) <= 1)
    assert [f.tolist() for f in folds] == [f.tolist() for f in label_audit.stratified_folds(labels, 4, seed=7)]


# --------------------------------------------------------------------------- the audit

def test_audit_writes_its_files_and_each_fold_predicts_only_images_it_left_out(audited, flipped):
    ds, flips = flipped
    s = audited.summary
    assert {p.name for p in audited.folder.iterdir()} >= {"audit.csv", "audit.html", "audit.json",
                                                          "probabilities.npz", "folds"}
    held = []
    for run in audited.folds:  # ordinary run folders, whose config.json names the images they left out
        excluded = run.config.exclude
        assert run.finished and run.record["split"]["train"] == 400 - len(excluded)
        held += excluded
    assert sorted(held) == list(range(400))
    train_suspects = {r["index"] for r in audited.suspects if r["split"] == "train"}
    assert len(train_suspects & set(flips.tolist())) >= 0.7 * FLIPS
    assert s["suspects"]["train"] == len(train_suspects) and s["images"] == {"train": 400, "test": 100}
    with np.load(audited.folder / "probabilities.npz") as npz:
        assert npz["train"].shape == (400, 10) and np.allclose(npz["test"].sum(1), 1, atol=1e-4)
    rows = list(csv.DictReader(audited.csv.open()))
    assert [r["index"] for r in rows] == [str(r["index"]) for r in audited.suspects]
    assert rows[0]["train_sha256"] == data_mod.train_sha256(ds) and rows[0]["given_name"].startswith("class")
    page = audited.page.read_text()
    assert page.count('<div class="tile"') == len(rows) and "data:image/png;base64," in page
    assert "&rarr;" in page and "fashionlab train --exclude audit.csv" in page
    assert json.loads((audited.folder / "audit.json").read_text())["folds"] == 2


def test_a_second_audit_reuses_every_fold(audited, flipped):
    again = fl.audit("fast-full", out=audited.folder, folds=2, dataset=flipped[0], epochs=4)
    assert again.summary["folds_trained"] == 0 and again.suspects == audited.suspects


def test_an_audit_folder_of_other_settings_is_refused_not_overwritten(audited, flipped):
    with pytest.raises(RunError, match="other settings"):
        fl.audit("fast-full", out=audited.folder, folds=2, dataset=flipped[0], epochs=3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(folds=1), "folds=1: expected an integer from 2 to 20"),
    (dict(folds=21), "folds=21"),
    (dict(folds="5"), "folds='5'"),
    (dict(recipe="nope"), "unknown recipe 'nope'"),
    (dict(exclude=[1, 2]), "exclude is not a setting of an audit"),
    (dict(epochs=0), "epochs=0: expected an integer >= 1"),
])
def test_audit_refuses_bad_arguments_before_training(tmp_path, kwargs, message):
    with pytest.raises((label_audit.AuditError, ConfigError), match=message):
        fl.audit(**{"recipe": "fast", "out": tmp_path / "a", "dataset": synthetic_dataset(), **kwargs})
    assert not (tmp_path / "a" / "folds").exists()


# --------------------------------------------------------------------------- training without the suspects

def test_train_without_the_suspects_records_them_and_reuses_only_the_same_list(audited, flipped, tmp_path):
    ds, _ = flipped
    suspects = sorted(r["index"] for r in audited.suspects if r["split"] == "train")
    run = fl.train(recipe="fast", out=tmp_path / "r", dataset=ds, quiet=True, epochs=1, exclude=audited.csv)
    assert run.record["exclude"] == suspects and run.config.exclude == suspects
    assert run.record["split"]["train"] == 400 - len(suspects)
    same = fl.train(recipe="fast", out=tmp_path / "r", dataset=ds, quiet=True, epochs=1, exclude=str(audited.csv),
                    reuse=True)
    assert same.metrics_path.stat().st_mtime == run.metrics_path.stat().st_mtime
    with pytest.raises(RunError, match="exclude: saved"):
        fl.train(recipe="fast", out=tmp_path / "r", dataset=ds, quiet=True, epochs=1, exclude=suspects[1:], reuse=True)
    report = (tmp_path / "report.html")
    run.report(out=report, with_explain=False, dataset=ds)
    assert f"{len(suspects):,} items]" in report.read_text()  # the list shown short, not in full


def _audit_csv(tmp_path, audited, edit):
    rows = [dict(r) for r in csv.DictReader(audited.csv.open())]
    header = list(rows[0])
    header, rows = edit(header, rows) or (header, rows)
    path = tmp_path / "edited.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows([[r.get(h, "") for h in header] for r in rows])
    return path


def _set(column, value, row=0):
    def edit(header, rows):
        rows[row][column] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_set("index", "99999"), "image index 99999 is beyond this dataset's 400 training images"),
    (_set("index", "-3"), "index '-3': expected a whole number >= 0"),
    (_set("index", "1e3"), "index '1e3'"),
    (_set("split", "validation"), "split 'validation': expected train or test"),
    (_set("train_sha256", "0" * 64), "made on other training data"),
    (_set("given", "11"), "not 11; the CSV was edited or is from other data"),
    (lambda h, rows: (h, rows + rows[:1]), "listed twice"),
    (lambda h, rows: ([c for c in h if c != "train_sha256"], rows), "no train_sha256 column; not an audit's CSV"),
    (lambda h, rows: (h, [{**r, "split": "test"} for r in rows[:1]]), "lists no suspected training images"),
])
def test_an_audit_csv_that_does_not_fit_the_data_is_refused_with_the_line(audited, flipped, tmp_path, edit, message):
    path = _audit_csv(tmp_path, audited, edit)
    with pytest.raises(label_audit.AuditError, match=message):
        label_audit.read_exclusions(path, flipped[0])


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    (b"a,b\n1,2\n", "no split, index, given, train_sha256 column"),
    (b"", "no split, index, given, train_sha256 column"),
])
def test_files_that_are_not_audit_csvs_are_refused(flipped, tmp_path, content, message):
    path = tmp_path / "audit.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(label_audit.AuditError, match=message):
        label_audit.read_exclusions(path, flipped[0])
    with pytest.raises(label_audit.AuditError, match="not a file"):
        label_audit.read_exclusions(tmp_path, flipped[0])


@pytest.mark.parametrize("value, message", [
    ([3, 1], "a sorted list of distinct image indices"),
    ([1, 1], "a sorted list of distinct image indices"),
    ([-1], "a sorted list"),
    (["1"], "a list of integers"),
    ([], "a sorted list"),
])
def test_a_tampered_exclude_in_config_json_is_refused(tmp_path, value, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": "fast", "exclude": value}))
    with pytest.raises(RunError, match=message):
        run_mod.RunFolder(tmp_path).config


def test_indices_beyond_the_dataset_are_refused_before_training(tmp_path):
    with pytest.raises(label_audit.AuditError, match="outside this dataset's 200 training images"):
        fl.train(recipe="fast", out=tmp_path / "r", dataset=synthetic_dataset(), quiet=True, exclude=[5, 200])
    assert not (tmp_path / "r").exists()


def test_audit_exclude_study_trains_each_seed_with_and_without_the_suspects(tmp_path):
    study = studies.get_study("audit-exclude")
    plan = studies.study_plan(study, tmp_path, 2, {"exclude": [3, 5], "epochs": 1})
    assert [(cfg.seed, cfg.exclude, d.relative_to(tmp_path).parts[0]) for cfg, d in plan] == [
        (0, None, "all-images"), (0, [3, 5], "without-suspects"), (1, None, "all-images"), (1, [3, 5], "without-suspects")]
    with pytest.raises(studies.StudyError, match="give the audit's CSV"):
        studies.study_plan(study, tmp_path, 2, {})


# --------------------------------------------------------------------------- the command line

def test_audit_command_refuses_bad_input_with_one_line(tmp_path):
    for args, message in [(["--folds", "1"], "folds=1: expected an integer from 2 to 20"),
                          (["--recipe", "nope"], "unknown recipe 'nope'"),
                          (["--data-dir", str(tmp_path / "none"), "--class-names", "a,b"], str(tmp_path / "none"))]:
        proc = run_cli("audit", "--out", str(tmp_path / "a"), *args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fashionlab audit: error:") and message in lines[0]
    proc = run_cli("train", "--recipe", "fast", "--out", str(tmp_path / "r"), "--exclude", str(tmp_path / "x.csv"),
                   "--data-dir", str(tmp_path), "--class-names", "a,b")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
