"""Hostile data files and download servers (issue 18): each is a DataError naming the file or
address and what was expected, found with bounded work and memory, leaving nothing behind."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import http.server
import re
import shutil
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, synthetic_dataset
from fashionlab import data
from test_data import spec_for

MiB = 1 << 20


def idx_header(code: int, *dims: int, ndim: int | None = None) -> bytes:
    """An IDX header with any data-type code and dimensions, as a hostile file would have."""
    ndim = len(dims) if ndim is None else ndim
    return bytes([0, 0, code, ndim]) + b"".join(d.to_bytes(4, "big") for d in dims)


def gzip_bomb(head: bytes, gib: float) -> bytes:
    """A gzip stream of `head` then `gib` GiB of zeros, about 1 KiB per MiB, built at once: after a
    full flush each MiB of zeros compresses to the same bytes, so one block is repeated. It has
    no end (a reader that stops in time never gets there)."""
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return first + block * int(gib * 1024)


def peak_bytes(fn) -> int:
    """Peak Python memory (bytes, numpy arrays and zlib's output included) while fn runs."""
    tracemalloc.start()
    try:
        fn()
    except data.DataError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.fixture
def custom_dir(tmp_path):
    """A valid custom IDX folder (decompressed files) and its spec: no table of sizes."""
    ds = synthetic_dataset(n_train=30, n_test=10)
    return data.write_idx_folder(tmp_path / "custom", ds), data.custom_spec(ds.class_names)


@pytest.fixture
def known_dir(tmp_path):
    """A folder of .gz files and a spec that knows their sizes and checksums, like Fashion-MNIST's."""
    ds = synthetic_dataset(n_train=50, n_test=20)
    folder = data.write_idx_folder(tmp_path / "known", ds, gz=True)
    return folder, spec_for(ds, folder)


TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"


# --------------------------------------------------------------------------- IDX headers

@pytest.mark.parametrize("head, kind, message", [
    (idx_header(8, 2**31, 28, 28), "images",
     r"shape \(2147483648, 28, 28\) \(1683627180048 bytes\), more than the 2147483648 bytes a dataset file may have"),
    (idx_header(8, 2**32 - 1), "labels", r"shape \(4294967295,\) \(4294967303 bytes\), more than the 2147483648"),
    (idx_header(8, 0, 28, 28), "images", "IDX header says 0 images; expected at least 1"),
    (idx_header(8, 0), "labels", "IDX header says 0 labels; expected at least 1"),
    (idx_header(8, 5, 0, 0), "images", "IDX header says images of 0x0 pixels; expected 28x28"),
    (idx_header(8, 5, 28, 0), "images", "IDX header says images of 28x0 pixels; expected 28x28"),
    (idx_header(8, 5, 2**31, 2**31), "images", "images of 2147483648x2147483648 pixels; expected 28x28"),
    (idx_header(8, 2**31, 2**31, 4), "images", "images of 2147483648x4 pixels; expected 28x28"),  # product wraps to 0
    (idx_header(8, 5, 32, 32), "images", "images of 32x32 pixels; expected 28x28"),
    (idx_header(0x0D, 5, 28, 28), "images",
     r"wrong IDX magic number 0x00000d03; expected 0x00000803 for an IDX images file "
     r"\(data type code 0x0d \(float32\) is not supported, only 0x08 \(unsigned byte\)\)"),
    (idx_header(0x42, 5), "labels", r"data type code 0x42 \(unknown\) is not supported"),
    (idx_header(8, 5, 28, 28, 1), "images", r"\(4 dimensions; an IDX images file has 3 \(count, rows, columns\)\)"),
    (idx_header(8, 5, 1), "labels", r"\(2 dimensions; an IDX labels file has 1 \(count\)\)"),
    (idx_header(8, ndim=255), "images", r"\(255 dimensions; an IDX images file has 3"),
    (b"\x89PNG\r\n\x1a\n" + bytes(8), "images", r"\(not an IDX file: its first two bytes must be zero\)"),
    (idx_header(8, 5, 28, ndim=3), "images", r"12 bytes is too short for an IDX header \(16 bytes for images\)"),
    (b"\0\0", "labels", r"2 bytes is too short for an IDX header \(8 bytes for labels\)"),
], ids=["2^31-images", "2^32-labels", "zero-images", "zero-labels", "zero-rows-cols", "zero-cols", "2^31-rows-cols",
        "wrapping-product", "32x32", "float32", "unknown-type", "4-dims", "2-dim-labels", "255-dims", "png", "short-header", "2-bytes"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_hostile_header_is_refused_before_any_allocation(custom_dir, head, kind, message, gz):
    """Each header is refused from its first bytes, in a plain file and in a .gz, through load and
    through parse_idx: the message names the file; numpy never sees it."""
    folder, spec = custom_dir
    name = TRAIN_IMAGES if kind == "images" else TRAIN_LABELS
    (folder / name).unlink()
    path = folder / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(head) if gz else head)
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(path))}: .*{message}"):
        data.load(spec, data_dir=folder, offline=True)
    with pytest.raises(data.DataError, match=rf"^x\.idx: .*{message}"):
        data.parse_idx(head, kind, "x.idx")


