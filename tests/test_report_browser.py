"""The pages open in real headless Chromium: no failed requests, no console errors, every figure loaded."""

from __future__ import annotations

import pytest

from browser import chromium_path, chromium_page
from conftest import synthetic_dataset
from fashionlab import exploration, report, studies
from report_support import img_sources, tiny_run

DS = synthetic_dataset(n_train=200, n_test=100)
DS.test_labels[:10] = (DS.test_labels[:10] + 1) % 10  # some wrong labels: the mistake figures have content


@pytest.fixture(scope="module")
def pages_to_open(tmp_path_factory):
    chromium_path()  # fails under CI, skips elsewhere, when Chromium is missing
    base = tmp_path_factory.mktemp("pages")
    runs = [tiny_run(base / "runs" / m, m, dataset=DS, epochs=1) for m in ("cnn", "mlp")]
    run_page = report.write_run_report(runs[0], dataset=DS)
    eda = exploration.write_exploration(DS, base / "eda" / "eda.html")
    cmp_page, _ = studies.write_comparison(runs, base / "cmp" / "compare.html")
    return {"run": run_page, "explore": eda, "compare": cmp_page}


def _open_and_check(page, problems, path):
    expected = img_sources(path.read_text())
    assert expected, f"{path} has no figures"
    page.goto(path.as_uri(), wait_until="load")
    images = page.evaluate("""() => [...document.images].map(i => ({
        name: i.dataset.figure, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))""")
    assert [i["name"] for i in images] == expected
    broken = [i["name"] for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert broken == [], f"figures that did not load in {path.name}: {broken}"
    assert problems == {"console": [], "page": [], "failed": []}
    return images


def test_run_report_in_chromium(pages_to_open):
    with chromium_page() as (page, problems):
        images = _open_and_check(page, problems, pages_to_open["run"])
        assert {i["name"] for i in images} >= {"curves", "confusion", "confused_pairs", "misclassified",
                                               "probabilities", "calibration", "explain_filters",
                                               "explain_feature_maps", "explain_saliency", "explain_embedding"}
        assert page.locator("h2").count() >= 9
        assert page.locator("h2").first.inner_text() == "Summary"  # the result before the details
        assert page.locator("h2").last.inner_text() == "Configuration"
        assert page.pdf(format="A4").startswith(b"%PDF")  # printable


def test_exploration_and_comparison_in_chromium(pages_to_open):
    with chromium_page() as (page, problems):
        images = _open_and_check(page, problems, pages_to_open["explore"])
        assert {i["name"] for i in images} == {"eda_class_counts", "eda_samples", "eda_mean_images",
                                               "eda_histograms", "eda_class_distances"}
        images = _open_and_check(page, problems, pages_to_open["compare"])
        assert {i["name"] for i in images} == {"compare_accuracy", "compare_per_class", "compare_confusion",
                                               "compare_curves"}
        assert page.locator("table tr.hl").count() >= 1  # the best model and the hardest class stand out
