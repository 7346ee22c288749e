"""ONNX export with its parity check, SageMaker packaging, the ONNX backend served as SageMaker
would run it, and folder prediction to CSV: through the command line's own entry point (in this
process, to spare a PyTorch import per call; the servers are real processes)."""

from __future__ import annotations

import contextlib
import csv
import io
from types import SimpleNamespace
import json
import tarfile

import httpx
import numpy as np
import pytest
from PIL import Image

from fashionlab import export, images
from fashionlab.predict import Predictor

from fashionlab import cli

from serve_support import real_dataset, server_process, trained_run


def run_cli(*args: str, check: bool = False):
    """`fashionlab ARGS` through cli.main: (returncode, stdout, stderr) like a finished process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(args))
    if check and code != 0:
        raise AssertionError(f"fashionlab {' '.join(args)} exited {code}:\n{out.getvalue()}\n{err.getvalue()}")
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def run_dir():
    return trained_run()


@pytest.fixture(scope="module")
def onnx_file(run_dir):
    """`fashionlab export RUN --format onnx`: parity on 1,000 real test images before writing."""
    proc = run_cli("export", str(run_dir), "--format", "onnx", check=True)
    assert "parity on 1000 test images" in proc.stdout and "top-1 mismatches 0" in proc.stdout, proc.stdout
    return run_dir / export.ONNX_FILE


def test_onnx_file_has_dynamic_batch_metadata_and_matches_pytorch(onnx_file, run_dir):
    import onnx
    model = onnx.load(str(onnx_file))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    meta = {p.key: p.value for p in model.metadata_props}
    torch_model = Predictor.from_run(run_dir, device="cpu", precision="fp32")
    assert json.loads(meta["class_names"]) == torch_model.class_names
    norm = json.loads(meta["normalisation"])
    assert norm["mean"] == pytest.approx(0.2860) and norm["std"] == pytest.approx(0.3530)
    parity = json.loads(meta["parity"])
    assert parity["images"] == 1000 and parity["top1_mismatches"] == 0 and parity["max_abs_prob_diff"] <= 1e-4
    assert parity["max_rel_feature_diff"] <= 1e-4 and parity["unsure_mismatches"] == 0
    assert [o.name for o in model.graph.output] == ["logits", "probabilities", "features"]
    onnx_model = export.OnnxPredictor.from_run(run_dir)
    x = real_dataset().test_images[1000:1300]  # images the export did not check
    for batch in (1, 7, 300):
        a, b = torch_model.probabilities(x[:batch]), onnx_model.probabilities(x[:batch])
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4
    assert onnx_model.predict(x[:3], 2) == [[{**e, "score": pytest.approx(e["score"], abs=1e-4)} for e in r]
                                            for r in torch_model.predict(x[:3], 2)]


def test_onnx_scores_match_pytorch(onnx_file, run_dir):
    """The same detector scores the ONNX graph's features: the same score and flag as PyTorch in fp32, on
    garments and on images that are not (the flags of both kinds are exercised)."""
    torch_model = Predictor.from_run(run_dir, device="cpu", precision="fp32")
    onnx_model = export.OnnxPredictor.from_run(run_dir)
    rng = np.random.default_rng(0)
    x = np.concatenate([real_dataset().test_images[1000:1300], rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
                        np.zeros((1, 28, 28), np.uint8)])
    (a_probs, a), (b_probs, b) = torch_model.infer(x), onnx_model.infer(x)
    assert onnx_model.ood is not None and onnx_model.ood.threshold == torch_model.ood.threshold
    assert np.abs(a - b).max() <= 1e-3 * torch_model.ood.threshold, np.abs(a - b).max()
    assert np.array_equal(torch_model.ood.unsure(a), onnx_model.ood.unsure(b))
    assert 0 < torch_model.ood.unsure(a).sum() < len(x)
    ranked = onnx_model.predict(x[-2:], 1)
    assert [r.unsure for r in ranked] == [bool(f) for f in torch_model.ood.unsure(a[-2:])]
    assert onnx_model.ood_status()["available"] and onnx_model.ood_status()["threshold"] == torch_model.ood.threshold


def test_an_onnx_file_exported_before_features_serves_without_scores(run_dir, tmp_path):
    """A file with only logits and probabilities (exported before the features output) still classifies;
    its predictions carry no score, and it says to export again."""
    import shutil
    import warnings

    import torch
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("model.onnx"))
    model, _ = export.RunFolder(folder).load_model()

    class TwoOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            logits = self.model(pixels)
            return logits, torch.softmax(logits, 1)
    blob = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices, as export.py hides them
        warnings.simplefilter("ignore")
        torch.onnx.export(TwoOutputs().eval(), (torch.rand(2, 1, 28, 28),), blob, input_names=["pixels"],
                          output_names=["logits", "probabilities"],
                          dynamic_axes={n: {0: "batch"} for n in ("pixels", "logits", "probabilities")}, dynamo=False)
    names = export.RunFolder(folder).class_names
    (folder / "model.onnx").write_bytes(export._with_metadata(blob.getvalue(), {"class_names": json.dumps(names)}))
    old = export.OnnxPredictor.from_run(folder)
    x = real_dataset().test_images[:4]
    probs, scores = old.infer(x)
    assert np.isnan(scores).all() and probs.shape == (4, 10)
    assert [(r.ood_score, r.unsure) for r in old.predict(x)] == [(None, None)] * 4
    assert "export it again" in old.ood_note and old.ood_status()["available"] is False


def test_export_that_fails_parity_writes_nothing(run_dir, tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("previous file")
    with pytest.raises(export.ExportError, match="parity check"):
        export.export_onnx(run_dir, real_dataset().test_images[:50], out, tolerance=-1.0)  # nothing can pass
    assert out.read_text() == "previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary left behind


def test_package_and_serve_it_as_sagemaker_does_with_onnx_runtime(onnx_file, run_dir, tmp_path):
    proc = run_cli("package", str(run_dir), "--out", str(tmp_path / "model.tar.gz"), check=True)
    assert "model.tar.gz" in proc.stdout
    with tarfile.open(tmp_path / "model.tar.gz") as tar:
        names = tar.getnames()
        assert {"model.json", "model.safetensors", "model.onnx", "ood.safetensors"} <= set(names)
        assert all("/" not in n for n in names)  # at the root: SageMaker unpacks into /opt/ml/model
        model_dir = tmp_path / "opt-ml-model"
        tar.extractall(model_dir, filter="data")
    # no RUN argument: the model folder and port come from the environment, as in the SageMaker container
    env = {"FASHIONLAB_MODEL_DIR": str(model_dir), "SAGEMAKER_BIND_TO_PORT": str(_port())}
    x = real_dataset().test_images[:8]
    expected = Predictor.from_run(run_dir, device="cpu", precision="fp32").predict(x, 1)
    with server_process("--backend", "onnx", "--samples", "0", env=env) as srv:
        assert srv.url.endswith(env["SAGEMAKER_BIND_TO_PORT"])
        assert httpx.get(srv.url + "/ping").status_code == 200
        assert httpx.get(srv.url + "/v1/model").json()["backend"] == "onnx"
        buf = io.BytesIO()
        np.save(buf, x)
        r = httpx.post(srv.url + "/invocations?top_k=1", content=buf.getvalue(),
                       headers={"content-type": "application/x-npy"})
        assert [a["classes"][0]["label"] for a in r.json()] == [e[0]["label"] for e in expected]
        assert [a["unsure"] for a in r.json()] == [e.unsure for e in expected]  # ONNX Runtime scores them too
        assert httpx.get(srv.url + "/v1/model").json()["ood"]["available"]
        png = io.BytesIO()
        Image.fromarray(x[0]).save(png, format="PNG")
        r = httpx.post(srv.url + "/v1/explain", content=png.getvalue(), headers={"content-type": "image/png"})
        assert r.json()["prediction"]["label"] == expected[0][0]["label"] and r.json()["saliency"] is not None
        r = httpx.post(srv.url + "/invocations", content=b"GIF89a-broken", headers={"content-type": "image/gif"})
        assert r.status_code == 400 and httpx.get(srv.url + "/ping").status_code == 200


def _port() -> int:
    from serve_support import free_port
    return free_port()


def test_predict_a_folder_to_csv_and_single_files_as_before(run_dir, tmp_path):
    x = real_dataset().test_images[:6]
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i in range(3):
        (folder / f"img{i}.jpg").write_bytes(images.render_photo_style(x[i]))
    np.save(folder / "more" / "batch.npy", x[3:6])
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (folder / "readme.txt").write_text("not an image, and not an image suffix: skipped")
    out = tmp_path / "predictions.csv"
    proc = run_cli("predict", str(run_dir), str(folder), "--out", str(out), "--top-k", "2", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr  # one file could not be read
    assert "6 images from 5 files" in proc.stderr and "1 files could not be read" in proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [(r["path"].split("photos/")[1], r["item"]) for r in rows] == [
        ("broken.png", "0"), ("img0.jpg", "0"), ("img1.jpg", "0"), ("img2.jpg", "0"),
        ("more/batch.npy", "0"), ("more/batch.npy", "1"), ("more/batch.npy", "2")]
    assert "truncated or corrupt" in rows[0]["error"] or "not a recognised" in rows[0]["error"]
    model = Predictor.from_run(run_dir, device="cpu")
    photos = np.stack([images.preprocess_blob(images.render_photo_style(x[i])) for i in range(3)])
    want = [r[0]["label"] for r in model.predict(np.concatenate([photos, x[3:6]]), 1)]
    assert [r["label"] for r in rows[1:]] == want
    assert all(r["label_2"] and float(r["score_2"]) <= float(r["score"]) for r in rows[1:])
    assert list(rows[0])[-3:] == ["ood_score", "unsure", "error"] and rows[0]["ood_score"] == ""  # the broken file
    scored = model.predict(np.concatenate([photos, x[3:6]]), 1)
    assert [float(r["ood_score"]) for r in rows[1:]] == pytest.approx([r.ood_score for r in scored], rel=1e-3)
    assert [r["unsure"] for r in rows[1:]] == ["true" if r.unsure else "false" for r in scored]
    # the per-file form prints one line per image, as it always did
    single = run_cli("predict", str(run_dir), str(folder / "img0.jpg"), "--top-k", "1", check=True)
    assert single.stdout.strip().startswith(f"{folder / 'img0.jpg'}: {want[0]} ")
    assert f"  ood {scored[0].ood_score:.2f}" in single.stdout
