"""Experiment tracking: runs logged to TensorBoard and MLflow, read back with their own readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import fashionlab as fl
from conftest import run_cli, synthetic_dataset
from fashionlab import studies, training, tracking
from fashionlab.config import settings_of
from fashionlab.errors import UserError
from sweep_support import free_port, tiny_spec, write_idx_dataset

DS = synthetic_dataset(n_train=200, n_test=100)
QUICK = dict(model="mlp", epochs=2, batch_size=64, precision="fp32", quiet=True)
EPOCH_TAGS = {"loss/train": "train_loss", "loss/val": "val_loss", "accuracy/train": "train_accuracy",
              "accuracy/val": "val_accuracy", "lr": "lr", "speed/images_per_s": "images_per_s"}


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store shared by the tests that name a URI (each uses its own experiment)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'shared.db'}"


def events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0}).Reload()


def hparams_of(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: (v.string_value if v.HasField("string_value") else v.number_value) for k, v in start.hparams.items()}
    return {"hparams": values, "metrics": [m.name.tag for m in experiment.metric_infos]}


def mlflow_runs(uri: str, experiment: str):
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def assert_mlflow_run_matches(client, run, folder: fl.Run) -> None:
    """Params, per-epoch metrics with their steps, final metrics and the folder's files, against the run folder."""
    assert run.info.status == "FINISHED"
    assert run.data.params == {k: v if isinstance(v, str) else json.dumps(v)
                               for k, v in settings_of(folder.record).items()}
    history = folder.history
    for name, key in (("train_loss", "train_loss"), ("val_accuracy", "val_accuracy"), ("lr", "lr"),
                      ("images_per_s", "images_per_s")):
        logged = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in logged] == [(r["epoch"], pytest.approx(r[key])) for r in history], name
    assert run.data.metrics["test_accuracy"] == pytest.approx(folder.metrics["test_accuracy"])
    assert run.data.metrics["test_loss"] == pytest.approx(folder.metrics["test_loss"])
    files = {p.relative_to(folder.path).as_posix() for p in folder.path.rglob("*") if p.is_file()}
    assert {"config.json", "history.jsonl", "metrics.json", "model.safetensors", "model.json"} <= files
    assert artifact_paths(client, run.info.run_id) == files | {"figures/curves.png", "figures/confusion_matrix.png"}


# --------------------------------------------------------------------------- TensorBoard

def test_tensorboard_holds_epochs_images_and_hparams_and_changes_nothing(tmp_path):
    run = fl.train(out=tmp_path / "runs" / "r", dataset=DS, track="tensorboard", **QUICK)
    acc = events(tmp_path / "runs" / "tensorboard" / "r")  # a log folder beside the runs, one subfolder per run
    for tag, key in EPOCH_TAGS.items():
        expected = [(r["epoch"], pytest.approx(r[key])) for r in run.history]
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == expected, tag
    assert [e.value for e in acc.Scalars("test/accuracy")] == [pytest.approx(run.metrics["test_accuracy"])]
    for tag in ("test/confusion_matrix", "curves"):
        (image,) = acc.Images(tag)
        assert image.step == 2 and image.width > 300 and image.encoded_image_string.startswith(b"\x89PNG")
    hp = hparams_of(acc)
    assert hp["hparams"]["model"] == "mlp" and hp["hparams"]["lr"] == pytest.approx(0.001)
    assert hp["hparams"]["epochs"] == 2 and "patience" not in hp["hparams"]  # unset settings are left out
    assert {"test/accuracy", "test/loss", "accuracy/val"} <= set(hp["metrics"])

    # Tracking is no training setting: config.json does not know it, and the numbers are the untracked run's.
    assert "track" not in json.loads(run.config_path.read_text())
    plain = fl.train(out=tmp_path / "plain", dataset=DS, **QUICK)
    assert plain.metrics["test_loss"] == run.metrics["test_loss"]
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in run.history]
    assert plain.settings_differ(run.config) == []


# --------------------------------------------------------------------------- MLflow

def test_mlflow_default_store_is_sqlite_beside_the_runs(tmp_path):
    run = fl.train(out=tmp_path / "runs" / "r", dataset=DS, track=["mlflow"], **QUICK)
    db = tmp_path / "runs" / "mlflow.db"
    assert db.is_file() and (tmp_path / "runs" / "mlartifacts").is_dir()
    client, (logged,) = mlflow_runs(f"sqlite:///{db}", "fashionlab")
    assert logged.info.run_name == "r" and logged.data.tags["fashionlab.run_dir"] == str(run.path.resolve())
    assert_mlflow_run_matches(client, logged, run)
    copied = Path(client.download_artifacts(logged.info.run_id, "metrics.json", str(tmp_path)))
    assert copied.read_bytes() == run.metrics_path.read_bytes()


