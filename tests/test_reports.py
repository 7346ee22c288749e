"""Figure functions, the run report, the explanation page and the exploration page, on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_cli, synthetic_dataset
from fashionlab import checkpoint, explain, exploration, pages, report
from fashionlab.run import RunFolder
from report_support import assert_no_external_refs, figure_ok, img_sources, tiny_run

DS = synthetic_dataset(n_train=300, n_test=120)
DS.test_labels[:15] = (DS.test_labels[:15] + 1) % 10  # some wrong test labels: every model makes mistakes

RUN_FIGURES = {"curves", "confusion", "confused_pairs", "misclassified", "probabilities", "calibration",
               "explain_filters", "explain_feature_maps", "explain_saliency", "explain_embedding"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {m: tiny_run(base / m, m, dataset=DS) for m in ("cnn", "mlp", "lstm")}


def _model(run_dir):
    model, _ = explain.load_for_explanation(run_dir, device="cpu")
    return model


# --------------------------------------------------------------------------- run report figures

def test_curves_figure_draws_train_and_validation(runs):
    hist = RunFolder(runs["cnn"]).history
    fig = report.curves_figure(hist)
    figure_ok(fig)
    assert len(fig.axes) == 2
    assert {l.get_label() for l in fig.axes[0].lines} == {"training", "validation"}
    assert list(fig.axes[1].lines[1].get_ydata()) == [r["val_accuracy"] for r in hist]


def test_confusion_figure_writes_every_count(runs):
    m = checkpoint.read_json(runs["cnn"] / "metrics.json")
    fig = report.confusion_figure(m["confusion_matrix"], DS.class_names)
    figure_ok(fig)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(v) for row in m["confusion_matrix"] for v in row]


def _predictions(run_dir):
    from fashionlab.predict import Predictor
    probs = Predictor.from_run(run_dir, device="cpu").probabilities(DS.test_images)
    return probs, probs.argmax(1)


def test_mistake_figures_show_wrong_predictions_only(runs):
    probs, pred = _predictions(runs["lstm"])  # two epochs of an LSTM on bars: plenty of mistakes
    y = DS.test_labels
    wrong = int((pred != y).sum())
    assert wrong > 0
    fig = report.misclassified_figure(DS.test_images, y, probs, DS.class_names, n=12)
    figure_ok(fig)
    assert len(fig.axes) == min(12, wrong)
    for ax in fig.axes:
        true, predicted = ax.get_title().split("\n")
        assert true.removeprefix("true ") != predicted.removeprefix("pred ").rsplit(" ", 1)[0]
    m = checkpoint.read_json(runs["lstm"] / "metrics.json")
    fig = report.confused_pairs_figure(DS.test_images, y, pred, m["most_confused"], DS.class_names, per_pair=4)
    figure_ok(fig)


def test_no_mistakes_means_no_gallery():
    y = np.arange(10)
    probs = np.eye(10)
    assert report.misclassified_figure(np.zeros((10, 28, 28), np.uint8), y, probs, [str(i) for i in range(10)]) is None


def test_probability_bars_mark_predicted_and_true_class(runs):
    probs, pred = _predictions(runs["lstm"])
    y = DS.test_labels
    idx = report.pick_probability_examples(y, probs, 8)
    assert len(idx) == 8 and len(set(idx)) == 8
    assert (pred[idx[:4]] != y[idx[:4]]).all() and (pred[idx[4:]] == y[idx[4:]]).all()
    assert len(set(y[idx[4:]])) == min(4, len(set(y[pred == y])))  # spread over classes
    fig = report.probability_figure(DS.test_images, y, probs, DS.class_names, n=8)
    figure_ok(fig)
    bar_axes = [ax for ax in fig.axes if ax.patches]
    assert len(bar_axes) == 8
    for ax, k in zip(bar_axes, idx):
        heights = [p.get_width() for p in ax.patches]
        np.testing.assert_allclose(heights, probs[k], rtol=1e-6)
        bold = [t.get_text() for t in ax.get_yticklabels() if t.get_fontweight() == "bold"]
        assert bold == [DS.class_names[y[k]]]


def test_reliability_figure(runs):
    m = checkpoint.read_json(runs["cnn"] / "metrics.json")
    fig = report.reliability_figure(m["reliability"], m["ece"])
    figure_ok(fig)
    assert f"{m['ece']:.4f}" in fig.axes[0].get_title()


# --------------------------------------------------------------------------- inside the model

def test_first_layer_filters_per_model_kind(runs):
    cnn = _model(runs["cnn"])
    fig = explain.first_layer_filters(cnn)
    figure_ok(fig)
    assert len(fig.axes) == explain.conv_layers(cnn)[0][1].out_channels
    figure_ok(explain.first_layer_filters(_model(runs["mlp"])))  # dense weights as 28x28 images
    assert explain.first_layer_filters(_model(runs["lstm"])) is None


def test_feature_maps_one_row_per_conv_layer(runs):
    cnn = _model(runs["cnn"])
    fig = explain.feature_maps(cnn, DS.test_images[0], max_channels=8)
    figure_ok(fig)
    assert len(fig.axes) == len(explain.conv_layers(cnn)) * 9
    assert explain.feature_maps(_model(runs["mlp"]), DS.test_images[0]) is None


@pytest.mark.parametrize("name,method", [("cnn", "Grad-CAM"), ("mlp", "saliency"), ("lstm", "saliency")])
def test_attribution_maps_are_normalised(runs, name, method):
    model = _model(runs[name])
    maps, how = explain.attribution(model, DS.test_images[:6], DS.test_labels[:6])
    assert method in how
    assert maps.shape == (6, 28, 28) and np.isfinite(maps).all()
    assert maps.min() >= 0 and np.allclose(maps.reshape(6, -1).max(1)[maps.reshape(6, -1).max(1) > 0], 1)
    fig, _ = explain.saliency_figure(model, DS.test_images, DS.test_labels, DS.class_names, per_class=2)
    figure_ok(fig)
    assert len(fig.axes) == 2 * len(DS.class_names)


def test_saliency_of_the_input_gradient_is_exact():
    """For a linear model the input gradient is the weight row of the target class."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    maps, _ = explain.attribution(model, DS.test_images[:2], np.array([3, 7]))
    w = model[1].weight.detach().abs().numpy()
    np.testing.assert_allclose(maps[0], (w[3] / w[3].max()).reshape(28, 28), rtol=1e-5)
    np.testing.assert_allclose(maps[1], (w[7] / w[7].max()).reshape(28, 28), rtol=1e-5)