def test_header_disagreeing_with_the_datasets_table(known_dir):
    """A known dataset's sizes come from its table, not from the file: a header that says otherwise
    is refused before its body is read."""
    folder, spec = known_dir
    (folder / (TRAIN_IMAGES + ".gz")).write_bytes(gzip.compress(data.idx_bytes(np.zeros((60, 28, 28), np.uint8))))
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz: IDX header says shape \(60, 28, 28\); "
                                             r"expected \(50, 28, 28\)"):
        data.load(spec, data_dir=folder, offline=True)


def test_small_gz_declaring_more_than_it_can_hold(custom_dir):
    """A 1 KB .gz cannot hold 1 GB: refused from the header, nothing allocated or decompressed."""
    folder, spec = custom_dir
    (folder / TRAIN_IMAGES).unlink()
    path = folder / (TRAIN_IMAGES + ".gz")
    path.write_bytes(gzip.compress(idx_header(8, 1_300_000, 28, 28)))
    stored = path.stat().st_size
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}: IDX header says shape \(1300000, 28, 28\) \(1019200016 bytes\), "
                                             rf"more than a {stored}-byte \.gz can hold"):
        data.load(spec, data_dir=folder, offline=True)


@pytest.mark.parametrize("change, message", [
    (lambda raw: raw + b"\0" * 7, r"\(23536 bytes\) but the file has 23543 bytes"),
    (lambda raw: raw[:-1], r"\(23536 bytes\) but the file has 23535 bytes"),
], ids=["larger", "smaller"])
def test_decompressed_file_larger_or_smaller_than_its_header(custom_dir, change, message):
    folder, spec = custom_dir
    path = folder / TRAIN_IMAGES
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}: IDX header says shape \(30, 28, 28\) {message}"):
        data.load(spec, data_dir=folder, offline=True)


# --------------------------------------------------------------------------- gzip

@pytest.mark.parametrize("change, message", [
    (lambda raw: raw + b"\0", r"IDX header says shape \(30, 28, 28\) \(23536 bytes\) but the file decompresses "
                              r"to more than that"),
    (lambda raw: raw[:-100], r"IDX header says shape \(30, 28, 28\) \(23536 bytes\) but the file decompresses "
                             r"to only 23436 bytes"),
], ids=["more", "less"])
def test_gz_holding_more_or_less_than_its_header(custom_dir, change, message):
    folder, spec = custom_dir
    raw = (folder / TRAIN_IMAGES).read_bytes()
    (folder / TRAIN_IMAGES).unlink()
    path = folder / (TRAIN_IMAGES + ".gz")
    path.write_bytes(gzip.compress(change(raw)))
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}: {message}"):
        data.load(spec, data_dir=folder, offline=True)


