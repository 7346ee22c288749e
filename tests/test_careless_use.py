"""Careless use of the command line and the API (issue 18): every mistake is one line naming the flag,
setting or path and what it accepts, found before any work and before anything is written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fashionlab import api, atomic, cli, config, data, run as run_mod, training
from fashionlab.atomic import OutputError, atomic_write, check_writable, write_text
from conftest import ROOT, synthetic_dataset

DS = synthetic_dataset(n_train=300, n_test=100)
NAMES = ",".join(DS.class_names)
HAS_PROC = Path("/proc/self").is_dir()  # Linux: /proc refuses new files, even to root


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished run of a custom IDX dataset (so a subprocess can evaluate it), an image, a file and a folder."""
    tmp = tmp_path_factory.mktemp("careless")
    folder = data.write_idx_folder(tmp / "idx", DS)
    run = api.train(model="cnn_small", epochs=1, batch_size=32, out=tmp / "run", class_names=DS.class_names,
                    data_dir=folder, offline=True, quiet=True)
    np.save(tmp / "img.npy", DS.test_images[:2])
    (tmp / "afile").write_text("a file, not a folder")
    (tmp / "adir").mkdir()
    return tmp, folder, run


def cli_error(capsys, *argv) -> str:
    """Run the CLI in-process; it must fail with exit 2 and one line naming the problem (returned)."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Loading the dataset or a model is work: a check that must come first fails the test if it comes later."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the mistake was found")
    monkeypatch.setattr(data, "load", work)
    monkeypatch.setattr(run_mod.RunFolder, "load_model", work)


# --------------------------------------------------------------------------- settings

@pytest.mark.parametrize("augment, message", [
    ({"flip": "yes"}, "augment: flip='yes': expected a probability from 0 to 1"),
    ({"crop": "abc"}, "augment: crop='abc': expected an integer from 0 to 14 (pixels)"),
    ({"flip": 2}, "augment: flip=2: expected a probability from 0 to 1"),
    ({"flip": True}, "augment: flip=True: expected a probability"),
    ({"flip": float("nan")}, "augment: flip=nan: expected a probability"),
    ({"crop": -1}, "augment: crop=-1: expected an integer from 0 to 14"),
    ({"crop": 1000}, "augment: crop=1000: expected an integer from 0 to 14"),
    ({"crop": 2.5}, "augment: crop=2.5: expected an integer"),
    ({"rotate": -5}, "augment: rotate=-5: expected degrees from 0 to 180"),
    ({"rotate": 1e9}, "augment: rotate=1000000000.0: expected degrees from 0 to 180"),
    ({"scale": 1}, "augment: scale=1: expected a fraction in [0, 1)"),
    ({"erase": 1.5}, "augment: erase=1.5: expected a probability from 0 to 1"),
    ({"erase": [0.5]}, "augment: erase=[0.5]: expected a probability"),
    ({"blur": 1}, "augment: unknown augmentation blur; known: crop, erase, flip, light, rotate, scale"),
])
def test_augmentation_values_are_checked_before_anything_is_written(augment, message, tmp_path):
    with pytest.raises(config.ConfigError) as e:
        api.train(model="cnn_small", epochs=1, augment=augment, out=tmp_path / "run", dataset=DS, quiet=True)
    assert str(e.value) == message or str(e.value).startswith(message)
    assert not (tmp_path / "run").exists()
    with pytest.raises(config.ConfigError, match="augment: "):  # what a sweep spec's levels go through
        config.check_setting("augment", augment)


# The first fragment starts the message; the others (the model's own words, or torch's) appear in it.
@pytest.mark.parametrize("model, model_args, fragments", [
    ("cnn", {"dropout": "abc"}, ["model_args dropout='abc': expected a number, like its default 0.0; model 'cnn' "
                                 "takes channels=[32, 64], kernel=3, padding=\"same\""]),
    ("cnn", {"chanels": [16]}, ["model_args chanels=[16]: model 'cnn' has no such argument (did you mean "
                                "'channels'?); model 'cnn' takes channels=[32, 64]"]),
    ("cnn", {"dropout": True}, ["model_args dropout=True: expected a number"]),  # Dropout(p=True) zeroes everything
    ("cnn", {"batchnorm": "yes"}, ["model_args batchnorm='yes': expected true or false"]),
    ("cnn", {"channels": [1.5]}, ["model_args channels=[1.5]: expected a list of integers, like its default [32, 64]"]),
    ("cnn", {"dense": -5}, ["model_args dense=-5: expected a list of integers"]),
    ("cnn", {"channels": [-16]}, ["model_args channels=[-16]: ", "negative dimension -16"]),
    ("cnn", {"dense": [-5]}, ["model_args dense=[-5]: ", "negative dimension -5"]),
    ("cnn", {"channels": [0]}, ["model_args channels=[0]: ", "model 'cnn' takes channels=[32, 64]"]),
    ("cnn", {"dropout": 2}, ["model_args dropout=2: ", "dropout probability has to be between 0 and 1"]),
    ("cnn", {"channels": [16] * 8}, ["model_args channels=[16, 16, 16, 16, 16, 16, ...]: ",
                                     "input of side 28 is too small for 8 blocks"]),
    ("cnn", {"num_classes": 5}, ["model_args num_classes=5: the model gives 5 outputs; the dataset has 10 classes"]),
    ("cnn", {"dense": [2_000_000]}, ["model_args dense=[2000000]: ", "6,294,018,826 parameters"]),  # 25 GB, refused
    ("cnn", {"resize": 4, "channels": [16, 16, 16]}, ["model_args resize=4, channels=[16, 16, 16]: ",
                                                      "input of side 4 is too small"]),
    ("lstm", {"hidden": -1}, ["model_args hidden=-1: ", "hidden_size must be greater than zero",
                              "model 'lstm' takes hidden=128"]),
    ("lstm", {"cell": "rnn"}, ["model_args cell='rnn': ", "cell must be one of"]),
    ("resnet8", {"widths": [8]}, ["model_args widths=[8]: ", "must be non-empty and of equal length"]),
])
def test_model_arguments_are_checked_on_the_meta_device(model, model_args, fragments, tmp_path):
    with pytest.raises(config.ConfigError) as e:
        api.train(model=model, model_args=model_args, out=tmp_path / "run", dataset=DS, quiet=True)
    message = str(e.value)
    assert message.startswith(fragments[0]) and all(f in message for f in fragments[1:]), message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_good_model_arguments_and_class_counts_pass():
    config.make_config(model="cnn", model_args={"dropout": 0, "channels": [16, 32], "resize": 32, "mean": 0.5})
    config.make_config(model="fast", class_names=list("abcde"))  # training gives the model 5 outputs
    config.make_config(model="mlp", model_args={"num_classes": 3}, class_names=list("abc"))
    for recipe in api.list_recipes():
        config.make_config(recipe["name"])


@pytest.mark.parametrize("argv, message", [
    (["--augment", "flip=yes"], "augment: flip='yes': expected a probability from 0 to 1"),
    (["--augment", "crop=abc"], "augment: crop='abc': expected an integer from 0 to 14 (pixels)"),
    (["--augment", "flip=2"], "augment: flip=2: expected a probability from 0 to 1"),
    (["--model-arg", "dropout=abc"], "model_args dropout='abc': expected a number, like its default 0.0"),
    (["--model-arg", "chanels=[16]"], "model_args chanels=[16]: model 'cnn_small' has no such argument (did you mean "
                                      "'channels'?); model 'cnn_small' takes channels=[32, 32], kernel=3"),
])
def test_command_line_settings_are_one_line_errors_and_leave_no_run_folder(argv, message, made, tmp_path, capsys,
                                                                           monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)  # where `train` without --out makes runs/<time>-<model>
    line = cli_error(capsys, "train", "--model", "cnn_small", "--epochs", "1", "--data-dir", made[1], "--class-names",
                     NAMES, *argv)
    assert line.startswith(f"fashionlab train: error: {message}"), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv", [["--data-dir", "{tmp}/nowhere"],  # data missing
                                  ["--data-dir", "{idx}", "--class-names", "a,b"]])  # labels beyond the classes
def test_failed_train_without_out_leaves_no_run_folder(argv, made, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, "train", "--model", "cnn_small", "--epochs", "1", "--quiet", "--no-report",
              *[a.format(tmp=tmp_path, idx=made[1]) for a in argv])
    assert not list(tmp_path.glob("runs/*")), list(tmp_path.glob("runs/*"))


@pytest.mark.parametrize("val_split, message", [
    ("0.999", "val_split=0.999 leaves none of the 300 training images to train on"),
    ("0.001", "val_split=0.001 gives no validation images from the 300 training images"),
])
def test_a_split_with_an_empty_part_is_refused_and_leaves_no_run_folder(val_split, message, made, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = cli_error(capsys, "train", "--model", "mlp", "--epochs", "1", "--quiet", "--no-report", "--data-dir",
                     made[1], "--class-names", NAMES, "--val-split", val_split)
    assert line.startswith(f"fashionlab train: error: {message}"), line
    assert not list(tmp_path.glob("runs/*"))


class FailsInTraining(training.Callback):
    def on_step(self, trainer, step, stats):
        raise RuntimeError("the disk filled up")


def test_a_run_failing_after_config_json_leaves_no_run_files_and_no_folder_it_made(tmp_path):
    ds = synthetic_dataset()
    with pytest.raises(RuntimeError, match="the disk filled up"):
        api.train(model="mlp", epochs=1, dataset=ds, out=tmp_path / "new", quiet=True, callbacks=[FailsInTraining()])
    assert not (tmp_path / "new").exists()
    (tmp_path / "given").mkdir()
    (tmp_path / "given" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        api.train(model="mlp", epochs=1, dataset=ds, out=tmp_path / "given", quiet=True, callbacks=[FailsInTraining()])
    assert [p.name for p in (tmp_path / "given").iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- predict --top-k

@pytest.mark.parametrize("k", ["-3", "0", "11"])
def test_predict_top_k_outside_one_to_the_classes_is_refused(k, made, capsys):
    tmp, _, run = made
    line = cli_error(capsys, "predict", run.path, tmp / "img.npy", "--top-k", k)
    assert line == (f"fashionlab predict: error: --top-k {k}: expected an integer from 1 to 10 "
                    f"(the run's number of classes)")


def test_predict_top_k_of_every_class_lists_them_all(made, capsys):
    tmp, _, run = made
    assert cli.main(["predict", str(run.path), str(tmp / "img.npy"), "--top-k", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.count("class") == 10 for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--parity-images", "-5"], "parity_images=-5: expected an integer >= 1"),  # used to compare 95 of 100 and write
    (["--parity-images", "0"], "parity_images=0: expected an integer >= 1"),
    (["--tolerance", "-1"], "tolerance=-1.0: expected a finite number >= 0"),
    (["--tolerance", "nan"], "tolerance=nan: expected a finite number >= 0"),
])
def test_export_options_are_checked_before_any_work(argv, message, made, capsys, no_work):
    tmp, _, run = made
    line = cli_error(capsys, "export", run.path, "--out", tmp / "x.onnx", *argv)
    assert line.startswith(f"fashionlab export: error: {message}"), line
    assert not (tmp / "x.onnx").exists()


# --------------------------------------------------------------------------- output places

COMMANDS_THAT_WRITE = {  # each command's arguments around its output option
    "train": lambda r, spec: ["train", "--model", "cnn_small", "--out"],
    "predict": lambda r, spec: ["predict", r.path, r.path.parent / "img.npy", "--out"],
    "export": lambda r, spec: ["export", r.path, "--out"],
    "package": lambda r, spec: ["package", r.path, "--out"],
    "report": lambda r, spec: ["report", r.path, "--out"],
    "explain": lambda r, spec: ["explain", r.path, "--out"],
    "explore": lambda r, spec: ["explore", "--out"],
    "study": lambda r, spec: ["study", "dense-vs-conv", "--seeds", "1", "--out"],
    "compare": lambda r, spec: ["compare", r.path, "--out"],
    "audit": lambda r, spec: ["audit", "--out"],
    "sweep": lambda r, spec: ["sweep", spec, "--out"],
    "sweep-report": lambda r, spec: ["sweep-report", spec, "--html"],
}


@pytest.mark.parametrize("command", list(COMMANDS_THAT_WRITE))
def test_output_under_a_file_is_refused_before_any_work(command, made, capsys, no_work):
    tmp, _, run = made
    bad = tmp / "afile" / "out.x"  # a file used as a folder
    line = cli_error(capsys, *COMMANDS_THAT_WRITE[command](run, ROOT / "experiments" / "conv-layers-small.toml"), bad)
    assert line == f"fashionlab {command}: error: cannot write {bad}: {tmp / 'afile'} is a file, not a folder"


@pytest.mark.parametrize("command", ["predict", "explore", "report", "compare"])
def test_a_folder_where_a_file_goes_is_refused_before_any_work(command, made, capsys, no_work):
    tmp, _, run = made
    line = cli_error(capsys, *COMMANDS_THAT_WRITE[command](run, None), tmp / "adir")
    assert line == f"fashionlab {command}: error: cannot write {tmp / 'adir'}: it is a folder; expected a file name"


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux's /proc")
@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "/proc/nope"], "cannot write /proc/nope: cannot create the folder /proc/nope"),
    (["explore", "--out", "/proc/eda.html"], "cannot write /proc/eda.html: cannot create a file in /proc"),
    (["predict", "{run}", "{run}/../img.npy", "--out", "/proc/x.csv"],
     "cannot write /proc/x.csv: cannot create a file in /proc"),
])
def test_unwritable_places_are_named_never_a_temporary_file(argv, message, made, capsys, no_work):
    line = cli_error(capsys, *[a.format(run=made[2].path) for a in argv])
    assert message in line and ".part" not in line and "probe" not in line, line


# --------------------------------------------------------------------------- atomic writes

def test_check_writable_tries_for_real_and_leaves_nothing_behind(tmp_path):
    assert check_writable(tmp_path / "new" / "deep" / "x.csv") == tmp_path / "new" / "deep" / "x.csv"
    assert check_writable(tmp_path / "run", folder=True)
    assert list(tmp_path.iterdir()) == []  # the folders it made to try are gone again
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match=r"f: it is a file; expected a folder"):
        check_writable(tmp_path / "f", folder=True)
    with pytest.raises(OutputError, match="File name too long"):
        check_writable(tmp_path / ("x" * 300) / "y")


def test_check_writable_holds_when_another_process_checks_the_same_new_folder(tmp_path, monkeypatch):
    """A sweep's workers start together and check the same experiment folder: one makes it between the
    other's look and its mkdir, or removes it again between the other's mkdir and its probe."""
    real_mkdir, real_mkstemp = Path.mkdir, tempfile.mkstemp
    target = tmp_path / "exp"

    def made_by_the_other_first(self, *args, **kwargs):
        if self == target and not self.exists():
            real_mkdir(self)  # the other process wins the race...
        return real_mkdir(self, *args, **kwargs)  # ...so this one finds it there: FileExistsError

    monkeypatch.setattr(Path, "mkdir", made_by_the_other_first)
    assert check_writable(target, folder=True) and target.is_dir()  # used, and left to the other process
    target.rmdir()
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    removed = []

    def removed_by_the_other_once(*args, **kwargs):
        if not removed:
            removed.append(target.rmdir())  # the other process's check cleans up before this probe
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", removed_by_the_other_once)
    assert check_writable(target, folder=True) and removed and not target.exists()  # made again, then removed
    def removed_by_the_other_every_time(*args, **kwargs):
        target.rmdir()
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", removed_by_the_other_every_time)
    with pytest.raises(OutputError, match="kept disappearing while it was tried"):
        check_writable(target, folder=True)
    assert not target.exists()


def test_atomic_write_errors_name_the_target_never_the_temporary_file(tmp_path, monkeypatch):
    (tmp_path / "adir").mkdir()
    with pytest.raises(OutputError, match=r"adir: it is a folder; expected a file name$"):
        write_text(tmp_path / "adir", "x")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"afile/x: .*afile is a file, not a folder$"):
        write_text(tmp_path / "afile" / "x", "x")
    target = tmp_path / "out.csv"
    with pytest.raises(OutputError) as e:  # the disk fills while the temporary file is written
        with atomic_write(target) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert str(e.value) == f"cannot write {target}: No space left on device"
    assert isinstance(e.value, OSError)  # callers that tolerate a failed write (a read-only cache) still can

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(src), str(dst))
    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OutputError) as e:
        write_text(target, "x")
    assert str(e.value) == f"cannot write {target}: Permission denied"
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="elsewhere"):  # another file's error is its own, unchanged
        with atomic_write(target):
            open(tmp_path / "elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]  # no temporary file left


# --------------------------------------------------------------------------- a closed pipe

def test_evaluate_into_a_pipe_closed_early_exits_quietly(made):
    """`fashionlab evaluate RUN --json | head`: the reader has gone before the first write (buffered stdout,
    as in a terminal session: the flush at exit used to fail with "Exception ignored ... BrokenPipeError")."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "fashionlab", "evaluate", str(made[2].path), "--json",
                             "--data-dir", str(made[1]), "--offline"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the child has imported anything: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err


