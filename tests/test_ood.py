"""Inputs that are not garments: the out-of-distribution detector (fitting, calibration, its file and
the checks on it), on synthetic features, and on a short real run where blank, uniform and noise
images must be flagged unsure far more often than test garments."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from fashionlab import evaluate, ood
from fashionlab.predict import Predictor, Ranked
from fashionlab.run import RunFolder, calibrate_ood, calibrate_temperature, ood_images
from fashionlab.schema import RunError

from serve_support import real_dataset, trained_run

D, K = 8, 3


def clusters(n: int, rng: np.random.Generator, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """n features around K class centres in different directions (class k along features 2k and 2k + 1;
    the last two unused), with a covariance shared by the classes."""
    labels = rng.integers(0, K, n)
    mixing = np.eye(D) + 0.3 * np.tri(D, k=-1)  # correlated features: Mahalanobis differs from Euclid
    centres = np.zeros((K, D))
    for k in range(K):
        centres[k, 2 * k: 2 * k + 2] = 8.0
    return centres[labels] + spread * rng.normal(size=(n, D)) @ mixing.T, labels


def synthetic_detector(rate: float = 0.05, seed: int = 0) -> tuple[ood.OodDetector, np.random.Generator]:
    rng = np.random.default_rng(seed)
    fit_x, fit_y = clusters(3000, rng)
    calibration, _ = clusters(4000, rng)
    measure, _ = clusters(4000, rng)
    identity = lambda x: x  # noqa: E731: the "model" gives its features as they are
    return ood.calibrate(identity, fit_x, fit_y, calibration, measure, rate, about={"calibrated_on": "synthetic"}), rng


# --------------------------------------------------------------------------- fitting and calibration

@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_threshold_meets_the_false_alarm_rate_on_held_out_images(rate):
    detector, rng = synthetic_detector(rate)
    assert detector.info["calibration_false_alarm_rate"] <= rate  # never above the target where it was set
    measured = detector.info["measured_false_alarm_rate"]
    assert abs(measured - rate) < 3 * math.sqrt(rate * (1 - rate) / 4000) + 0.005, measured
    fresh, _ = clusters(20000, rng)  # and on images neither fit nor calibration saw
    assert abs(ood.false_alarms(detector.scores(fresh), detector.threshold) - rate) < 0.015
    far = fresh[:100] + np.r_[np.zeros(D - 2), 12.0, 12.0]  # towards features no class uses
    assert detector.unsure(detector.scores(far)).all()


def test_scores_are_the_mahalanobis_distance_to_the_nearest_class_mean():
    """Of each feature vector's direction and log length (ood.embed)."""
    detector, rng = synthetic_detector()
    x, _ = clusters(50, rng, spread=3.0)
    embedded = ood.embed(x)
    assert np.allclose(np.linalg.norm(embedded[:, :D], axis=1), 1) and np.allclose(
        embedded[:, D], np.log(np.linalg.norm(x, axis=1) + ood.SHORTEST))
    brute = np.array([min(math.sqrt((v - m) @ detector.precision @ (v - m)) for m in detector.means)
                      for v in embedded])
    assert np.allclose(detector.scores(x), brute, rtol=1e-9, atol=1e-9)
    assert np.isfinite(detector.scores(np.zeros((1, D))))  # a blank image's features may all be zero
    assert detector.scores(np.zeros((0, D))).shape == (0,)
    with pytest.raises(ValueError, match=r"expected \(N, 8\)"):
        detector.scores(np.zeros((2, D + 1)))


def test_an_images_score_does_not_depend_on_the_images_scored_with_it():
    """The service gathers concurrent requests into one batch: each answer must be bit-identical."""
    detector, rng = synthetic_detector()
    x, _ = clusters(300, rng, spread=2.0)
    together = detector.scores(x)
    apart = np.concatenate([detector.scores(x[i:j]) for i, j in ((0, 1), (1, 4), (4, 17), (17, 300))])
    assert np.array_equal(together, apart)