@pytest.mark.parametrize("change, message", [
    (lambda gz: gz + b"garbage", "unexpected bytes after the end of the gzip stream"),
    (lambda gz: gz + gzip.compress(b"more"), "unexpected bytes after the end of the gzip stream"),
    (lambda gz: gz[:-8] + bytes(4) + gz[-4:], r"not a valid gzip file \(.*incorrect data check\)"),  # CRC
    (lambda gz: gz[:-2], "truncated gzip file"),
], ids=["garbage", "second-member", "bad-crc", "no-trailer"])
def test_gz_trailer_and_trailing_bytes(known_dir, change, message):
    folder, spec = known_dir
    path = folder / (TRAIN_LABELS + ".gz")
    path.write_bytes(change(path.read_bytes()))
    with pytest.raises(data.DataError, match=rf"{re.escape(str(path))}: {message}"):
        data.load(spec, data_dir=folder, offline=True)


def test_gzip_bomb_in_fashion_mnist_folder_stops_at_the_tables_size(tmp_path):
    """The issue's case: 6 GB inside a 6 MB .gz, with Fashion-MNIST's own header. Decompression
    stops one byte past the table's 47,040,016 bytes; peak memory is about that one buffer."""
    for f in data.FASHION_MNIST.files.values():
        (tmp_path / (f.name + ".gz")).write_bytes(b"")
    bomb = tmp_path / (TRAIN_IMAGES + ".gz")
    bomb.write_bytes(gzip_bomb(idx_header(8, 60000, 28, 28), gib=6))
    assert bomb.stat().st_size < 7 * MiB
    load = lambda: data.load(data.FASHION_MNIST, data_dir=tmp_path, offline=True)  # noqa: E731
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(bomb))}: IDX header says shape \(60000, 28, 28\) \(47040016 bytes\) "
                                             "but the file decompresses to more than that"):
        load()
    assert peak_bytes(load) < 47040016 + 8 * MiB


