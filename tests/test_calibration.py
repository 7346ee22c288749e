"""Calibrated probabilities: the temperature fit, its file, and every place that applies it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fashionlab import calibration, evaluate
from fashionlab.predict import Predictor
from fashionlab.run import RunFolder, calibrate_temperature, evaluate_run, matches_record, unseen_test_images
from fashionlab.schema import RunError

from serve_support import real_dataset, trained_run
from conftest import run_cli
from test_cli import assert_clean_error


# --------------------------------------------------------------------------- the fit

def sampled(temperature: float, n: int = 20000, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and labels drawn from softmax(logits / temperature): the temperature a fit should find."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g) * 4
    labels = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g).squeeze(1)
    return logits, labels.numpy()


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_the_fit_finds_the_temperature_the_labels_were_drawn_with(true_temperature):
    logits, labels = sampled(true_temperature)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # the minimum of the NLL: a little either side is worse
    y = torch.as_tensor(labels)
    assert calibration.nll(logits, y, fitted) <= min(calibration.nll(logits, y, fitted * f) for f in (0.97, 1.03))


def test_calibration_lowers_ece_on_other_images_and_keeps_the_ranking():
    logits, labels = sampled(2.0)  # the model's own probabilities are over-confident
    fitted = calibration.fit(logits[:10000], labels[:10000], logits[10000:], labels[10000:], {"fitted_on": "a"})
    assert fitted.info["ece_after"] < fitted.info["ece_before"] / 3
    assert fitted.info["nll_after"] < fitted.info["nll_before"]
    probs = calibration.calibrated_probabilities(logits, fitted.temperature)
    assert torch.equal(probs.argmax(1), logits.argmax(1))


def test_logits_that_cannot_be_fitted_are_refused():
    with pytest.raises(calibration.CalibrationError, match="not finite"):
        calibration.fit_temperature(torch.full((4, 10), float("nan")), np.zeros(4))
    with pytest.raises(calibration.CalibrationError, match="no held-out images"):
        calibration.fit_temperature(torch.zeros(0, 10), np.zeros(0))


# --------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def run_dir():
    """cnn_small on 2,000 real images for one epoch, no validation split (serve_support's shared run)."""
    return trained_run()


def test_training_fits_the_temperature_on_one_test_half_and_measures_it_on_the_other(run_dir):
    folder = RunFolder(run_dir)
    fitted = folder.read_calibration()
    assert fitted.info["fitted_on"] == "test images (one half)" and fitted.info["fit_images"] == 5000
    assert fitted.info["measured_images"] == 5000
    assert fitted.info["ece_after"] < fitted.info["ece_before"]
    # the half it was measured on is the half neither the temperature nor the unsure threshold saw
    labels = real_dataset().test_labels
    unseen = unseen_test_images(folder.config, labels)
    assert len(unseen) == 5000 and len(np.unique(unseen)) == 5000


def test_predictions_are_calibrated_with_the_ranking_and_accuracy_unchanged(run_dir):
    folder = RunFolder(run_dir)
    predictor = Predictor.from_run(run_dir, device="cpu")
    assert predictor.temperature == folder.read_calibration().temperature != 1.0
    assert predictor.calibration_status() == {"calibrated": True, "temperature": predictor.temperature}
    x = real_dataset().test_images[:500]
    probs = predictor.probabilities(x)
    logits = evaluate.predict_logits(predictor.model, x, predictor.runtime)
    assert np.array_equal(probs, torch.softmax(logits / predictor.temperature, 1).numpy())
    assert np.array_equal(probs.argmax(1), logits.argmax(1).numpy())
    # evaluation reproduces metrics.json exactly, and reports the ECE before and after on the unseen half
    m = evaluate_run(folder, real_dataset(), device="cpu")
    assert matches_record(folder, m)
    c = m["calibration"]
    assert c["temperature"] == predictor.temperature and c["images"] == 5000
    assert c["ece_after"] < c["ece_before"] and len(c["reliability_after"]) == calibration.BINS


def test_a_run_made_before_calibration_keeps_working_and_says_how_to_fit_it(run_dir, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "calibration.json").unlink()
    with caplog.at_level("WARNING", logger="fashionlab.calibration"):
        predictor = Predictor.from_run(old, device="cpu")
    assert predictor.temperature == 1.0 and f"fashionlab calibrate {old}" in caplog.text
    status = predictor.calibration_status()
    assert status["calibrated"] is False and "fashionlab calibrate" in status["note"]
    m = evaluate_run(RunFolder(old), real_dataset(), device="cpu")
    assert m["calibration"]["temperature"] is None and "fashionlab calibrate" in m["calibration"]["note"]
    # fitting it now gives the temperature training gave
    fitted = calibrate_temperature(RunFolder(old), real_dataset(), device="cpu")
    assert fitted.temperature == pytest.approx(RunFolder(run_dir).read_calibration().temperature, rel=1e-3)
    assert (old / "calibration.json").is_file()


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(temperature=-1), "temperature=-1: expected a number from 0.05 to 20"),
    (lambda c: c.update(temperature="2"), "temperature='2': expected a number"),
    (lambda c: c.pop("temperature"), "temperature is missing"),
    (lambda c: c.update(ece_after=7), "ece_after=7: expected a number from 0 to 1"),
    (lambda c: c.update(reliability_after=[{"lower": 0}]), "reliability_after[0].upper is missing"),
    (lambda c: c.update(reliability_after=[{}] * 1000), "reliability_after=[{}, {}"),
    (lambda c: c.update(model_sha256="0" * 64), "fitted to other weights"),
])
def test_a_damaged_or_stale_file_is_one_clear_error_naming_it(run_dir, tmp_path, change, words):
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    path = bad / "calibration.json"
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))
    with pytest.raises(RunError) as e:
        Predictor.from_run(bad, device="cpu")
    assert str(e.value).startswith(str(path)) and words in str(e.value), str(e.value)
    if words.startswith("temperature=-1"):  # the command line says the same, in one line
        assert_clean_error(run_cli("evaluate", str(bad)), str(path))
        path.write_text("[" * 100000)
        with pytest.raises(RunError, match="nested deeper"):
            RunFolder(bad).read_calibration()


def test_the_onnx_graph_holds_the_temperature(run_dir, tmp_path):
    from fashionlab import export
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("model.onnx"))
    x = real_dataset().test_images[:200]
    result = export.export_onnx(folder, x)
    assert result["top1_mismatches"] == 0 and result["max_abs_prob_diff"] <= export.PARITY_TOLERANCE
    onnx = export.OnnxPredictor.from_run(folder)
    torch_predictor = Predictor.from_run(folder, device="cpu")
    assert onnx.temperature == pytest.approx(torch_predictor.temperature)
    assert np.abs(onnx.probabilities(x) - torch_predictor.probabilities(x)).max() <= export.PARITY_TOLERANCE
    assert onnx.calibration_status()["calibrated"] is True
    # a temperature fitted after the export: the file still serves its own, and says to export again
    content = json.loads((folder / "calibration.json").read_text())
    content["temperature"] = 2.5
    (folder / "calibration.json").write_text(json.dumps(content))
    stale = export.OnnxPredictor.from_run(folder)
    assert stale.temperature == onnx.temperature and "export it again" in stale.calibration_status()["note"]
