"""Corrupted test images: the corruptions, the scores on them, their file, and where they are shown."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fashionlab import corruptions, robustness
from fashionlab.errors import UserError
from fashionlab.run import RunFolder
from fashionlab.schema import RunError

from conftest import run_cli
from serve_support import real_dataset, trained_run
from test_cli import assert_clean_error


# --------------------------------------------------------------------------- the corruptions

@pytest.fixture(scope="module")
def garments() -> np.ndarray:
    return real_dataset().test_images[:64]


@pytest.mark.parametrize("name", list(corruptions.CORRUPTIONS))
def test_each_corruption_is_deterministic_and_grows_with_severity(garments, name):
    changes = []
    for severity in range(1, corruptions.SEVERITIES + 1):
        out = corruptions.corrupt(garments, name, severity)
        assert out.shape == garments.shape and out.dtype == np.uint8
        assert np.array_equal(out, corruptions.corrupt(garments, name, severity))  # the same bytes every time
        changes.append(np.abs(out.astype(int) - garments).mean())
    assert 0 < changes[0] < changes[-1], changes  # visible at 1, more so at 5
    # a batch's offset seeds its draws: the second half of a set is not a copy of the first's corruption
    twice = np.concatenate([garments[:8], garments[:8]])
    halves = np.concatenate([corruptions.corrupt(twice[:8], name, 3, 0), corruptions.corrupt(twice[8:], name, 3, 8)])
    deterministic = name in {"gaussian_blur", "defocus_blur", "scale", "brightness", "contrast", "pixelate", "jpeg"}
    assert np.array_equal(halves[:8], halves[8:]) == deterministic


def test_the_set_covers_the_benchmarks_families():
    assert len(corruptions.CORRUPTIONS) >= 12 and corruptions.SEVERITIES == 5
    for family in ("noise", "blur", "rotate", "shear", "scale", "translate", "brightness", "contrast", "pixelate",
                   "jpeg"):
        assert any(family in name for name in corruptions.CORRUPTIONS), family


@pytest.mark.parametrize("name, severity, words", [
    ("fog", 1, "unknown corruption 'fog'; known: gaussian_noise"),
    ("rotate", 0, "severity=0: expected an integer from 1 to 5"),
    ("rotate", 6, "severity=6: expected an integer from 1 to 5"),
    ("rotate", 2.0, "severity=2.0: expected an integer"),
])
def test_bad_corruptions_and_severities_are_named(garments, name, severity, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(")):  # a name is a KeyError, a severity a ValueError
        corruptions.corrupt(garments, name, severity)


# --------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """The shared cnn_small run's robustness on 300 of its held-out test images, by the command line."""
    run = tmp_path_factory.mktemp("robust") / "run"
    shutil.copytree(trained_run(), run)
    proc = run_cli("robustness", str(run), "--images", "300", "--device", "cpu", check=True)
    return run, proc


def test_the_command_scores_every_corruption_and_writes_a_checked_file(measured):
    run, proc = measured
    result = RunFolder(run).read_robustness()
    assert list(result["results"]) == list(corruptions.CORRUPTIONS)
    assert all(len(rows) == 5 for rows in result["results"].values())
    assert result["images"] == 300 and "(the other half)" in result["measured_on"]
    assert result["temperature"] == RunFolder(run).read_calibration().temperature
    every = [r for rows in result["results"].values() for r in rows]
    assert result["mean_corruption_accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in every]))
    assert result["mean_corruption_accuracy"] < result["clean"]["accuracy"]
    assert all(0 <= r["unsure"] <= 1 for r in every)
    assert "mean corruption accuracy" in proc.stdout and f"wrote {run / 'robustness.json'}" in proc.stdout
    # the clean row is the run's own accuracy on those images, as the service answers
    assert 0.5 < result["clean"]["accuracy"] < 0.9


def test_the_same_images_give_the_same_scores(measured):
    run, _ = measured
    again = robustness.measure_run(run, real_dataset(), images=300, device="cpu", write=False)
    assert again["results"] == RunFolder(run).read_robustness()["results"]


def test_report_figures_and_compare_show_it(measured, tmp_path):
    import fashionlab as fl
    run, _ = measured
    figures = fl.Run(run).figures(["robustness", "calibration"], dataset=real_dataset(), device="cpu")
    assert set(figures) == {"robustness", "calibration"}
    page = fl.Run(run).report(tmp_path / "report.html", with_explain=False, dataset=real_dataset(), device="cpu")
    text = page.read_text()
    assert "Robustness to corrupted images" in text and "mean corruption accuracy" in text
    assert "Calibration" in text and "ECE before, after" in text
    proc = run_cli("compare", str(run), str(trained_run()), "--out", str(tmp_path / "c.html"), check=True)
    rows = [line for line in proc.stdout.splitlines() if line.startswith(str(run)) or
            line.startswith(str(trained_run()))]
    assert len(rows) == 2 and "—" in rows[1] and "—" not in rows[0], proc.stdout  # not measured: a dash
    assert "Calibration and robustness" in (tmp_path / "c.html").read_text()


@pytest.mark.parametrize("change, words", [
    (lambda r: r.update(mean_corruption_accuracy=1.5), "mean_corruption_accuracy=1.5: expected a number from 0 to 1"),
    (lambda r: r.pop("clean"), "clean is missing"),
    (lambda r: r["results"].update(rotate="bad"), "results.rotate='bad': expected a list of 1 to 10 rows"),
    (lambda r: r["results"]["rotate"][0].update(severity=99), "results.rotate[0].severity=99: expected an integer"),
    (lambda r: r.update(results={f"c{i}": [] for i in range(100)}), "expected an object of 1 to 64 corruptions"),
    (lambda r: r.update(model_sha256="0" * 64), "measured on other weights"),
])
def test_a_damaged_file_is_one_clear_error_naming_it(measured, tmp_path, change, words):
    run, _ = measured
    bad = tmp_path / "run"
    shutil.copytree(run, bad)
    path = bad / "robustness.json"
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    with pytest.raises(RunError) as e:
        RunFolder(bad).read_robustness()
    assert str(e.value).startswith(str(path)) and words in str(e.value), str(e.value)
    if words.startswith("clean"):  # the report reads it before anything else is drawn: one clear line
        assert_clean_error(run_cli("report", str(bad), "--no-explain", "--out", str(tmp_path / "r.html")), str(path))


def test_bad_input_to_the_command_is_one_clear_line(tmp_path):
    assert_clean_error(run_cli("robustness", str(trained_run()), "--images", "0"),
                       "--images=0: expected an integer >= 1")
    assert_clean_error(run_cli("robustness", str(tmp_path / "none")), "no such run folder")
