"""Data: IDX parsing, every corrupt-file case, sources and their order, download, splits."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from fashionlab import data
from conftest import synthetic_dataset

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def spec_for(ds: data.Dataset, folder_gz: Path | None = None, **changes) -> data.DatasetSpec:
    """A spec whose checksums are those of ds's IDX encoding (and of its .gz files in folder_gz)."""
    arrays = {("train", "images"): ds.train_images, ("train", "labels"): ds.train_labels,
              ("test", "images"): ds.test_images, ("test", "labels"): ds.test_labels}
    files = {}
    for key, f in data.FASHION_MNIST.files.items():
        md5 = None
        if folder_gz is not None:
            md5 = hashlib.md5((folder_gz / (f.name + ".gz")).read_bytes()).hexdigest()
        files[key] = data.IdxFile(f.name, hashlib.sha256(data.idx_bytes(arrays[key])).hexdigest(), md5)
    base = dataclasses.replace(data.FASHION_MNIST, name="synthetic", files=files, system_dirs=(),
                               class_names=tuple(ds.class_names),
                               counts={"train": len(ds.train_images), "test": len(ds.test_images)})
    return dataclasses.replace(base, **changes)


# --------------------------------------------------------------------------- parsing

def test_idx_round_trip():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    out = data.parse_idx(data.idx_bytes(images), "images", "x")
    assert out.shape == (2, 28, 28) and out.dtype == np.uint8 and (out == images).all()


def test_wrong_magic_names_file_and_expected_value():
    raw = data.idx_bytes(np.zeros(5, dtype=np.uint8))  # a labels file
    with pytest.raises(data.DataError, match=r"f\.idx: wrong IDX magic number 0x00000801; expected 0x00000803"):
        data.parse_idx(raw, "images", "f.idx")


def test_size_mismatch_and_short_header():
    raw = data.idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(data.DataError, match=r"header says shape \(3, 28, 28\).*but the file has"):
        data.parse_idx(raw[:-10], "images", "f")
    with pytest.raises(data.DataError, match="too short for an IDX header"):
        data.parse_idx(raw[:5], "images", "f")


@pytest.fixture
def synth_dir(tmp_path):
    ds = synthetic_dataset(n_train=50, n_test=20)
    folder = data.write_idx_folder(tmp_path / "synth", ds, gz=True)
    return ds, folder, spec_for(ds, folder)


def test_loads_verified_synthetic_folder(synth_dir):
    ds, folder, spec = synth_dir
    out = data.load(spec, data_dir=folder, offline=True)
    assert (out.train_images == ds.train_images).all() and (out.test_labels == ds.test_labels).all()
    assert out.train_labels.dtype == np.int64 and out.source == str(folder)
    assert out.verification.startswith("sha256")


def test_truncated_gzip(synth_dir):
    _, folder, spec = synth_dir
    f = folder / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-200])
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz: truncated gzip"):
        data.load(spec, data_dir=folder, offline=True)


def test_not_gzip(synth_dir):
    _, folder, spec = synth_dir
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte\.gz: not a valid gzip file"):
        data.load(spec, data_dir=folder, offline=True)


def test_checksum_mismatch_names_file_and_both_hashes(synth_dir):
    ds, folder, spec = synth_dir
    images = ds.test_images.copy()
    images[0, 0, 0] ^= 1  # one flipped bit
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data.idx_bytes(images)))
    expected = spec.file("test", "images").sha256
    with pytest.raises(data.DataError, match=rf"t10k-images-idx3-ubyte\.gz: checksum mismatch.*expected {expected}"):
        data.load(spec, data_dir=folder, offline=True)


def test_image_label_count_mismatch(tmp_path):
    ds = synthetic_dataset(n_train=50, n_test=20)
    ds.train_labels = ds.train_labels[:40]
    folder = data.write_idx_folder(tmp_path / "d", ds)
    spec = data.custom_spec(ds.class_names)
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte has 50 images but .*train-labels-idx1-ubyte has 40 labels"):
        data.load(spec, data_dir=folder, offline=True)


def test_custom_dataset_is_structure_checked_only(tmp_path):
    ds = synthetic_dataset(n_train=30, n_test=10, classes=3)
    folder = data.write_idx_folder(tmp_path / "d", ds)
    out = data.load(data.custom_spec(["a", "b", "c"]), data_dir=folder, offline=True)
    assert out.class_names == ["a", "b", "c"] and "structure only" in out.verification
    with pytest.raises(data.DataError, match="label 2 is out of range for 2 class names"):
        data.load(data.custom_spec(["a", "b"]), data_dir=folder, offline=True)


# --------------------------------------------------------------------------- sources

def test_offline_with_no_data_lists_places_and_both_ways(tmp_path, monkeypatch):
    spec = dataclasses.replace(data.FASHION_MNIST, system_dirs=(str(tmp_path / "nowhere"),))
    monkeypatch.setenv("FASHIONLAB_DATA", str(tmp_path / "env-dir"))
    with pytest.raises(data.DataError) as e:
        data.load(spec, offline=True)
    msg = str(e.value)
    assert "switched off (offline)" in msg
    for place in ("env-dir ($FASHIONLAB_DATA)", "(user cache)", "nowhere (system package)"):
        assert place in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "without --offline" in msg