def test_embedding_pca_and_tsne(runs):
    model = _model(runs["cnn"])
    feats = explain.penultimate_features(model, DS.test_images, batch_size=50)
    assert feats.shape == (len(DS.test_labels), 128)
    emb = explain.embed(feats, DS.test_labels, max_tsne=60)
    assert emb["pca"].shape == (len(feats), 2) and emb["tsne"].shape == (len(emb["tsne_idx"]), 2)
    figure_ok(explain.embedding_figure(emb, DS.test_labels, DS.class_names))


def test_embedding_without_scikit_learn_falls_back_to_pca(runs, monkeypatch):
    feats = explain.penultimate_features(_model(runs["mlp"]), DS.test_images)
    with_sklearn = explain.embed(feats, DS.test_labels, tsne=False)["pca"]
    monkeypatch.setattr(explain, "_sklearn", lambda: (None, None))  # as if the extra were not installed
    emb = explain.embed(feats, DS.test_labels)
    assert emb["tsne"] is None and "scikit-learn is not installed" in emb["note"]
    # numpy's projection equals scikit-learn's up to the sign of each axis
    np.testing.assert_allclose(np.abs(emb["pca"]), np.abs(with_sklearn), rtol=1e-3, atol=1e-3)
    figure_ok(explain.embedding_figure(emb, DS.test_labels, DS.class_names))


# --------------------------------------------------------------------------- pages

def test_run_report_has_every_section_and_figure(runs, tmp_path):
    out = report.write_run_report(runs["cnn"], dataset=DS, out=tmp_path / "report.html")
    html = out.read_text()
    assert set(img_sources(html)) == RUN_FIGURES
    for name in RUN_FIGURES:
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    for heading in ("Summary", "Per-class scores", "Confusion matrix", "Mistakes", "Calibration", "Inside the model",
                    "Training and evaluation details", "Architecture", "Configuration"):
        assert f">{heading}</h2>" in html
    assert_no_external_refs(html)
    # the architecture table is models.summary: every layer with its parameters
    from fashionlab import models
    for row in models.summary(_model(runs["cnn"])):
        assert f"<td class=\"\">{row['layer']}</td>" in html


