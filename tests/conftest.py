"""Shared fixtures: the real dataset (must be present under CI), tiny synthetic data, isolation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from fashionlab import data

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (scripts/test runs one process per core), each worker and the processes its
    tests start (OMP_NUM_THREADS, unless set) get the worker's share of the cores as torch's threads.

    Why: two workers with two intra-op threads each on 2 cores keep waiting for each other (docs/
    sweeps.md). And a run that chooses its threads from the cores free at its start (device.
    training_threads) chose 2 or 1 as the other worker came and went, so a resumed run could sum in
    another order than the run it continues and differ in the last bits (test_train's SIGINT test)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        from fashionlab import device
        share = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, device.usable_cores() // workers)))
        torch.set_num_threads(int(share))  # the worker itself as the processes it starts


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own empty dataset cache and no network: nothing leaks between tests."""
    monkeypatch.setenv("FASHIONLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("FASHIONLAB_OFFLINE", "1")
    monkeypatch.delenv("FASHIONLAB_DATA", raising=False)


@pytest.fixture(autouse=True)
def _no_amx_rule(monkeypatch):
    """The recipes' AMX rule stays off unless a test turns it on: the settings a test resolves must not
    depend on whether the machine running it has AMX tiles (test_gpu_step checks the rule itself)."""
    from fashionlab import device
    monkeypatch.setattr(device, "cpu_has_amx", lambda: False)


_REAL: data.Dataset | None = None


@pytest.fixture
def real_data() -> data.Dataset:
    """The real Fashion-MNIST, verified. Missing data fails under CI (CI=true) and skips elsewhere,
    so a broken install step can never hide behind a green, skipped suite."""
    global _REAL
    if _REAL is None:
        try:
            _REAL = data.load(data.FASHION_MNIST, offline=True)
        except data.DataError as e:
            if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
                pytest.fail(f"the real dataset is required under CI and is missing: {e}")
            pytest.skip(f"real dataset not installed: {e}")
    return _REAL


def synthetic_dataset(n_train: int = 200, n_test: int = 100, seed: int = 0, classes: int = 10) -> data.Dataset:
    """Tiny learnable data: each class is a bright bar at its own position, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = np.arange(n) % classes
        rng.shuffle(labels)
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            row = 2 + (c * 24) // classes
            images[i, row: row + 3, 4:24] = 220
        return images, labels.astype(np.int64)

    tr_x, tr_y = make(n_train)
    te_x, te_y = make(n_test)
    return data.Dataset(tr_x, tr_y, te_x, te_y, [f"class{i}" for i in range(classes)], "synthetic", "none", "synthetic")


def rewrite_tensors(path, change) -> None:
    """Rewrite a safetensors file (e.g. a checkpoint) whole, after change(tensors, metadata) has edited
    its tensors and its metadata (both dicts, in place)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as fh:
        tensors, meta = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}
    change(tensors, meta)
    save_file(tensors, str(path), metadata=meta)


def stopped_run(cfg, folder: Path, ds: data.Dataset, at_step: int) -> Path:
    """Train cfg into folder until its global step `at_step`, where it stops as SIGTERM would stop it
    (a checkpoint mid-epoch, then TrainingInterrupted); returns the folder, to resume."""
    from fashionlab import run as run_mod, training

    class StopAtStep(training.Callback):
        def on_step(self, trainer, step, stats):
            if trainer.state.step == at_step:
                trainer.stop_signal["signum"] = 15

    with pytest.raises(training.TrainingInterrupted):
        run_mod.train_run(cfg, folder, dataset=ds, quiet=True, callbacks=[StopAtStep()])
    return folder


def resumed_and_whole(cfg, tmp_path: Path, ds: data.Dataset, at_step: int) -> tuple[dict, dict]:
    """The metrics of a run stopped at global step `at_step` and resumed, and of the uninterrupted run."""
    from fashionlab import run as run_mod
    cut = stopped_run(cfg, tmp_path / "cut", ds, at_step)
    resumed = run_mod.resume_run(cut, dataset=ds, quiet=True).metrics
    return resumed, run_mod.train_run(cfg, tmp_path / "whole", dataset=ds, quiet=True).metrics


@pytest.fixture
def tiny_data() -> data.Dataset:
    return synthetic_dataset()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, check: bool = False):
    """Run `python -m fashionlab ARGS` in a subprocess; returns the CompletedProcess."""
    import subprocess
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fashionlab", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"fashionlab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