def test_mlflow_uri_comes_from_the_environment_when_not_given(tmp_path, monkeypatch, store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    fl.train(out="env-run", dataset=DS, track="mlflow", **{**QUICK, "epochs": 1})
    assert not (tmp_path / "mlflow.db").exists()
    _, runs = mlflow_runs(store, "fashionlab")
    (logged,) = [r for r in runs if r.info.run_name == "env-run"]
    # A SQLite store keeps its artifacts beside the database, not in ./mlruns wherever the command ran.
    database = Path(store[len("sqlite:///"):])
    assert logged.info.artifact_uri.startswith((database.parent / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()


def test_a_resumed_run_is_logged_whole_and_the_cut_one_ends_killed(tmp_path, store):
    class StopAfterFirstEpoch(training.Callback):
        def on_epoch_end(self, trainer, row):
            trainer.stop_signal["signum"] = signal.SIGTERM  # as SIGTERM would: checkpoint, then stop

    out, track = tmp_path / "runs" / "cut", ["tensorboard", f"mlflow={store}"]
    with pytest.raises(training.TrainingInterrupted):
        fl.train(out=out, dataset=DS, track=track, callbacks=[StopAfterFirstEpoch()], **{**QUICK, "epochs": 3})
    run = fl.Run(out).resume(quiet=True, dataset=DS, track=track)
    client, runs = mlflow_runs(store, "fashionlab")
    cut, whole = [r for r in runs if r.info.run_name == "cut"]
    assert cut.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(cut.info.run_id, "train_loss")] == [1]
    assert_mlflow_run_matches(client, whole, run)
    # TensorBoard reads the folder as one run: the resumed writer supersedes the first one's epochs.
    acc = events(tmp_path / "runs" / "tensorboard" / "cut")
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [
        (r["epoch"], pytest.approx(r["train_loss"])) for r in run.history]


def test_mlflow_tracking_server_over_http(tmp_path):
    """A real `mlflow server` on 127.0.0.1: the team set-up, with artifacts uploaded through the server."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner processes
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server-artifacts")]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert server.poll() is None, f"mlflow server exited: {server.stderr.read().decode()[-2000:]}"
                assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
                time.sleep(0.5)
        run = fl.train(out=tmp_path / "runs" / "served", dataset=DS, track=f"mlflow={uri}", **QUICK)
        client, (logged,) = mlflow_runs(uri, "fashionlab")
        assert_mlflow_run_matches(client, logged, run)
        assert list((tmp_path / "server-artifacts").rglob("model.safetensors"))  # stored by the server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# --------------------------------------------------------------------------- studies and sweeps

def test_a_study_logs_every_run_grouped_and_a_reused_run_once(tmp_path, store):
    quick = {"epochs": 1, "batch_size": 64}
    studies.run_study("dense-vs-conv", tmp_path, seeds=1, dataset=DS, overrides=quick, log=lambda m: None,
                      run_reports=False)  # seed 0 trained without tracking
    track = ["tensorboard", f"mlflow={store}"]
    res = fl.study("dense-vs-conv", seeds=2, out=tmp_path, dataset=DS, log=lambda m: None, run_reports=False,
                   track=track, **quick)
    assert len(res.reused) == 2 and len(res.trained) == 2
    names = sorted(f"{m}/seed-{s}" for m in ("cnn", "mlp") for s in (0, 1))
    client, runs = mlflow_runs(store, "study dense-vs-conv")  # one experiment per study
    assert sorted(r.info.run_name for r in runs) == names
    for r in runs:  # the reused runs come from their files, the trained ones from training's events
        assert_mlflow_run_matches(client, r, fl.Run(tmp_path / r.info.run_name))
    logdir = tmp_path / "tensorboard"  # one subfolder per run under the study's log folder
    assert sorted(p.parent.relative_to(logdir).as_posix() for p in logdir.rglob("events.out.tfevents.*")) == names
    assert len(events(logdir / "mlp" / "seed-0").Scalars("loss/train")) == 1

    again = fl.study("dense-vs-conv", seeds=2, out=tmp_path, dataset=DS, log=lambda m: None, run_reports=False,
                     track=track, **quick)
    assert len(again.reused) == 4
    assert len(mlflow_runs(store, "study dense-vs-conv")[1]) == 4  # logged once, not once per invocation
    assert len(list(logdir.rglob("events.out.tfevents.*"))) == 4


def test_a_sweep_logs_every_trial_in_its_experiment(tmp_path, store):
    spec = tiny_spec(tmp_path, name="tracked", seeds=1, epochs=1, filters="[4]")
    result = fl.sweep(spec, quiet=True, report=False, track=["tensorboard", f"mlflow={store}"])
    assert result.tally.done == 2
    keys = sorted(p.name for p in (tmp_path / "exp" / "runs").iterdir())
    client, runs = mlflow_runs(store, "sweep tracked")
    assert sorted(r.info.run_name for r in runs) == keys
    for r in runs:
        assert_mlflow_run_matches(client, r, fl.Run(tmp_path / "exp" / "runs" / r.info.run_name))
    assert sorted(p.parent.name for p in (tmp_path / "exp" / "tensorboard").rglob("events.out.tfevents.*")) == keys


# --------------------------------------------------------------------------- the command line and errors

def test_cli_track_flag_on_train_study_and_sweep(tmp_path, store):
    data_dir = write_idx_dataset(tmp_path / "data", DS)
    proc = run_cli("train", "--model", "mlp", "--epochs", "1", "--batch-size", "64", "--precision", "fp32", "--quiet",
                   "--no-report", "--data-dir", str(data_dir), "--class-names", ",".join(DS.class_names),
                   "--out", str(tmp_path / "cli-run"), "--track", f"tensorboard={tmp_path / 'tb'}",
                   "--track", f"mlflow={store}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert events(tmp_path / "tb" / "cli-run").Scalars("test/accuracy")
    assert "cli-run" in {r.info.run_name for r in mlflow_runs(store, "fashionlab")[1]}
    from fashionlab.cli import build_parser
    for command in (["study", "zoo"], ["sweep", "spec.toml"]):
        args = build_parser().parse_args([*command, "--track", "tensorboard,mlflow=URI", "--track", "mlflow"])
        assert args.track == ["tensorboard,mlflow=URI", "mlflow"]


def test_trackers_are_named_alone_with_a_target_comma_separated_or_in_a_list():
    assert tracking.parse_track(None) == []
    assert tracking.parse_track(" tensorboard , mlflow=http://h:5000") == [("tensorboard", None),
                                                                          ("mlflow", "http://h:5000")]
    assert tracking.parse_track(["tensorboard=runs/tb", "mlflow"]) == [("tensorboard", "runs/tb"), ("mlflow", None)]


def test_cli_errors_are_one_line_before_training(tmp_path):
    proc = run_cli("train", "--model", "mlp", "--out", str(tmp_path / "r"), "--track", "tensorbored", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("fashionlab train: error: unknown tracker 'tensorbored' (did you mean "
                                   "'tensorboard'?): expected tensorboard[=DIR], mlflow[=URI]")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("track, message", [
    ("wandb", r"unknown tracker 'wandb': expected tensorboard\[=DIR\], mlflow\[=URI\]"),
    ("mlflow=", r"'mlflow=': expected mlflow=URI or mlflow alone"),
    ("tensorboard,tensorboard=x", r"tracker 'tensorboard' is given twice"),
    ([3], r"track=3: expected a tracker name"),
])
def test_bad_tracker_names_are_refused(tmp_path, track, message):
    with pytest.raises(tracking.TrackingError, match=message):
        fl.train(out=tmp_path / "r", dataset=DS, track=track, **QUICK)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name, module", [("mlflow", "mlflow"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what Python does for a package that is not installed
    with pytest.raises(UserError, match=rf"^{name}: the {name} package is not installed: pip install "
                                        r"'fashionlab\[track\]'$"):
        fl.train(out=tmp_path / "r", dataset=DS, track=name, **QUICK)
    assert not (tmp_path / "r").exists()


def test_an_unreachable_server_fails_fast_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=rf"^mlflow: cannot use the tracking store at {uri}: the server "
                                                     r"cannot be reached \(Connection refused\)$"):
        fl.study("dense-vs-conv", seeds=1, out=tmp_path / "s", dataset=DS, track=f"mlflow={uri}", epochs=1)
    assert time.monotonic() - started < 30
    assert not list((tmp_path / "s").rglob("config.json"))


def test_an_unwritable_log_folder_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match=r"cannot write .*file/tb: .*file is a file, not a folder"):
        fl.train(out=tmp_path / "r", dataset=DS, track=f"tensorboard={tmp_path / 'file' / 'tb'}", **QUICK)
    assert not (tmp_path / "r").exists()


def test_a_tracker_failing_mid_run_warns_and_training_goes_on(tmp_path, store):
    class BreakTheLogDir(training.Callback):
        def on_train_start(self, trainer):  # the log folder disappears for a file: every write fails
            import shutil
            shutil.rmtree(tmp_path / "tb", ignore_errors=True)
            (tmp_path / "tb").write_text("")

    with pytest.warns(tracking.TrackingWarning, match="tensorboard tracking of .* stopped"):
        run = fl.train(out=tmp_path / "r", dataset=DS, callbacks=[BreakTheLogDir()],
                       track=f"tensorboard={tmp_path / 'tb'}", **QUICK)
    assert run.finished