def test_units_that_never_fire_and_missing_classes_are_fitted():
    """Features after a ReLU include dead units: the ridge keeps the covariance invertible."""
    rng = np.random.default_rng(1)
    x, y = clusters(500, rng)
    x[:, 3] = 0.0
    means, precision = ood.fit(x, np.where(y == 2, 0, y))  # class 2 never seen: two means
    assert means.shape == (2, D + 1) and np.isfinite(precision).all()
    assert np.isfinite(ood.OodDetector(means, precision, 1.0).scores(x)).all()


def test_non_finite_features_and_bad_rates_are_refused():
    with pytest.raises(ood.OodError, match="not finite"):
        ood.fit(np.full((10, D), np.nan), np.zeros(10))
    for rate in (0, 1, 1.5, -0.1, True, "0.05", math.nan):
        with pytest.raises(ValueError, match=r"false_alarm_rate=.*between 0 and 1"):
            ood.check_rate(rate)


def test_auroc():
    assert ood.auroc([1, 2, 3], [4, 5]) == 1.0
    assert ood.auroc([4, 5], [1, 2, 3]) == 0.0
    assert ood.auroc([1, 1], [1, 1, 1]) == 0.5  # ties count half
    assert ood.auroc([1, 3], [2, 4]) == pytest.approx(0.75)  # pairs (1,2) (1,4) (3,4) of 4 rank right


# --------------------------------------------------------------------------- the file

@pytest.fixture
def saved(tmp_path):
    detector, _ = synthetic_detector()
    path = tmp_path / "ood.safetensors"
    ood.save(path, detector)
    return path, detector


def test_file_round_trip(saved):
    path, detector = saved
    loaded = ood.load(path, feature_size=D, num_classes=K)
    x, _ = clusters(100, np.random.default_rng(5), spread=4.0)
    assert np.array_equal(loaded.scores(x), detector.scores(x)) and loaded.threshold == detector.threshold
    assert loaded.describe() == json.loads(json.dumps(detector.describe()))


