"""Full disks, read-only folders and file modes: a real tmpfs of a few MiB mounted for each test (CI runs
as root), the real command line, and what is left on the disk afterwards."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fashionlab import api, atomic, data, run as run_mod
from conftest import ROOT, synthetic_dataset

DS = synthetic_dataset(n_train=1000, n_test=200)
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
UNDER_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


class Tmpfs:
    """A tmpfs mounted at `path`: `fill` leaves only `free` bytes, `grow` makes room again."""

    def __init__(self, path: Path, size: str):
        self.path = path
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            message = f"cannot mount a tmpfs (root is needed): {done.stderr.strip()}"
            pytest.fail(message) if UNDER_CI else pytest.skip(message)

    def fill(self, free: int) -> None:
        filler = self.path / f"filler-{uuid.uuid4().hex}"
        left = shutil.disk_usage(self.path).free - free
        with open(filler, "wb") as fh:
            while left > 0:
                chunk = min(left, 1 << 20)
                fh.write(b"\0" * chunk)  # written, not sparse: tmpfs counts what is written
                left -= chunk

    def remount(self, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size: str = "4m") -> Tmpfs:
        fs = Tmpfs(tmp_path / f"fs{len(mounted)}", size)
        mounted.append(fs)
        return fs

    yield mount
    for fs in mounted:
        fs.close()


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    return data.write_idx_folder(tmp_path_factory.mktemp("disk") / "idx", DS)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return api.train(model="mlp", epochs=1, out=tmp_path_factory.mktemp("disk") / "run", dataset=DS,
                     class_names=DS.class_names, quiet=True)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fashionlab", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files a failed write would have left (atomic.py names them .<name>.<random>.part)."""
    return [p.name for p in folder.rglob("*.part")]


def train_args(idx: Path, out: Path, epochs: int = 3) -> list:
    return ["train", "--model", "mlp", "--epochs", epochs, "--out", out, "--data-dir", idx, "--class-names",
            ",".join(DS.class_names), "--offline", "--quiet", "--no-report"]


def test_a_disk_that_fills_during_training_keeps_the_checkpoint_and_resumes(idx, tmpfs, tmp_path):
    # the mlp's checkpoint is about 2.8 MB (weights and Adam's two moments): the first fits, the second not
    fs = tmpfs("4m")
    run = fs.path / "run"
    line = one_line_error(cli(*train_args(idx, run)))
    assert line.startswith(f"fashionlab train: error: cannot write {run}/checkpoint.safetensors: No space left on "
                           f"device; the checkpoint of epoch 1 is kept; `fashionlab train --resume {run}` continues "
                           f"once there is space")
    assert run_mod.RunFolder(run).status == run_mod.INTERRUPTED and not leftovers(fs.path)

    again = one_line_error(cli("train", "--resume", run, "--quiet", "--no-report", "--data-dir", idx))
    assert "No space left on device" in again and "--resume" in again  # still full: the same one line

    fs.remount("size=64m")
    done = cli("train", "--resume", run, "--quiet", "--no-report", "--data-dir", idx)
    assert done.returncode == 0, done.stderr
    alone = cli(*train_args(idx, tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr
    resumed, uninterrupted = run_mod.RunFolder(run), run_mod.RunFolder(tmp_path / "alone")
    assert resumed.finished and len(resumed.history) == 3
    assert resumed.weights_path.read_bytes() == uninterrupted.weights_path.read_bytes()


def test_a_full_disk_before_the_first_checkpoint_keeps_nothing_and_says_so(idx, tmpfs):
    fs = tmpfs("4m")
    fs.fill(free=200_000)  # config.json and a history line fit; no checkpoint does
    line = one_line_error(cli(*train_args(idx, fs.path / "run")))
    assert "No space left on device" in line and "no checkpoint had been written yet" in line
    assert not (fs.path / "run").exists() and not leftovers(fs.path)


def test_report_export_and_calibrate_on_a_full_disk(finished, tmpfs):
    fs = tmpfs("8m")
    run = fs.path / "run"
    shutil.copytree(finished.path, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    fs.fill(free=30_000)
    data_dir = data.write_idx_folder(fs.path.parent / "idx-full", DS)
    for args, written in ((["report", run, "--no-explain"], run / "report.html"),
                          (["export", run, "--parity-images", "50"], run / "model.onnx"),
                          (["calibrate", run], run / "ood.safetensors")):
        line = one_line_error(cli(*args, "--data-dir", data_dir))
        assert "No space left on device" in line and str(run) in line, line
        assert not leftovers(fs.path)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing good lost, nothing half-written


def test_a_download_into_a_full_cache_names_the_file_and_keeps_no_part(tmpfs, tmp_path):
    source = data.write_idx_folder(tmp_path / "served", DS, gz=True)
    spec = data.custom_spec(DS.class_names)
    fs = tmpfs("4m")
    fs.fill(free=100_000)  # the labels fit, the images (about 600 KB compressed) do not
    with pytest.raises(atomic.OutputError) as caught:
        data.download(spec, fs.path, base_url=source.as_uri())
    message = str(caught.value)
    assert caught.value.disk_full and "No space left on device" in message and str(fs.path) in message
    assert "the next load downloads the rest once there is space" in message or "nothing was kept" in message
    assert not leftovers(fs.path)


def test_a_read_only_folder_is_one_line_before_any_work(finished, idx, tmpfs):
    fs = tmpfs("8m")
    shutil.copytree(finished.path, fs.path / "run")
    fs.remount("ro")
    line = one_line_error(cli(*train_args(idx, fs.path / "new")))
    assert "Read-only file system" in line and str(fs.path / "new") in line
    line = one_line_error(cli("report", fs.path / "run", "--no-explain", "--data-dir", idx))
    assert "Read-only file system" in line
    # readers are not writers: a read-only run folder still evaluates and predicts
    assert api.Run(fs.path / "run").evaluate(dataset=DS)["test_accuracy"] == finished.metrics["test_accuracy"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic.write_text(tmp_path / "a.json", "{}")
        atomic.write_bytes(tmp_path / "b.bin", b"x")
    finally:
        os.umask(old)
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_a_run_trained_under_umask_022_is_readable_by_everyone(tmp_path):
    code = ("import os; os.umask(0o022)\nfrom fashionlab import api\nfrom conftest import synthetic_dataset\n"
            "ds = synthetic_dataset(n_train=300, n_test=100)\n"
            f"api.train(model='mlp', epochs=1, out={str(tmp_path / 'run')!r}, dataset=ds, class_names=ds.class_names, "
            "quiet=True).report(dataset=ds, with_explain=False)")
    subprocess.run([sys.executable, "-c", code], check=True, env={**ENV, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}"},
                   timeout=300)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {"config.json", "metrics.json", "model.safetensors", "report.html"} <= {p.name for p in files}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


def test_a_sweep_on_a_full_disk_is_one_line_and_continues_once_there_is_space(tmpfs):
    from sweep_support import tiny_spec
    fs = tmpfs("3m")
    spec = tiny_spec(fs.path, seeds=1)
    fs.fill(free=300_000)  # the storage and a checkpoint or two fit, the rest does not
    line = one_line_error(cli("sweep", spec, "--quiet"))
    assert "No space left on device" in line or "the disk is full" in line, line
    fs.remount("size=64m")
    done = cli("sweep", spec, "--quiet", "--no-report")
    assert done.returncode == 0, done.stderr  # every point trained: nothing was lost to the full disk
