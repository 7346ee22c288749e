"""The command line: real subprocesses, real output, clear errors without tracebacks."""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from fashionlab import data
from conftest import run_cli, synthetic_dataset


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in proc.stderr, proc.stderr


def test_the_command_line_starts_without_torch():
    """Building every command's options loads no torch (2 s and 220 MiB): `fashionlab --help` answers at
    once, and `serve --workers N`'s supervisor stays small (test_serve_process checks that process)."""
    import subprocess
    import sys
    code = ("import sys; from fashionlab import cli; cli.build_parser(); import fashionlab.serve.server; "
            "print(sorted(m for m in ('torch', 'fashionlab.training', 'fashionlab.serve.app') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_models_lists_reference_parameter_counts():
    out = run_cli("models", "--summary", "cnn", check=True).stdout
    assert "235,146" in out and "421,642" in out
    assert "Conv2d" in out and "(64, 14, 14)" in out
    assert "total params 421,642: trainable 421,642, non-trainable 0" in out
    fast = run_cli("models", "--summary", "fast", check=True).stdout  # the frozen whitening layer is marked
    assert "144  frozen" in fast and "trainable 84,640, non-trainable 144" in fast


def test_recipes_list_reference_figures():
    out = run_cli("recipes", check=True).stdout
    assert "dropout-cnn" in out and "89.36%" in out and "lstm 86.20%" in out


def test_data_describes_real_dataset(real_data):
    out = run_cli("data", "--offline", check=True).stdout
    assert "sha256 of decompressed bytes" in out and "(60000, 28, 28) uint8" in out
    assert "Shirt" in out and "6000" in out and "pixels 0..255" in out


def test_unknown_model_and_bad_flags():
    assert_clean_error(run_cli("train", "--model", "resnet9000"), "unknown model", "cnn_small")
    assert_clean_error(run_cli("train", "--batch-size", "0"), "batch_size=0: expected an integer >= 1")
    assert_clean_error(run_cli("train", "--augment", "flip"), "--augment 'flip': expected key=value")
    assert_clean_error(run_cli("train", "--tta-shift", "9"), "tta_shift=9: expected an integer from 0 to 4")
    assert_clean_error(run_cli("train", "--sam-start", "1.5"), "sam_start=1.5: expected a fraction of the run in [0, 1)")


def test_test_time_augmentation_flags_reach_the_config():
    from fashionlab.cli import build_parser
    from fashionlab.config import make_config, settings_from_flags

    def train_config_from_args(args):
        return make_config(**settings_from_flags(args))
    args = build_parser().parse_args(["train", "--recipe", "fast", "--tta-shift", "2"])
    cfg = train_config_from_args(args)
    assert (cfg.tta_flip, cfg.tta_shift) == (True, 2)  # the recipe's flip, the flag's shift
    assert train_config_from_args(build_parser().parse_args(["train", "--recipe", "best"])).tta_shift == 2
    sam = train_config_from_args(build_parser().parse_args(["train", "--sam-rho", "0.1", "--sam-start", "0.5"]))
    assert (sam.sam_rho, sam.sam_start) == (0.1, 0.5)


def test_missing_data_dir_names_the_files(tmp_path):
    assert_clean_error(run_cli("data", "--data-dir", str(tmp_path), "--offline"),
                       f"--data-dir {tmp_path}: missing train-images-idx3-ubyte")


def test_corrupt_file_error_names_it(tmp_path):
    ds = synthetic_dataset(50, 20)
    folder = data.write_idx_folder(tmp_path, ds, gz=True)
    names = ",".join(ds.class_names)
    # not Fashion-MNIST: refused (by its shape or its checksum) unless declared a custom dataset
    assert_clean_error(run_cli("data", "--data-dir", str(folder), "--offline"), "train-images-idx3-ubyte.gz: ")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    assert_clean_error(run_cli("data", "--data-dir", str(folder), "--class-names", names, "--offline"),
                       "train-labels-idx1-ubyte.gz: truncated gzip")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny model trained through the CLI on a custom IDX folder."""
    tmp = tmp_path_factory.mktemp("cli")
    ds = synthetic_dataset(300, 100)
    folder = data.write_idx_folder(tmp / "idx", ds)
    names = ",".join(ds.class_names)
    out = tmp / "run"
    proc = run_cli("train", "--model", "cnn_small", "--epochs", "3", "--batch-size", "32", "--lr", "3e-3",
                   "--data-dir", str(folder), "--class-names", names, "--offline", "--out", str(out), check=True)
    return out, folder, names, ds, proc


def test_train_prints_progress_and_accuracy(trained_run):
    out, _, _, _, proc = trained_run
    assert "epoch 3/3: loss" in proc.stdout and "img/s" in proc.stdout
    assert "test accuracy" in proc.stdout and str(out) in proc.stdout
    # then the out-of-distribution detector, calibrated on the validation images
    assert "out-of-distribution threshold" in proc.stdout and "validation images" in proc.stdout
    assert (out / "ood.safetensors").is_file()


def test_a_run_trained_from_python_holds_the_same_files_but_the_report_unless_asked(trained_run, tmp_path):
    import fashionlab as fl
    out, folder, names, _, _ = trained_run
    run = fl.train(model="cnn_small", epochs=1, batch_size=32, data_dir=folder, class_names=names.split(","),
                   offline=True, out=tmp_path / "api", quiet=True)
    from_cli, from_api = ({p.name for p in d.iterdir()} for d in (out, run.path))
    assert from_cli - from_api == {"report.html"} | {n for n in from_cli if n.endswith(".png")}  # docs/api.md
    assert from_api <= from_cli
    run.report(data_dir=folder, offline=True)  # what train(report=True) does
    files = {p.name for p in run.path.iterdir()}
    assert {n for n in files if not n.endswith(".png")} == {n for n in from_cli if not n.endswith(".png")}
    assert any(n.endswith(".png") for n in files)  # the report's figures (which ones depends on its mistakes)


def test_explain_help_says_what_it_writes_and_takes_no_report_flags():
    help_text = run_cli("explain", "--help", check=True).stdout
    assert "RUN/explain.html" in help_text and "report.html" not in help_text and "--no-explain" not in help_text


def test_evaluate_reproduces_metrics(trained_run, tmp_path):
    out, folder, names, _, _ = trained_run
    res = run_cli("evaluate", str(out), "--data-dir", str(folder), "--offline", check=True)  # the run knows its classes
    assert "matches" in res.stdout and "confusion matrix" in res.stdout and "class9" in res.stdout
    as_json = run_cli("evaluate", str(out), "--data-dir", str(folder), "--offline", "--json", check=True)
    assert json.loads(as_json.stdout)["test_accuracy"] > 0 and "matches" in as_json.stderr
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    metrics = json.loads((tampered / "metrics.json").read_text())
    (tampered / "metrics.json").write_text(json.dumps({**metrics, "test_accuracy": metrics["test_accuracy"] - 0.01}))
    res = run_cli("evaluate", str(tampered), "--data-dir", str(folder), "--offline")
    assert res.returncode == 1 and "DIFFERS FROM" in res.stdout


def test_predict_images_and_arrays(trained_run, tmp_path):
    out, _, _, ds, _ = trained_run
    np.save(tmp_path / "two.npy", ds.test_images[:2])
    # the same image as a photo: inverted (dark object on white), upscaled, RGB, with a margin
    photo = Image.fromarray(255 - ds.test_images[0]).resize((140, 140)).convert("RGB")
    canvas = Image.new("RGB", (200, 180), "white")
    canvas.paste(photo, (30, 20))
    canvas.save(tmp_path / "photo.jpg", quality=90)
    res = run_cli("predict", str(out), str(tmp_path / "two.npy"), str(tmp_path / "photo.jpg"), "--top-k", "2",
                  check=True)
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{tmp_path / 'two.npy'}[0]: ")
    first = f"class{ds.test_labels[0]}"
    assert lines[0].split(": ")[1].startswith(first) and lines[2].split(": ")[1].startswith(first)
    assert all(re.search(r"  ood \d+\.\d\d", line) for line in lines), lines  # every prediction has its score
    blank = tmp_path / "blank.npy"
    np.save(blank, np.zeros((28, 28), np.uint8))
    res = run_cli("predict", str(out), str(blank), check=True)
    assert res.stdout.rstrip().endswith("unsure: not a garment?"), res.stdout


def test_calibrate_and_predict_with_and_without_a_detector(trained_run, tmp_path):
    """A run without ood.safetensors (made before it) whose dataset is not at hand: predictions carry no
    score, the reason is said once; `calibrate` makes the file, and the scores come back, in the CSV too."""
    out, folder, _, ds, _ = trained_run
    old = tmp_path / "old-run"
    shutil.copytree(out, old)
    (old / "ood.safetensors").unlink()
    np.save(tmp_path / "x.npy", ds.test_images[:3])
    csv_path = tmp_path / "p.csv"
    res = run_cli("predict", str(old), str(tmp_path / "x.npy"), "--out", str(csv_path), "--quiet", check=True)
    assert res.stderr.count("ood.safetensors: not found") == 1 and "fashionlab calibrate" in res.stderr, res.stderr
    import csv
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0])[-3:] == ["ood_score", "unsure", "error"]
    assert [(r["ood_score"], r["unsure"]) for r in rows] == [("", "")] * 3
    assert_clean_error(run_cli("calibrate", str(old), "--false-alarm-rate", "1.5"),
                       "--false-alarm-rate=1.5: expected a number between 0 and 1")
    assert_clean_error(run_cli("calibrate", str(old), "--offline"), "calibrate: error: ")  # its dataset is elsewhere
    res = run_cli("calibrate", str(old), "--false-alarm-rate", "0.1", "--data-dir", str(folder), "--offline",
                  check=True)
    assert "out-of-distribution threshold" in res.stdout and "10.0% false alarms" in res.stdout
    assert f"wrote {old / 'ood.safetensors'}" in res.stdout
    run_cli("predict", str(old), str(tmp_path / "x.npy"), "--out", str(csv_path), "--quiet", check=True)
    rows = list(csv.DictReader(csv_path.open()))
    assert all(float(r["ood_score"]) >= 0 and r["unsure"] in ("true", "false") for r in rows), rows


def test_predict_bad_files(trained_run, tmp_path):
    out = trained_run[0]
    (tmp_path / "notes.png").write_text("not an image")
    assert_clean_error(run_cli("predict", str(out), str(tmp_path / "notes.png")), "not a recognised image format")
    buf = io.BytesIO()
    Image.new("L", (64, 64), 200).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    assert_clean_error(run_cli("predict", str(out), str(tmp_path / "cut.png")), "truncated or corrupt image")
    np.save(tmp_path / "bad.npy", np.zeros((3, 32, 32), dtype=np.uint8))
    assert_clean_error(run_cli("predict", str(out), str(tmp_path / "bad.npy")), "array shape (3, 32, 32)")
    assert_clean_error(run_cli("predict", str(tmp_path / "no-run"), str(tmp_path / "bad.npy")), "no such run folder")