# --------------------------------------------------------------------------- EMA

def test_ema_decay_warms_up_to_the_setting():
    import torch
    ema = training.EMA(torch.nn.Linear(2, 2), 0.99)
    assert [round(ema.decay_at(t), 4) for t in (0, 1, 10, 80, 10_000)] == [0.1, 0.1818, 0.55, 0.9, 0.99]


def test_ema_on_a_short_run_keeps_the_plain_run_accuracy(tmp_path):
    """9 steps: a plain 0.99 average was still 91% the random initial weights (test accuracy 0.25 here)."""
    settings = dict(model="cnn_small", epochs=1, batch_size=32, lr=3e-3, seed=1, dataset=DS, quiet=True)
    plain = api.train(out=tmp_path / "plain", **settings).metrics["test_accuracy"]
    averaged = api.train(out=tmp_path / "ema", ema=0.99, **settings).metrics["test_accuracy"]
    assert plain > 0.5 and averaged >= plain - 0.05, (plain, averaged)


def test_ema_resumed_mid_epoch_warms_up_as_the_uninterrupted_run(tmp_path):
    class StopMidEpoch(training.Callback):
        def on_step(self, trainer, step, stats):
            if step == 4:
                trainer.stop_signal["signum"] = 15  # as SIGTERM would: checkpoint mid-epoch, then stop

    cfg = config.make_config(model="mlp", epochs=1, batch_size=16, seed=4, ema=0.99)
    with pytest.raises(training.TrainingInterrupted):
        run_mod.train_run(cfg, tmp_path / "cut", dataset=DS, quiet=True, callbacks=[StopMidEpoch()])
    a = run_mod.resume_run(tmp_path / "cut", dataset=DS, quiet=True).metrics
    b = run_mod.train_run(cfg, tmp_path / "whole", dataset=DS, quiet=True).metrics
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"]
