"""One writer per run folder (runlock.py): real processes racing for one folder, a holder killed
with SIGKILL, waiting writers (studies, sweeps, train(reuse=True)) and readers that need no lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fashionlab import api, config, data, run as run_mod, runlock, training
from conftest import ROOT, synthetic_dataset

DS = synthetic_dataset(n_train=3000, n_test=200)
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    return data.write_idx_folder(tmp_path_factory.mktemp("lock") / "idx", DS)


def train_argv(idx: Path, out: Path, model: str = "mlp", epochs: int = 2) -> list[str]:
    return [sys.executable, "-m", "fashionlab", "train", "--model", model, "--epochs", str(epochs), "--out", str(out),
            "--data-dir", str(idx), "--class-names", ",".join(DS.class_names), "--offline", "--quiet",
            "--no-report", "--seed", "3"]


def hold_lock(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the folder's lock (for `seconds`), once it says so on stdout."""
    code = (f"import sys, time\nfrom fashionlab import runlock\n"
            f"with runlock.writing({str(folder)!r}, create=True):\n"
            f"    print('held', flush=True)\n    time.sleep({seconds})\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "hold-for-test"], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def wait_for_holder(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holder = runlock.read_holder(folder)
        if holder.get("pid") == proc.pid:
            return holder
        assert proc.poll() is None, "the first writer ended before it was seen holding the folder"
        time.sleep(0.02)
    raise AssertionError("the first writer never took the folder's lock")


def test_two_processes_one_folder_exactly_one_trains(idx, tmp_path):
    """The second writer fails within a second, naming the first; the folder is the first run's,
    its model byte for byte the model of the same run trained alone."""
    out = tmp_path / "same"
    first = subprocess.Popen(train_argv(idx, out, "mlp", epochs=6), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for_holder(out, first)
    started = time.monotonic()
    second = subprocess.run(train_argv(idx, out, "cnn_small", epochs=1), env=ENV, capture_output=True, text=True,
                            timeout=120)
    refused_after = time.monotonic() - started
    assert first.poll() is None, "the first run must still be training when the second is refused"
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"{out} is being written by pid {first.pid} (" in lines[0] and "fashionlab train --model mlp" in lines[0]
    assert " since 20" in lines[0]
    assert refused_after < 5, f"refused after {refused_after:.1f} s"  # < 1 s quiet; the suite may share the cores
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err

    alone = tmp_path / "alone"
    subprocess.run(train_argv(idx, alone, "mlp", epochs=6), env=ENV, check=True, capture_output=True, timeout=300)
    assert run_mod.RunFolder(out).config.model == "mlp"
    assert (out / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()
    assert run_mod.RunFolder(out).metrics["test_accuracy"] == run_mod.RunFolder(alone).metrics["test_accuracy"]
    assert len(run_mod.RunFolder(out).history) == 6


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    holder = hold_lock(tmp_path / "run", 600)
    with pytest.raises(runlock.RunBusy, match=f"pid {holder.pid} .*hold-for-test"):
        with runlock.writing(tmp_path / "run"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with runlock.writing(tmp_path / "run"):  # at once: the lock died with its process
        assert runlock.read_holder(tmp_path / "run")["pid"] == os.getpid()
    assert runlock.read_holder(tmp_path / "run") == {}  # released: no stale description left


def test_the_lock_is_reentrant_in_one_process_and_refused_to_another(tmp_path):
    with runlock.writing(tmp_path / "r", create=True):
        with runlock.writing(tmp_path / "r"):  # training fits the detector into the folder it holds
            pass
        assert runlock.read_holder(tmp_path / "r")["pid"] == os.getpid()  # still held after the inner block
        other = subprocess.run([sys.executable, "-c", f"from fashionlab import runlock\n"
                                f"with runlock.writing({str(tmp_path / 'r')!r}): pass"],
                               capture_output=True, text=True, env=ENV, timeout=60)
        assert other.returncode == 1 and "RunBusy" in other.stderr and f"pid {os.getpid()}" in other.stderr


def test_a_missing_folder_is_not_made_by_a_reader_of_it(tmp_path):
    with runlock.writing(tmp_path / "nothing"):
        pass
    assert not (tmp_path / "nothing").exists()


def test_train_or_reuse_waits_for_the_other_writer_and_says_so(tmp_path):
    said = []
    holder = hold_lock(tmp_path / "run", 1.5)
    cfg = config.make_config(model="mlp", epochs=1, class_names=DS.class_names, subset=300)
    folder, action = run_mod.train_or_reuse(cfg, tmp_path / "run", DS, wait=said.append)
    holder.wait(timeout=30)
    assert action == "trained" and folder.finished
    assert len(said) == 1 and f"being written by pid {holder.pid}" in said[0] and "waiting" in said[0]


def test_without_waiting_a_busy_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    holder = hold_lock(tmp_path / "run", 600)
    try:
        monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("work started on a busy folder"))
        with pytest.raises(runlock.RunBusy, match="hold-for-test"):
            api.train(model="mlp", epochs=1, out=tmp_path / "run", quiet=True)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [runlock.LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()


def test_readers_need_no_lock_and_writers_of_a_finished_run_are_refused(tmp_path):
    run = api.train(model="mlp", epochs=1, out=tmp_path / "run", dataset=DS, class_names=DS.class_names,
                    subset=300, quiet=True)
    before = run.metrics
    holder = hold_lock(run.path, 600)
    try:
        assert run.evaluate(dataset=DS)["test_accuracy"] == before["test_accuracy"]  # readers go on
        assert len(run.predict(DS.test_images[:2])) == 2
        with pytest.raises(runlock.RunBusy, match=f"pid {holder.pid}"):
            run.report(dataset=DS, with_explain=False)
        with pytest.raises(runlock.RunBusy):
            run.calibrate_ood(dataset=DS)
        assert not run.report_path.exists()
        run.report(tmp_path / "elsewhere" / "report.html", dataset=DS, with_explain=False)  # not into the folder
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_new_run_takes_its_folder_and_lock_file_away(tmp_path):
    class Fails(training.Callback):
        def on_train_start(self, trainer):
            raise RuntimeError("stopped by the test")

    cfg = config.make_config(model="mlp", epochs=1, class_names=DS.class_names, subset=300)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        run_mod.train_run(cfg, tmp_path / "new", DS, [Fails()], quiet=True)
    assert not (tmp_path / "new").exists()
    run_mod.train_run(cfg, tmp_path / "done", DS, quiet=True)
    assert runlock.LOCK_FILE not in {p.name for p in (tmp_path / "done").iterdir()}  # only while written