def test_gzip_bomb_in_custom_folder_stops_at_its_headers_size(custom_dir):
    """A custom dataset has no table: the header's size (here 1,000 images) is where decompression
    stops; a header declaring the bomb's whole size is refused by the limit instead."""
    folder, spec = custom_dir
    (folder / TRAIN_IMAGES).unlink()
    bomb = folder / (TRAIN_IMAGES + ".gz")
    bomb.write_bytes(gzip_bomb(idx_header(8, 1000, 28, 28), gib=6))
    load = lambda: data.load(spec, data_dir=folder, offline=True)  # noqa: E731
    with pytest.raises(data.DataError, match=r"\(784016 bytes\) but the file decompresses to more than that"):
        load()
    assert peak_bytes(load) < 8 * MiB
    bomb.write_bytes(gzip_bomb(idx_header(8, 6 * 1024**3 // 784, 28, 28), gib=6))
    with pytest.raises(data.DataError, match=r"more than the 2147483648 bytes a dataset file may have"):
        load()


def test_cli_prints_one_line_naming_the_file(custom_dir):
    folder, spec = custom_dir
    path = folder / TRAIN_LABELS
    path.write_bytes(idx_header(8, 0))
    proc = run_cli("data", "--data-dir", str(folder), "--class-names", ",".join(spec.class_names), "--offline",
                   timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"fashionlab data: error: {path}: IDX header says 0 labels; expected at least 1\n"


# --------------------------------------------------------------------------- downloads

@contextlib.contextmanager
def serving(respond):
    """An HTTP server on 127.0.0.1 answering every GET with respond(handler); yields its address."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                respond(self)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


def send_head(handler, length: int | None = None):
    handler.send_response(200)
    if length is not None:
        handler.send_header("Content-Length", str(length))
    handler.end_headers()


def endless(handler):
    send_head(handler)  # no Content-Length: the body ends when the server closes
    for _ in range(16 * 1024):  # 1 GiB at most, should the client not stop
        handler.wfile.write(bytes(64 * 1024))


def drip(handler):
    send_head(handler, 10_000)
    for _ in range(100):  # a byte every 0.2 s: no read ever times out
        handler.wfile.write(b"\x1f")
        handler.wfile.flush()
        time.sleep(0.2)


def stall(handler):
    send_head(handler, 10_000)
    handler.wfile.write(b"\x1f")
    handler.wfile.flush()
    time.sleep(5)


def huge_length(handler):
    send_head(handler, 10**12)
    handler.wfile.write(bytes(1000))


def assert_cache_empty(spec):
    cache = data.cache_dir(spec)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("respond, settings, message", [
    (endless, {}, r"download of {url}train-images-idx3-ubyte\.gz: more than the 108673 bytes this file can be"),
    (huge_length, {}, r"download of {url}train-images-idx3-ubyte\.gz: the server declares 1000000000000 bytes, "
                      r"more than the 108673 bytes"),
    (drip, {"DOWNLOAD_DEADLINE_S": 1.5}, r"download of {url}train-images-idx3-ubyte\.gz did not finish within "
                                         r"1\.5 s \(\d+ bytes received\)"),
    (stall, {"READ_TIMEOUT_S": 0.5}, r"download of {url}train-images-idx3-ubyte\.gz stalled: no data for 0\.5 s "
                                     r"\(1 bytes received\)"),
], ids=["endless", "huge-length", "drip", "stall"])
def test_hostile_server_fails_in_time_and_leaves_nothing(known_dir, monkeypatch, respond, settings, message):
    _, spec = known_dir
    for name, value in settings.items():
        monkeypatch.setattr(data, name, value)
    with serving(respond) as url:
        start = time.monotonic()
        with pytest.raises(data.DataError, match=message.format(url=url)):
            data.load(dataclasses.replace(spec, url=url), offline=False)
        assert time.monotonic() - start < 1.5 + 3  # the deadline, with room for a loaded machine
    assert_cache_empty(spec)


def test_gzip_bomb_download_is_refused_by_the_size_cap(known_dir, monkeypatch):
    """Without a published md5 a bomb still cannot get in: it is far larger than the archive can be."""
    folder, spec = known_dir
    (folder / (TRAIN_IMAGES + ".gz")).write_bytes(gzip_bomb(idx_header(8, 50, 28, 28), gib=1))
    files = {k: dataclasses.replace(f, gz_md5=None) for k, f in spec.files.items()}
    with serving(lambda h: (send_head(h), h.wfile.write((folder / (TRAIN_IMAGES + ".gz")).read_bytes()))) as url:
        with pytest.raises(data.DataError, match=r"more than the 108673 bytes this file can be"):
            data.load(dataclasses.replace(spec, url=url, files=files), offline=False)
    assert_cache_empty(spec)


@pytest.mark.parametrize("md5_known", [True, False], ids=["md5", "sha256"])
def test_download_with_bad_checksum_leaves_nothing(known_dir, tmp_path, md5_known):
    """Another file behind the address fails the archive's md5 or, with none published, the SHA-256
    of its contents, naming the address; nothing reaches the cache."""
    folder, spec = known_dir
    served = shutil.copytree(folder, tmp_path / "served")
    other = synthetic_dataset(n_train=50, n_test=20, seed=1)
    data.write_idx_folder(served, other, gz=True)
    if not md5_known:
        spec = dataclasses.replace(spec, files={k: dataclasses.replace(f, gz_md5=None) for k, f in spec.files.items()})
    body = (served / (TRAIN_IMAGES + ".gz")).read_bytes()
    with serving(lambda h: (send_head(h, len(body)), h.wfile.write(body))) as url:
        expected = (r"{url}train-images-idx3-ubyte\.gz: md5 of the download is [0-9a-f]{{32}}, expected"
                    if md5_known else r"{url}train-images-idx3-ubyte\.gz: checksum mismatch: SHA-256")
        with pytest.raises(data.DataError, match=expected.format(url=url)):
            data.load(dataclasses.replace(spec, url=url), offline=False)
    assert_cache_empty(spec)
