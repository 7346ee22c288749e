"""Support for the service tests: a small model trained once on real data, real server processes.

The model is trained once per test session (cached here, so every test module shares it):
cnn_small on a stratified subset of the real training set for one epoch, a few seconds.
Missing data fails under CI (CI=true) and skips elsewhere, like conftest's `real_data`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
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
