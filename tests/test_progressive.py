"""Progressive resizing (resize_from, resize_until): the schedule of sides, the resize, which models take
it, and a run that trains at the scheduled sides, skips the stem cache and resumes exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import resumed_and_whole, synthetic_dataset
from fashionlab import config, models, progressive, run as run_mod, training
from fashionlab.config import ConfigError


@pytest.mark.parametrize("epochs, start, until", [(48, 20, 0.75), (28, 20, 0.75), (10, 9, 0.5), (3, 21, 1.0),
                                                  (2, 20, 0.75), (5, 8, 0.01)])
def test_sides_start_small_grow_evenly_and_end_at_full_size(epochs, start, until):
    sides = progressive.sides(epochs, start, until)
    end = progressive.full_from(epochs, until)
    assert sides[0] == start and sides[-1] == progressive.FULL == 28
    assert all(a <= b for a, b in zip(sides, sides[1:]))  # never shrinks
    assert all(s % 2 == 0 for s in sides[1:])  # few shapes: each costs its kernels once
    assert sides[end:] == [28] * (epochs - end)  # by full_from at the latest (rounding may reach it sooner)
    assert len(set(sides)) <= (28 - start) // 2 + 2


def test_the_schedule_of_the_fp32_best_rule():
    sides = progressive.sides(48, 20, 0.75)
    assert sides[:5] == [20] * 5 and sides.index(28) == 32  # 26.7 rounds to 28: full size from epoch 33
    assert progressive.full_from(48, 0.75) == 36  # the linear growth would reach 28 at epoch 37


def test_off_or_a_single_epoch_trains_at_full_size():
    assert progressive.sides(6, 0, 0.75) == [28] * 6
    assert progressive.sides(1, 20, 0.75) == [28]  # the only epoch is the last: the size it is evaluated at


def test_resize_keeps_a_flat_image_flat_and_averages_a_fine_pattern():
    flat = torch.full((3, 1, 28, 28), 0.25)
    assert torch.allclose(progressive.resize(flat, 20), torch.full((3, 1, 20, 20), 0.25))
    stripes = torch.zeros(1, 1, 28, 28)
    stripes[..., ::2] = 1.0  # one-pixel stripes: antialiasing averages them, dropping columns would not
    small = progressive.resize(stripes, 14)
    inner = small[..., 1:-1]  # the edge columns average over the border's fewer pixels
    assert small.shape == (1, 1, 14, 14) and torch.allclose(inner, torch.full_like(inner, 0.5), atol=0.02)


@pytest.mark.parametrize("key, value, words", [
    ("resize_from", 28, "0 (off) or an integer from 8 to 27"), ("resize_from", 7, "from 8 to 27"),
    ("resize_from", 20.0, "integer"), ("resize_from", True, "integer"), ("resize_until", 0, "fraction in (0, 1]"),
    ("resize_until", 1.5, "fraction in (0, 1]")])
def test_bad_settings_are_refused_by_name(key, value, words):
    with pytest.raises(ConfigError, match=key) as e:
        config.make_config(model="fast", **{key: value})
    assert words in str(e.value)


@pytest.mark.parametrize("model", ["mlp", "cnn_small", "lstm"])
def test_a_model_that_takes_only_28_pixels_is_refused_by_name_before_any_data_is_read(model, tmp_path):
    with pytest.raises(ConfigError, match=rf"resize_from=20: model '{model}' does not take 20x20 images "
                                          r"\(cannot classify images of shape \[N, 1, 20, 20\]"):
        config.make_config(model=model, epochs=2, resize_from=20)


@pytest.mark.parametrize("model, args", [("fast", {}), ("best_slim", {}), ("resnet8", {}),
                                         ("best", {"widths": [16, 32, 64]})])
def test_nets_that_pool_over_the_image_take_small_sides(model, args):
    for side in (8, 20, 27):
        config.make_config(model=model, model_args=args, resize_from=side)  # raises if not
        net = models.build_model(model, **args).eval()
        with torch.no_grad():
            assert net(torch.zeros(2, 1, side, side)).shape == (2, 10)


class _Sides(training.Callback):
    """The side of every image batch the model's training steps forward, per epoch."""

    def __init__(self):
        self.seen: dict[int, set[int]] = {}
        self.epoch = 0

    def on_train_start(self, trainer):  # after the warm-up: only training steps are recorded
        trainer.model.register_forward_pre_hook(
            lambda module, args: self.seen.setdefault(self.epoch, set()).add(args[0].shape[-1]))

    def on_epoch_start(self, trainer, epoch, first_step):
        self.epoch = epoch


