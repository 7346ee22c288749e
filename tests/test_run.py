"""The run folder as one object: status, settings, history, and train-or-reuse."""

from __future__ import annotations

import json

import pytest

from fashionlab import config, run as run_mod, training
from fashionlab.errors import UserError
from conftest import synthetic_dataset

DS = synthetic_dataset(n_train=200, n_test=100)
QUICK = dict(model="cnn_small", epochs=2, batch_size=32, val_split=0.2)


def test_status_history_and_settings_of_a_finished_run(tmp_path):
    folder = run_mod.RunFolder(tmp_path / "r")
    assert folder.status == run_mod.NEW and folder.history == []
    cfg = config.make_config(**QUICK)
    done = run_mod.train_run(cfg, folder.path, dataset=DS, quiet=True)
    assert done.status == run_mod.FINISHED and done.finished
    assert [r["epoch"] for r in done.history] == [1, 2]
    assert done.config == cfg and done.settings_differ(cfg) == []
    assert done.settings_differ(config.make_config(**{**QUICK, "epochs": 3})) == ["epochs"]
    assert set(done.validation_scores()) == {"val_accuracy", "val_loss"}
    assert done.class_names == DS.class_names


def test_evaluate_reproduces_metrics_json(tmp_path):
    done = run_mod.train_run(config.make_config(**QUICK), tmp_path / "r", dataset=DS, quiet=True)
    again = run_mod.evaluate_run(done, DS)
    assert run_mod.matches_record(done, again)
    assert again["confusion_matrix"] == done.metrics["confusion_matrix"]


def test_train_or_reuse_trains_then_reuses_then_refuses_other_settings(tmp_path):
    cfg = config.make_config(**QUICK)
    first, action = run_mod.train_or_reuse(cfg, tmp_path / "r", DS)
    assert action == "trained"
    before = first.weights_path.stat().st_mtime_ns
    again, action = run_mod.train_or_reuse(cfg, tmp_path / "r", DS)
    assert action == "reused" and again.weights_path.stat().st_mtime_ns == before
    with pytest.raises(UserError, match=r"other settings \(epochs: saved 2, asked 3\)"):
        run_mod.train_or_reuse(config.make_config(**{**QUICK, "epochs": 3}), tmp_path / "r", DS)


def test_train_or_reuse_resumes_an_interrupted_run_into_the_uninterrupted_one(tmp_path):
    cfg = config.make_config(**QUICK)

    class StopAfterFirstEpoch(training.Callback):
        def on_epoch_end(self, trainer, row):
            trainer.stop_signal["signum"] = 15  # as SIGTERM would: checkpoint at the epoch's end, then stop

    with pytest.raises(training.TrainingInterrupted):
        run_mod.train_run(cfg, tmp_path / "cut", dataset=DS, quiet=True, callbacks=[StopAfterFirstEpoch()])
    assert run_mod.RunFolder(tmp_path / "cut").status == run_mod.INTERRUPTED
    resumed, action = run_mod.train_or_reuse(cfg, tmp_path / "cut", lambda: DS)
    whole = run_mod.train_run(cfg, tmp_path / "whole", dataset=DS, quiet=True)
    assert action == "resumed" and resumed.status == run_mod.FINISHED
    assert resumed.metrics["test_loss"] == whole.metrics["test_loss"]


def test_a_model_without_metrics_is_not_a_finished_run_and_is_trained_again(tmp_path):
    cfg = config.make_config(**QUICK)
    done = run_mod.train_run(cfg, tmp_path / "r", dataset=DS, quiet=True)
    done.metrics_path.unlink()  # killed between writing the model and its metrics
    assert done.status == run_mod.NEW
    with pytest.raises(UserError, match="not a finished run"):
        done.require_finished()
    _, action = run_mod.train_or_reuse(cfg, done.path, DS)
    assert action == "trained" and done.finished


def test_a_failed_training_leaves_no_empty_folder(tmp_path):
    def broken():
        raise OSError("disk on fire")
    with pytest.raises(OSError):
        run_mod.train_run(config.make_config(**QUICK), tmp_path / "new", dataset=broken, quiet=True)
    assert not (tmp_path / "new").exists()


def test_should_stop_ends_training_and_the_run_still_finishes(tmp_path):
    seen = []

    class Enough(training.Callback):
        def on_step(self, trainer, step, stats):
            seen.append(step)

        def should_stop(self, trainer, row):
            return row["epoch"] == 1

    done = run_mod.train_run(config.make_config(**{**QUICK, "epochs": 5}), tmp_path / "r", dataset=DS, quiet=True,
                             callbacks=[Enough()])
    assert done.finished and done.metrics["epochs_run"] == 1 and len(done.history) == 1
    assert seen == list(range(len(seen))) and len(seen) == 5  # 160 images, batch 32: 5 steps in epoch 1


def test_history_lines_that_are_not_json_name_the_file(tmp_path):
    folder = run_mod.RunFolder(tmp_path)
    folder.history_path.write_text(json.dumps({"epoch": 1}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"history.jsonl: line 2: not valid JSON"):
        folder.history