def test_data_dir_missing_files_is_an_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"--data-dir .*: missing train-labels-idx1-ubyte, t10k-images"):
        data.load(data.FASHION_MNIST, data_dir=tmp_path, offline=True)


def test_source_order_data_dir_then_env_then_cache(tmp_path, monkeypatch, synth_dir):
    ds, folder, spec = synth_dir
    other = data.write_idx_folder(tmp_path / "env", ds, gz=True)
    monkeypatch.setenv("FASHIONLAB_DATA", str(other))
    assert data.load(spec, data_dir=folder, offline=True).source == str(folder)
    assert data.load(spec, offline=True).source == str(other)
    monkeypatch.delenv("FASHIONLAB_DATA")
    # the loads above left a verified decompressed copy in the user cache
    assert data.load(spec, offline=True).source == str(data.cache_dir(spec))


class _Server:
    """A real HTTP server on 127.0.0.1 serving a folder; `truncate` cuts bodies short."""

    def __init__(self, folder: Path, truncate: bool = False):
        folder_s, trunc = str(folder), truncate

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=folder_s, **kw)

            def log_message(self, *a):
                pass

            def copyfile(self, source, outputfile):
                body = source.read()
                outputfile.write(body[: len(body) // 2] if trunc else body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.requests = 0
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_verifies_and_then_uses_the_cache(synth_dir):
    ds, folder, spec = synth_dir
    server = _Server(folder)
    try:
        spec = dataclasses.replace(spec, url=server.url)
        out = data.load(spec, offline=False)
        assert out.source == server.url and (out.train_images == ds.train_images).all()
    finally:
        server.close()
    # the server is gone: the verified copy in the cache serves the next load
    assert data.load(spec, offline=False).source == str(data.cache_dir(spec))


def test_download_cut_short_leaves_nothing(synth_dir):
    _, folder, spec = synth_dir
    server = _Server(folder, truncate=True)
    try:
        with pytest.raises(data.DataError, match="cut short"):
            data.load(dataclasses.replace(spec, url=server.url), offline=False)
    finally:
        server.close()
    cache = data.cache_dir(spec)
    assert not cache.exists() or not any(cache.iterdir())


def test_real_download_path_checks_official_md5(real_data, tmp_path, monkeypatch):
    """The real files served over HTTP: Debian's recompressed .gz fail the official md5 (nothing is
    written); with their own md5 the same path downloads, verifies by SHA-256 and loads."""
    monkeypatch.setenv("FASHIONLAB_CACHE", str(tmp_path / "empty-cache"))
    server = _Server(SYSTEM_DIR)
    try:
        spec = dataclasses.replace(data.FASHION_MNIST, url=server.url, system_dirs=())
        with pytest.raises(data.DataError, match=r"md5 of the download is [0-9a-f]{32}, expected 8d4fb7e6c68d591d4c3dfef9ec88bf0d|expected bef4ecab|expected 25c81989|expected bb300cfd"):
            data.load(spec, offline=False)
        assert not any(p.suffix == ".gz" for p in data.cache_dir(spec).glob("*"))
        debian_md5 = {k: dataclasses.replace(f, gz_md5=hashlib.md5((SYSTEM_DIR / (f.name + ".gz")).read_bytes()).hexdigest())
                      for k, f in spec.files.items()}
        out = data.load(dataclasses.replace(spec, files=debian_md5), offline=False)
        assert out.source == server.url
        assert (out.test_labels == real_data.test_labels).all()
    finally:
        server.close()


def test_real_dataset_verifies(real_data):
    assert real_data.train_images.shape == (60000, 28, 28) and real_data.test_images.shape == (10000, 28, 28)
    assert real_data.train_images.dtype == np.uint8 and real_data.train_labels.dtype == np.int64
    assert real_data.verification.startswith("sha256")
    assert (np.bincount(real_data.train_labels) == 6000).all() and (np.bincount(real_data.test_labels) == 1000).all()
    assert real_data.class_names[6] == "Shirt"


# --------------------------------------------------------------------------- splits

def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = np.repeat(np.arange(10), 100)
    tr, va = data.stratified_split(labels, 0.2, seed=3)
    assert len(va) == 200 and len(tr) == 800 and not set(tr) & set(va)
    assert (np.bincount(labels[va]) == 20).all()
    tr2, va2 = data.stratified_split(labels, 0.2, seed=3)
    assert (va == va2).all()
    assert not (data.stratified_split(labels, 0.2, seed=4)[1] == va).all()
    with pytest.raises(ValueError, match=r"validation fraction must be in \[0, 1\), got 1.5"):
        data.stratified_split(labels, 1.5, 0)


def test_stratified_subset_exact_size():
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 50, 50, 50, 50, 41])
    idx = data.stratified_subset(labels, 97, seed=0)
    assert len(idx) == 97 and len(set(idx)) == 97
    exact = np.bincount(labels) * 97 / len(labels)
    assert np.abs(np.bincount(labels[idx], minlength=10) - exact).max() < 1
