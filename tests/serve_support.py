"""Support for the service tests: a small model trained once on real data, real server processes,
and hostile images built small (blank_png, float_tiff: megapixels decoded from a few KB).

The model is trained once per test session (cached here, so every test module shares it):
cnn_small on a stratified subset of the real training set for one epoch, a few seconds.
Missing data fails under CI (CI=true) and skips elsewhere, like conftest's `real_data`.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from fashionlab import data

ROOT = Path(__file__).resolve().parents[1]
_CACHE: dict[str, object] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def real_dataset() -> data.Dataset:
    if "data" not in _CACHE:
        try:
            _CACHE["data"] = data.load(data.FASHION_MNIST, offline=True)
        except data.DataError as e:
            if in_ci():
                pytest.fail(f"the real dataset is required under CI and is missing: {e}")
            pytest.skip(f"real dataset not installed: {e}")
    return _CACHE["data"]  # type: ignore[return-value]


def trained_run() -> Path:
    """A run folder with a small CNN trained on 2,000 real images for one epoch (about 70% accuracy)."""
    if "run" not in _CACHE:
        import fashionlab
        out = Path(tempfile.mkdtemp(prefix="fashionlab-serve-test-")) / "run"
        fashionlab.train(model="cnn_small", out=out, dataset=real_dataset(), quiet=True, subset=2000, epochs=1,
                         val_split=0.0, batch_size=64, seed=0, device="cpu", precision="fp32")
        _CACHE["run"] = out
    return _CACHE["run"]  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `fashionlab serve` process on 127.0.0.1; `log()` is what it wrote to stderr so far."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextmanager
def server_process(*args: str, env: dict[str, str] | None = None, port: int | None = None,
                   startup_timeout: float = 120.0):
    """Start `python -m fashionlab serve ARGS --port P` and wait for GET /ping to answer 200."""
    port = port or int((env or {}).get("SAGEMAKER_BIND_TO_PORT") or 0) or free_port()
    log_path = Path(tempfile.mkstemp(prefix="fashionlab-serve-", suffix=".log")[1])
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "fashionlab", "serve", *args]
    if "--port" not in args and "SAGEMAKER_BIND_TO_PORT" not in (env or {}):
        cmd += ["--port", str(port)]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    server = Server(proc, url, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if not server.alive():
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(url + "/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not answer /ping within {startup_timeout:.0f}s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- hostile images, built small

def _deflate_zeros(nbytes: int) -> bytes:
    """zlib stream of `nbytes` zero bytes, compressed a megabyte at a time (never held whole)."""
    compressor, zero, out = zlib.compressobj(9), bytes(1 << 20), []
    while nbytes > 0:
        out.append(compressor.compress(zero[: min(nbytes, len(zero))]))
        nbytes -= len(zero)
    return b"".join(out) + compressor.flush()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.lru_cache(maxsize=None)
def blank_png(width: int, height: int | None = None) -> bytes:
    """A valid 8-bit grey PNG, all black: a few KB on the wire for millions of decoded pixels."""
    height = height or width
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", _deflate_zeros((width + 1) * height))
            + _png_chunk(b"IEND", b""))


@functools.lru_cache(maxsize=None)
def float_tiff(side: int = 6320) -> bytes:
    """A valid single-strip, deflate-compressed 32-bit float grey TIFF of side x side zeros: 155 KB for
    6320 x 6320, which Pillow holds as 160 MB once decoded (and the code before issue 18 as 1.3 GB)."""
    data = _deflate_zeros(side * side * 4)
    # tag, type (3 SHORT, 4 LONG), value: width, height, 32 bits, deflate, black is zero, strip offset,
    # 1 sample, rows per strip, strip bytes, chunky, IEEE float
    tags = [(256, 4, side), (257, 4, side), (258, 3, 32), (259, 3, 8), (262, 3, 1), (273, 4, 8 + 2 + 12 * 11 + 4),
            (277, 3, 1), (278, 4, side), (279, 4, len(data)), (284, 3, 1), (339, 3, 3)]
    entries = b"".join(struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                            else struct.pack("<I", value)) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0) + data


# --------------------------------------------------------------------------- /metrics

def metric_samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A Prometheus text exposition, parsed by prometheus_client's own parser: sample name -> {sorted
    (label, value) pairs: value}."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out