def test_a_run_trains_each_epoch_at_its_side_and_is_evaluated_at_full_size(tmp_path, capsys):
    sides = _Sides()
    cfg = config.make_config(model="fast", epochs=4, batch_size=64, val_split=0.0, resize_from=16, resize_until=0.75,
                             augment={"flip": 0.5})
    metrics = run_mod.train_run(cfg, tmp_path / "run", dataset=synthetic_dataset(n_train=300), callbacks=[sides],
                                calibrate=False).metrics
    assert sides.seen == {e: {s} for e, s in enumerate(progressive.sides(4, 16, 0.75))}
    assert sides.seen == {0: {16}, 1: {20}, 2: {24}, 3: {28}}
    out = capsys.readouterr().out
    assert "frozen stem: not cached, progressive resizing changes the image before the stem" in out
    assert "training images 16 px at epoch 1, 28 px from epoch 4" in out
    assert metrics["test_accuracy"] > 0.25  # learnt (chance: 0.1), scored at 28 pixels like the last epoch


def test_the_warm_up_runs_every_side_the_run_will_train_at(tmp_path, monkeypatch):
    warmed: list[tuple[int, int]] = []
    step = training.Trainer._warm_up_step
    monkeypatch.setattr(training.Trainer, "_warm_up_step",
                        lambda self, idx, side: (warmed.append((len(idx), side)), step(self, idx, side)))
    cfg = config.make_config(model="fast", epochs=5, batch_size=64, val_split=0.0, resize_from=20, resize_until=0.75)
    run_mod.train_run(cfg, tmp_path / "run", dataset=synthetic_dataset(n_train=300), quiet=True)
    assert {side for _, side in warmed} == set(progressive.sides(5, 20, 0.75))
    assert {n for n, _ in warmed} == {64, 300 % 64}  # each side at both batch sizes an epoch uses


def test_a_resizing_run_stopped_midway_resumes_into_the_uninterrupted_one(tmp_path):
    cfg = config.make_config(model="best_slim", epochs=3, batch_size=64, val_split=0.0, resize_from=20,
                             augment={"flip": 0.5, "crop": 2}, seed=2, threads=1)  # one sum order for both runs
    a, b = resumed_and_whole(cfg, tmp_path, synthetic_dataset(n_train=300), at_step=7)  # epoch 2's third step
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_resizing_changes_the_run_and_off_is_the_plain_run(tmp_path):
    ds = synthetic_dataset(n_train=300)
    kw = dict(model="fast", epochs=2, batch_size=64, val_split=0.0, seed=1, augment={"flip": 0.5}, threads=1)
    plain = run_mod.train_run(config.make_config(**kw), tmp_path / "a", dataset=ds, quiet=True).metrics
    off = run_mod.train_run(config.make_config(resize_from=0, **kw), tmp_path / "b", dataset=ds, quiet=True).metrics
    on = run_mod.train_run(config.make_config(resize_from=20, **kw), tmp_path / "c", dataset=ds, quiet=True).metrics
    assert off["test_loss"] == plain["test_loss"] and on["test_loss"] != plain["test_loss"]


def test_compiling_allows_a_graph_per_side_and_batch_size():
    from fashionlab import device
    cfg = config.make_config(model="fast", epochs=48, resize_from=10, compile=True)
    with torch._dynamo.config.patch(recompile_limit=8):  # put back afterwards: the limit is process-wide
        training._compiled(lambda x: x, cfg, device.resolve("cpu", "fp32", conv_model=True))
        assert torch._dynamo.config.recompile_limit >= 3 * len(set(progressive.sides(48, 10, 0.75))) == 30
