"""The public API: what a notebook does in five lines, and what `import fashionlab` offers."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import fashionlab as fl
from fashionlab.errors import UserError
from conftest import ROOT, synthetic_dataset

DS = synthetic_dataset(n_train=300, n_test=100)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return fl.train(model="cnn_small", out=out, dataset=DS, quiet=True, epochs=3, batch_size=32, lr=3e-3)


def test_five_lines_train_evaluate_predict_and_draw(run, tmp_path):
    assert isinstance(run, fl.Run) and run.status == "finished"
    assert run.evaluate(dataset=DS)["test_accuracy"] == run.metrics["test_accuracy"] > 0.5
    png = tmp_path / "image.png"
    Image.fromarray(DS.test_images[0]).save(png)
    ranked = run.predict(png)
    assert len(ranked) == 1 and len(ranked[0]) == 3 and ranked[0][0]["label"] in DS.class_names
    assert ranked[0].ood_score >= 0 and isinstance(ranked[0].unsure, bool)  # is it a garment at all?
    assert sum(r["score"] for r in run.predict(png, top_k=None)[0]) == pytest.approx(1, abs=1e-5)
    figs = run.figures(dataset=DS)
    assert list(figs) == ["curves", "confusion", "per_class", "probabilities", "filters", "feature_maps", "gradcam",
                          "embedding", "calibration"]  # robustness: once `fashionlab robustness` measured it
    from matplotlib.figure import Figure
    assert all(isinstance(f, Figure) and f._repr_png_()[:4] == b"\x89PNG" for f in figs.values())
    assert figs._repr_html_().count("<img") == len(figs)


def test_predict_takes_paths_pil_images_arrays_and_lists(run, tmp_path):
    img = DS.test_images[3]
    png = tmp_path / "x.png"
    Image.fromarray(img).save(png)
    by_array = run.predict(img)  # arrays are taken as they are; images go through the dataset-style conversion
    assert run.predict(Image.fromarray(img)) == run.predict(png)
    assert run.predict(png)[0][0]["label"] == by_array[0][0]["label"]
    assert len(run.predict([img, png, DS.test_images[:2]])) == 4
    with pytest.raises(UserError, match="cannot classify a dict"):
        run.predict({"not": "an image"})
    with pytest.raises(ValueError, match="top_k=0: expected an integer >= 1"):
        run.predict(img, top_k=0)


def test_a_run_shows_a_summary_in_a_notebook(run, tmp_path):
    html = run._repr_html_()
    assert "test accuracy" in html and "cnn_small" in html and all(n in html for n in DS.class_names)
    assert "new" in fl.Run(tmp_path / "nothing")._repr_html_()


def test_unknown_settings_raise_with_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown training setting 'epoch' \(did you mean 'epochs'\?\)"):
        fl.train(model="cnn", epoch=3, dataset=DS)


def test_listings_and_models():
    names = [m["name"] for m in fl.list_models()]
    assert {"mlp", "cnn", "lstm", "fast", "best"} <= set(names)
    recipes = {r["name"]: r for r in fl.list_recipes()}
    assert recipes["cnn-vs-rnn"]["reference"] == {"cnn_small": 0.88, "lstm": 0.862}
    import torch
    assert fl.build_model("cnn", dropout=0.3)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_compare_and_explore(run, tmp_path):
    other = fl.train(model="mlp", out=tmp_path / "mlp", dataset=DS, quiet=True, epochs=1)
    result = fl.compare([run.path, other.path], out=tmp_path / "cmp" / "compare.html")
    assert set(result.summary) == {"cnn_small", "mlp"} and result.report.is_file()
    assert "cnn_small" in result._repr_html_()
    figs = fl.explore(DS, out=tmp_path / "eda.html")
    assert set(figs) == {"class_counts", "samples", "mean_images", "histograms", "class_distances"}
    assert (tmp_path / "eda.html").is_file()


def test_import_is_light_and_every_public_name_is_documented():
    code = ("import sys, fashionlab; assert 'torch' not in sys.modules, 'import fashionlab loaded torch'; "
            "print(' '.join(fashionlab.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "src")}, check=True).stdout.split()
    doc = (ROOT / "docs" / "api.md").read_text()
    for name in out:
        assert getattr(fl, name).__doc__, f"fashionlab.{name} has no docstring"
        assert f"`{name}" in doc or f"{name}(" in doc, f"docs/api.md does not document {name}"


def test_train_with_reuse_returns_the_finished_run_and_refuses_other_settings(run):
    settings = dict(model="cnn_small", dataset=DS, quiet=True, epochs=3, batch_size=32, lr=3e-3)
    before = run.weights_path.stat().st_mtime_ns
    again = fl.train(out=run.path, reuse=True, **settings)
    assert again.path == run.path and again.weights_path.stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"other settings \(epochs: saved 3, asked 4\)"):
        fl.train(out=run.path, reuse=True, **{**settings, "epochs": 4})
    with pytest.raises(ValueError, match="reuse=True needs out"):
        fl.train(reuse=True, **settings)
