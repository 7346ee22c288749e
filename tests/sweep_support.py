"""Support for the sweep tests: a private PostgreSQL cluster, tiny IDX datasets, sweep worker processes."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


CLASSES = [f"c{i}" for i in range(10)]


def write_idx_dataset(folder: Path, dataset) -> Path:
    """Write a Dataset's four arrays as IDX files (the format fashionlab reads with --data-dir)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train-images-idx3-ubyte", dataset.train_images), ("train-labels-idx1-ubyte", dataset.train_labels),
                      ("t10k-images-idx3-ubyte", dataset.test_images), ("t10k-labels-idx1-ubyte", dataset.test_labels)):
        arr = np.asarray(arr).astype(np.uint8)
        magic = 0x00000803 if arr.ndim == 3 else 0x00000801
        header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape)
        (folder / name).write_bytes(header + arr.tobytes())
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: float(Path(p).parts[-3]))
    for initdb in reversed(found):
        bindir = Path(initdb).parent
        if (bindir / "pg_ctl").exists():
            return bindir
    return None


@contextmanager
def postgres_cluster():
    """A private PostgreSQL cluster on 127.0.0.1 and a free port, in a temporary folder; yields its URL.

    PostgreSQL refuses to run as root, so under root (CI) the cluster runs as the `postgres` user.
    """
    bindir = postgres_bin()
    if bindir is None:
        if _ci():
            pytest.fail("PostgreSQL is required under CI (apt-get install postgresql) and initdb/pg_ctl were not found")
        pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
    as_user: list[str] | None = []  # None: run through `su postgres -c` (no runuser)
    base = Path(tempfile.mkdtemp(prefix="fashionlab-pg-", dir="/tmp"))
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs the `postgres` system user to start PostgreSQL")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else None
    os.chmod(base, 0o700)
    datadir, port = base / "data", free_port()
    log = base / "server.log"

    def command(cmd) -> list[str]:
        cmd = [str(c) for c in cmd]
        return ["su", "postgres", "-s", "/bin/sh", "-c", shlex.join(cmd)] if as_user is None else [*as_user, *cmd]

    def run(*cmd):
        proc = subprocess.run(command(cmd), capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
                               + (f"\n{log.read_text()}" if log.exists() else ""))
        return proc

    try:
        run(bindir / "initdb", "-D", datadir, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        run(bindir / "pg_ctl", "-D", datadir, "-l", log, "-w", "-t", "60", "-o",
            f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=100", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(command([bindir / "pg_ctl", "-D", datadir, "-m", "immediate", "-w", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def sweep_env() -> dict[str, str]:
    env = {**os.environ}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_sweep(*args: str, log: Path) -> subprocess.Popen:
    """`python -m fashionlab sweep ARGS` as a real process; output goes to log."""
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "fashionlab", "sweep", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=sweep_env(), cwd=ROOT)


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def write_spec(folder: Path, body: str, name: str = "spec.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def tiny_spec(tmp_path: Path, name: str = "tiny", seeds: int = 2, extra: str = "", epochs: int = 3,
              filters: str = "[4, 8]") -> Path:
    """2 x 2 points x `seeds` seeds of a convnet with 4-8 filters on 600 synthetic images: about 1 s a training."""
    data_dir = write_idx_dataset(tmp_path / "data", synthetic_dataset(n_train=600, n_test=100))
    return write_spec(tmp_path, f"""
        [experiment]
        name = "{name}"
        model = "cnn"
        seeds = {seeds}
        folder = "{tmp_path / 'exp'}"
        {extra}
        [train]
        epochs = {epochs}
        batch_size = 50
        precision = "fp32"
        [model_args]
        dense = [16]
        [factors]
        kernel = [3, 5]
        filters = {filters}
        depth = [1]
        [data]
        data_dir = "{data_dir}"
        class_names = {json.dumps(CLASSES)}
        """)
