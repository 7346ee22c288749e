"""Hard-example epochs (hard_fraction): which images a later epoch trains on, its schedule, its resume."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from fashionlab import config, run as run_mod, training
from fashionlab.config import ConfigError
from fashionlab.hard_examples import HardExamples
from conftest import resumed_and_whole, rewrite_tensors, stopped_run, synthetic_dataset


def test_a_later_epoch_takes_the_highest_losses_in_the_epochs_own_order():
    hard = HardExamples(10, 0.3)
    perm = torch.tensor([9, 3, 0, 7, 1, 8, 2, 6, 4, 5])
    assert torch.equal(hard.begin_epoch(0, perm), perm)  # the first epoch: every image
    hard.end_epoch()
    hard.record(torch.arange(10), torch.tensor([0.1, 2.0, 0.3, 0.2, 5.0, 0.0, 0.4, 3.0, 0.5, 0.6]))
    assert hard.images_in(1) == 3
    assert hard.begin_epoch(1, perm).tolist() == [7, 1, 4]  # losses 3.0, 2.0, 5.0, in perm's order


def test_an_image_not_trained_on_yet_counts_as_the_hardest():
    hard = HardExamples(6, 0.5)
    hard.record(torch.tensor([0, 1, 2, 3]), torch.tensor([9.0, 8.0, 7.0, 6.0]))
    assert sorted(hard.begin_epoch(1, torch.arange(6)).tolist()) == [0, 4, 5]


def test_the_choice_is_fixed_at_the_epochs_start_and_survives_a_checkpoint():
    hard = HardExamples(8, 0.25)
    hard.record(torch.arange(8), torch.arange(8.0))
    first = hard.begin_epoch(2, torch.arange(8)).tolist()
    assert first == [6, 7]
    hard.record(torch.tensor([6, 7]), torch.zeros(2))  # the epoch's own steps change the losses...
    again = HardExamples(8, 0.25)
    again.load(hard.state())  # ...but a run resumed mid-epoch goes on with the same images
    assert again.begin_epoch(2, torch.arange(8)).tolist() == first
    hard.end_epoch()
    assert hard.begin_epoch(3, torch.arange(8)).tolist() == [4, 5]
    assert "hard.chosen" not in HardExamples(8, 0.25).state()


@pytest.mark.parametrize("value", [0, -0.5, 1.5, math.nan])
def test_a_fraction_outside_0_to_1_is_refused(value):
    with pytest.raises(ConfigError, match="hard_fraction"):
        config.make_config(model="mlp", hard_fraction=value)


def _history(folder):
    return [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]


def test_later_epochs_train_on_the_fraction_and_the_schedule_ends_on_their_last_step(tmp_path):
    ds = synthetic_dataset(n_train=400)
    cfg = config.make_config(model="cnn_small", epochs=3, batch_size=32, val_split=0.0, hard_fraction=0.25,
                             schedule="onecycle", lr=0.05, optimizer="sgd")
    steps = []

    class Steps(training.Callback):
        def on_step(self, trainer, step, stats):
            steps.append((trainer.state.step, stats.seen))

        def on_train_end(self, trainer, metrics):
            steps.append(trainer.total_steps)

    run_mod.train_run(cfg, tmp_path / "r", dataset=ds, quiet=True, callbacks=[Steps()])
    *per_step, total = steps
    assert total == 13 + 4 + 4  # 400 images in 32s, then 100 in 32s twice
    seen_at_epoch_end = [seen for step, seen in per_step if step in (13, 17, 21)]
    assert seen_at_epoch_end == [400, 100, 100]
    history = _history(tmp_path / "r")
    # The one-cycle decay spans the shorter epochs: its last step is the run's (a schedule counted in
    # full epochs would still be at a third of its peak there).
    assert history[-1]["lr"] == training.lr_at(total - 1, total, cfg, 13) < 0.01 * cfg.lr


def test_a_run_stopped_inside_a_hard_epoch_resumes_into_the_uninterrupted_one(tmp_path):
    # The fast model with flips and its stem cache, which the resumed run recomputes as it was.
    cfg = config.make_config(model="fast", epochs=3, batch_size=32, val_split=0.0, hard_fraction=0.5, seed=3,
                             augment={"flip": 0.5})
    a, b = resumed_and_whole(cfg, tmp_path, synthetic_dataset(n_train=400), at_step=15)  # epoch 2's third step
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_the_whole_fraction_is_the_plain_run(tmp_path):
    ds = synthetic_dataset(n_train=300)
    kw = dict(model="cnn_small", epochs=2, batch_size=32, val_split=0.0, seed=1)
    a = run_mod.train_run(config.make_config(**kw), tmp_path / "a", dataset=ds, quiet=True).metrics
    b = run_mod.train_run(config.make_config(hard_fraction=1.0, **kw), tmp_path / "b", dataset=ds, quiet=True).metrics
    assert a["test_loss"] == b["test_loss"]


def _cut_run(tmp_path, ds):
    """A hard-example run stopped inside its second epoch; returns its checkpoint's path."""
    cfg = config.make_config(model="cnn_small", epochs=2, batch_size=32, val_split=0.0, hard_fraction=0.5)
    return stopped_run(cfg, tmp_path / "cut", ds, at_step=15) / run_mod.CHECKPOINT


@pytest.mark.parametrize("change, message", [
    (lambda t: [t.pop("extra.hard.loss"), t.pop("extra.hard.chosen")], "extra.hard.* are missing"),
    (lambda t: t.update({"extra.hard.loss": t["extra.hard.loss"][:-1]}), "bool of the shape of extra.hard.loss"),
    (lambda t: t.update({"extra.hard.loss": t["extra.hard.loss"][:-1], "extra.hard.chosen": t["extra.hard.chosen"][:-1]}),
     "holds 399 losses; this run trains on 400 images"),
])
def test_a_checkpoint_without_its_losses_or_with_others_is_refused_by_name(change, message, tmp_path):
    from fashionlab.schema import RunError
    ds = synthetic_dataset(n_train=400)
    path = _cut_run(tmp_path, ds)
    rewrite_tensors(path, lambda tensors, meta: change(tensors))
    with pytest.raises(RunError, match=re.escape(message)):
        run_mod.resume_run(tmp_path / "cut", dataset=ds, quiet=True)