def _rewrite(path, tensors=None, meta=None, drop=()):
    """The file rewritten with some tensors or metadata fields replaced (or dropped)."""
    from safetensors import safe_open
    with safe_open(str(path), "np") as fh:
        have, info = {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(fh.metadata()["fashionlab_ood"])
    have.update(tensors or {})
    info.update(meta or {})
    save_file({k: v for k, v in have.items() if k not in drop}, str(path),
              metadata={"fashionlab_ood": json.dumps(info)})


def _huge_header(path):
    """A safetensors header declaring a 70,000 x 70,000 float64 precision matrix (39 GB) over no data."""
    header = json.dumps({"__metadata__": {"fashionlab_ood": json.dumps({"threshold": 1.0, "false_alarm_rate": 0.05,
                                                                        "feature_size": 70000, "calibrated_on": "x",
                                                                        "calibration_images": 1, "fit_images": 1})},
                         "means": {"dtype": "F64", "shape": [1, 70000], "data_offsets": [0, 560000]},
                         "precision": {"dtype": "F64", "shape": [70000, 70000],
                                       "data_offsets": [560000, 560000 + 70000 * 70000 * 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


TAMPERED = [
    ("precision of the wrong shape", lambda p: _rewrite(p, {"precision": np.eye(D + 2)}), r"tensor precision is float64 \[10, 10\]"),
    ("means of the wrong dtype", lambda p: _rewrite(p, {"means": np.zeros((K, D + 1), np.int32)}), "tensor means is int32"),
    ("NaN in the means", lambda p: _rewrite(p, {"means": np.full((K, D + 1), np.nan)}), "NaN or infinite"),
    ("infinite precision", lambda p: _rewrite(p, {"precision": np.full((D + 1, D + 1), np.inf)}), "NaN or infinite"),
    ("precision not positive definite", lambda p: _rewrite(p, {"precision": -np.eye(D + 1)}), "not positive definite"),
    ("precision not symmetric", lambda p: _rewrite(p, {"precision": np.eye(D + 1) + np.tri(D + 1, k=-1)}), "not symmetric"),
    ("a tensor missing", lambda p: _rewrite(p, drop=("means",)), "tensor means is missing"),
    ("an extra tensor", lambda p: _rewrite(p, {"code": np.zeros(3)}), "unexpected tensor"),
    ("threshold NaN", lambda p: _rewrite(p, meta={"threshold": math.nan}), "threshold=nan: expected a finite number"),
    ("threshold a string", lambda p: _rewrite(p, meta={"threshold": "12"}), "threshold='12'"),
    ("rate of 2", lambda p: _rewrite(p, meta={"false_alarm_rate": 2}), "false_alarm_rate=2"),
    ("feature size of a billion", lambda p: _rewrite(p, meta={"feature_size": 10 ** 9}), "feature_size=1000000000"),
    ("a header declaring 39 GB", _huge_header, "feature_size=70000: expected an integer from 1 to 4096|not a readable"),
    ("5,000 class means", lambda p: _rewrite(p, {"means": np.zeros((5000, D + 1))}), r"tensor means is float64 \[5000, 9\]"),
    ("not safetensors at all", lambda p: p.write_bytes(b"\x00" * 40), "not a readable out-of-distribution file"),
    ("no metadata", lambda p: save_file({"means": np.zeros((K, D + 1))}, str(p)), "metadata 'fashionlab_ood' is missing"),
]


@pytest.mark.parametrize("name,tamper,words", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_a_tampered_file_is_a_clear_error_naming_it(saved, name, tamper, words):
    path, _ = saved
    tamper(path)
    with pytest.raises(RunError, match=words) as caught:
        ood.load(path, feature_size=D, num_classes=K)
    assert str(caught.value).startswith(str(path)) and "\n" not in str(caught.value)


def test_a_file_for_another_model_is_refused(saved):
    path, _ = saved
    with pytest.raises(RunError, match="the model's last layer takes 16 features"):
        ood.load(path, feature_size=16)
    with pytest.raises(RunError, match="1 to 2 classes"):
        ood.load(path, feature_size=D, num_classes=2)


# --------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def run_dir():
    """cnn_small on 2,000 real images for one epoch, no validation split (serve_support's shared run)."""
    return trained_run()


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.from_run(run_dir, device="cpu")


def non_garments() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"blank": np.zeros((1, 28, 28), np.uint8),
            "uniform": np.repeat(np.arange(5, 256, 10, dtype=np.uint8), 784).reshape(-1, 28, 28),
            "noise": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)}


def test_training_writes_a_calibrated_detector(run_dir):
    info = RunFolder(run_dir).read_ood().info
    # no validation split: calibrated on one half of the test set, measured on the other
    assert info["calibrated_on"] == ood.ON_TEST_HALF and info["calibration_images"] == 5000
    assert info["measured_images"] == 5000 and abs(info["measured_false_alarm_rate"] - 0.05) < 0.02
    assert info["fit_images"] == 2000 and info["feature_size"] == 100  # cnn_small's Dense 100


def test_non_garments_are_flagged_far_more_often_than_test_garments(run_dir, predictor):
    """Even this weak model (about 70% accurate) flags blank and uniform images nearly always (a uniform
    upload of any size preprocesses to a blank one) and noise several times as often as garments, which
    it flags at the calibrated 5%. (A trained `fast` net flags all three nearly always: docs/deploy.md.)"""
    ds = real_dataset()
    held_out = ood_images(RunFolder(run_dir).config, ds).measure
    garments = predictor.predict(held_out)
    flagged = np.mean([r.unsure for r in garments])
    assert 0.02 < flagged < 0.08, flagged
    least = {"blank": 0.9, "uniform": 0.9, "noise": 5 * flagged}
    for kind, images in non_garments().items():
        answers = predictor.predict(images)
        assert all(isinstance(r, Ranked) and r.ood_score is not None for r in answers)
        rate = np.mean([r.unsure for r in answers])
        assert rate >= least[kind], (kind, rate, [round(r.ood_score, 1) for r in answers])
        auroc = ood.auroc([r.ood_score for r in garments], [r.ood_score for r in answers])
        assert auroc > 0.9, (kind, auroc)


def test_scores_come_from_the_same_pass_and_leave_probabilities_bit_identical(run_dir, predictor):
    x = real_dataset().test_images[:300]
    probs, scores = predictor.infer(x)
    assert np.array_equal(probs, predictor.probabilities(x))  # the hook only reads the features
    logits = evaluate.predict_logits(predictor.model, x, predictor.runtime)
    assert np.array_equal(probs, torch.softmax(logits / predictor.temperature, 1).numpy())  # calibrated
    _, features = predictor.outputs(x)
    assert np.array_equal(scores, predictor.ood.scores(features))
    assert np.allclose(predictor.infer(x, batch_size=7)[1], scores, rtol=1e-5)  # batches change only rounding


def test_features_average_over_test_time_augmentation_like_the_logits(run_dir):
    """With flips and shifts, the features are the mean over every pass, the weights the logits use."""
    model, info = RunFolder(run_dir).load_model()
    x = evaluate.to_input(torch.from_numpy(real_dataset().test_images[:4]))
    logits, features = evaluate.tta_outputs(model, x, flip=True, shift=1)
    assert torch.equal(logits, evaluate.tta_logits(model, x, True, 1))
    passes = []
    for dy, dx in evaluate.moves(1):
        v = evaluate.shifted(x, dy, dx)
        with evaluate.captured_features(model) as seen:
            model(v), model(v.flip(-1))
        passes.append((seen[0] + seen[1]) / 2)
    assert torch.allclose(features, sum(passes) / len(passes), atol=1e-6)


def test_a_run_made_before_the_detector_is_calibrated_on_load_and_keeps_it(run_dir, tmp_path, caplog):
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    (old / "ood.safetensors").unlink()
    with caplog.at_level("WARNING", logger="fashionlab.ood"):
        p = Predictor.from_run(old, device="cpu")
    assert p.ood is not None and (old / "ood.safetensors").is_file()
    assert "calibrating it now" in caplog.text
    assert p.ood.threshold == pytest.approx(RunFolder(run_dir).read_ood().threshold, rel=1e-6)
    (old / "ood.safetensors").unlink()
    none = Predictor.from_run(old, device="cpu", calibrate_missing=False)
    answer = none.predict(real_dataset().test_images[:2])
    assert none.ood is None and "fashionlab calibrate" in none.ood_note
    assert [(r.ood_score, r.unsure) for r in answer] == [(None, None)] * 2
    assert none.ood_status() == {"available": False, "note": none.ood_note}


def test_calibrate_ood_for_another_rate_and_stale_files(run_dir, tmp_path):
    import fashionlab as fl
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    run = fl.Run(copy)
    described = run.calibrate_ood(0.2, dataset=real_dataset(), device="cpu")
    assert described["false_alarm_rate"] == 0.2 and abs(described["measured_false_alarm_rate"] - 0.2) < 0.03
    assert described["threshold"] < RunFolder(run_dir).read_ood().threshold
    with pytest.raises(ValueError, match="false_alarm_rate=0"):
        run.calibrate_ood(0)
    weights = copy / "model.safetensors"  # other weights of the same shapes: the detector no longer fits them
    from safetensors import safe_open
    with safe_open(str(weights), "np") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) * 1.01 for k in fh.keys()}
    save_file(tensors, str(weights), metadata=meta)
    with pytest.raises(RunError, match="fitted to other weights .*`fashionlab calibrate "):
        Predictor.from_run(copy, device="cpu")
    calibrate_ood(RunFolder(copy), real_dataset(), device="cpu")
    calibrate_temperature(RunFolder(copy), real_dataset(), device="cpu")  # `fashionlab calibrate` fits both
    assert Predictor.from_run(copy, device="cpu").ood is not None