def test_run_report_leads_with_the_result_and_ends_with_the_configuration(runs, tmp_path):
    import re
    page = report.write_run_report(runs["lstm"], dataset=DS, out=tmp_path / "report.html", with_explain=False)
    html = page.read_text()
    headings = re.findall(r"<h2>([^<]+)</h2>", html)
    assert headings[0] == "Summary" and headings[-2:] == ["Architecture", "Configuration"]
    summary = html.split("<h2>Summary</h2>", 1)[1].split("<h2>", 1)[0]
    m = checkpoint.read_json(runs["lstm"] / "metrics.json")
    assert f"{m['test_accuracy']:.4f}" in summary and f"{m['test_loss']:.4f}" in summary
    hardest = sorted(m["per_class"], key=lambda n: m["per_class"][n]["recall"])[:3]
    assert report.hardest_classes(m["per_class"]) == hardest
    assert ", ".join(f"{n} {m['per_class'][n]['recall']:.3f}" for n in hardest) in summary
    assert img_sources(summary) == ["curves"]  # the curves are part of the summary
    pair = m["most_confused"][0]
    assert "Most confused pairs" in summary and f"<td class=\"\">{pair['true']}</td>" in summary
    # the untimed warm-up is reported beside the training time, in the details near the end
    details = html.split("<h2>Training and evaluation details</h2>", 1)[1].split("<h2>", 1)[0]
    assert f"{m['warmup_seconds']:.2f} s" in details and f"{m['train_seconds']:.1f} s" in details


def test_lstm_explanation_says_what_it_cannot_show(runs, tmp_path):
    figs = pages.FigureWriter(tmp_path)
    html = "".join(pages.html_page("lstm", explain.explain_sections(_model(runs["lstm"]), DS.test_images,
                                                                    DS.test_labels, DS.class_names, figs)))
    assert figs.names == ["explain_saliency", "explain_embedding"]
    assert "no filters to show" in html and "no feature maps to show" in html


def test_report_of_unfinished_run_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.RunError, match="metrics.json is missing"):
        report.write_run_report(tmp_path, dataset=DS)


def test_explain_page(runs, tmp_path):
    out = explain.write_explanation(runs["cnn"], DS, out=tmp_path / "explain.html", device="cpu")
    assert set(img_sources(out.read_text())) == {n for n in RUN_FIGURES if n.startswith("explain_")}


def test_exploration_figures_and_page(tmp_path):
    means = exploration.class_means(DS.train_images, DS.train_labels, 10)
    assert means.shape == (10, 28, 28) and 0 <= means.min() and means.max() <= 1
    dist = exploration.distance_matrix(means)
    assert np.allclose(np.diag(dist), 0) and np.allclose(dist, dist.T)
    pairs = exploration.closest_pairs(dist, DS.class_names, k=3)
    assert [p[2] for p in pairs] == sorted(p[2] for p in pairs)
    for fig in (exploration.samples_figure(DS.train_images, DS.train_labels, DS.class_names),
                exploration.mean_images_figure(means, DS.class_names),
                exploration.histograms_figure(DS.train_images, DS.train_labels, DS.class_names),
                exploration.distance_figure(dist, DS.class_names)):
        figure_ok(fig)
    out = exploration.write_exploration(DS, tmp_path / "eda.html")
    html = out.read_text()
    assert set(img_sources(html)) == {"eda_class_counts", "eda_samples", "eda_mean_images", "eda_histograms",
                                      "eda_class_distances"}
    assert_no_external_refs(html)


def test_html_page_escapes_text():
    sec = pages.Section("<b>title</b>", [pages.table(["a"], [["<script>x</script>"]]), pages.note("1 < 2")])
    html = pages.html_page("T & U", [sec])
    assert "<script>x" not in html and "&lt;script&gt;" in html and "T &amp; U" in html


def test_train_cli_writes_the_report_on_real_data(real_data, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "mlp", "--epochs", "1", "--subset", "300", "--out", str(out), "--quiet",
                   "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr
    html = (out / "report.html").read_text()
    assert set(img_sources(html)) == RUN_FIGURES - {"explain_feature_maps"}
    assert "Shirt" in html
