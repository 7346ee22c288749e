"""The training loop: it learns, it repeats, it writes the run folder, it stops and resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from fashionlab import config, data, models, predict, run as run_mod, schema, training
from fashionlab.errors import UserError
from fashionlab.device import resolve
from conftest import ROOT, synthetic_dataset

FAST = dict(model="cnn_small", epochs=2, batch_size=32, val_split=0.2, quiet=True)


def run(tmp_path, name="run", dataset=None, **kw):
    opts = {**FAST, **kw}
    quiet = opts.pop("quiet")
    cfg = config.make_config(**opts)
    out = tmp_path / name
    return run_mod.train_run(cfg, out, dataset=dataset or synthetic_dataset(), quiet=quiet).metrics, out


def test_learns_and_writes_the_run_folder(tmp_path):
    metrics, out = run(tmp_path, epochs=4, lr=3e-3)
    assert metrics["test_accuracy"] > 0.9  # the synthetic bars are easy
    for name in ("config.json", "history.jsonl", "metrics.json", "model.safetensors", "model.json"):
        assert (out / name).is_file(), name
    assert not (out / run_mod.CHECKPOINT).exists()
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "per_class", "confusion_matrix", "params", "train_seconds", "epochs_run"):
        assert key in m
    assert m["epochs_run"] == 4 and len(m["confusion_matrix"]) == 10
    assert sum(map(sum, m["confusion_matrix"])) == 100 and m["per_class"]["class3"]["support"] == 10
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and all("val_accuracy" in h for h in history)
    assert not list(out.glob("*.part"))  # no temporary files left behind


def test_same_seed_same_metrics(tmp_path):
    kw = dict(augment={"flip": 0.5, "crop": 2, "erase": 0.3}, model="cnn_dropout", epochs=1)
    a, _ = run(tmp_path, "a", **kw)
    b, _ = run(tmp_path, "b", **kw)
    c, _ = run(tmp_path, "c", seed=1, **kw)
    strip = ("train_seconds", "warmup_seconds", "wall_seconds", "images_per_s")
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    assert a["test_loss"] != c["test_loss"]


def test_checkpoint_round_trip_reproduces_metrics(tmp_path):
    metrics, out = run(tmp_path, model="cnn")
    p = predict.Predictor.from_run(out)
    ds = synthetic_dataset()
    probs = p.probabilities(ds.test_images)
    assert abs(float((probs.argmax(1) == ds.test_labels).mean()) - metrics["test_accuracy"]) < 1e-9
    raw = (out / "model.safetensors").read_bytes()
    assert b"pickle" not in raw[:2000] and raw[8:9] == b"{"  # safetensors: JSON header, no pickle


def test_early_stopping_restores_best(tmp_path):
    # A learning rate this small changes nothing measurable: no epoch beats the first.
    metrics, out = run(tmp_path, epochs=6, lr=1e-12, patience=1, monitor="val_loss")
    assert metrics["epochs_run"] == 2 and metrics["best_epoch"] == 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"batch_size=0: expected an integer >= 1"):
        config.make_config(batch_size=0)
    with pytest.raises(ValueError, match=r"optimizer='rmsprop': expected one of adam, adamw, sgd"):
        config.make_config(optimizer="rmsprop")
    with pytest.raises(ValueError, match="patience .* needs a validation split"):
        config.make_config(patience=2, val_split=0.0)
    with pytest.raises(ValueError, match="unknown recipe 'fastest'; known recipes: .*dense-vs-conv"):
        config.make_config(recipe="fastest")


def test_sharpness_aware_gradients_are_taken_at_the_steepest_nearby_point():
    # loss = 0.5 * sum(a * w^2): gradient a * w, so SAM's gradient is a * (w + rho * g / |g|).
    a = torch.tensor([1.0, 4.0, 0.5])
    w = torch.tensor([0.3, -0.2, 2.0], requires_grad=True)
    frozen = torch.tensor([1.0], requires_grad=True)  # no gradient: left alone
    loss_at = lambda: 0.5 * (a * w * w).sum()
    loss_at().backward()
    g = (a * w).detach()
    training.sharpness_aware_gradients([w, frozen], loss_at, rho=0.1)
    expected = a * (w.detach() + 0.1 * g / g.norm())
    assert torch.allclose(w.grad, expected) and not torch.allclose(w.grad, g)
    assert torch.equal(w.detach(), torch.tensor([0.3, -0.2, 2.0]))  # the weights are put back exactly
    assert frozen.grad is None


def test_sgd_on_a_cpu_is_fused_and_gives_the_per_tensor_kernels_bits():
    """The fused SGD kernel is a speed choice only: on the weights of a FastNet, with both parameter
    groups (decayed and not), Nesterov momentum and a changing learning rate, 20 steps land on the same
    bits as the per-tensor (foreach) kernel runs used before."""
    cfg = config.make_config(model="fast", optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=2.5e-4)
    weights = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = models.build_model("fast")
        opt = training.make_optimizer(model, cfg)
        assert opt.defaults["fused"] is True
        if not fused:  # the same groups and settings on the per-tensor kernel
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, foreach=True)
        g = torch.Generator().manual_seed(1)
        for step in range(20):
            for group in opt.param_groups:
                group["lr"] = 0.05 * (1 + step)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g) if p.requires_grad else None
            opt.step()
        weights[fused] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(weights[True], weights[False]))
    torch.manual_seed(0)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(weights[True], models.build_model("fast").parameters()))


def _sgd_run(cfg, sizes, optimizer_for=None, late_from=0, reload_at=None, steps=6, folder=None
             ) -> list[torch.Tensor]:
    """The weights of a stack of linear layers of the given sizes after `steps` SGD steps on random
    gradients, the last layer given gradients only from step late_from on. optimizer_for(net) replaces
    make_optimizer's; reload_at: at that step the optimiser is saved to a checkpoint in `folder` without
    a buffer for the layer not yet trained (as an earlier version saved it) and loaded into a new one."""
    from dataclasses import asdict
    from fashionlab import checkpoint
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])
    make = optimizer_for or (lambda n: training.make_optimizer(n, cfg))
    opt = make(net)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == reload_at:
            for p in net[-1].parameters():
                del opt.state[p]
            path = folder / "checkpoint.safetensors"
            checkpoint.save_state(path, net, opt, {"rng.cpu": torch.get_rng_state()}, asdict(training.TrainState()))
            opt = make(net)
            checkpoint.load_state(path, net, opt)
        joined = net[:-1] if step < late_from else net
        for p in net.parameters():
            p.grad = None
        for p in joined.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("nesterov", [True, False])
def test_fused_sgd_trains_a_layer_that_joins_late_as_the_per_tensor_kernel_does(nesterov, tmp_path):
    """A layer whose first gradient comes after the others have momentum (unfrozen, or a branch the
    model starts using) is trained, not refused by the fused kernel ("expected Tensor ... but got
    NoneType"), and lands on the bits the per-tensor kernel gives; the same when a checkpoint without a
    buffer for it is loaded on the way. Sizes are multiples of 16 values: on the last values
    of other tensors the fused kernel's vector loop rounds differently from the per-tensor one."""
    cfg = config.make_config(model="mlp", optimizer="sgd", nesterov=nesterov, momentum=0.9, weight_decay=1e-3)
    sizes = (16, 16, 32)

    def per_tensor(net):
        groups = training.make_optimizer(net, cfg).param_groups
        return torch.optim.SGD([{k: v for k, v in g.items() if k != "fused"} for g in groups], foreach=False)

    expected = _sgd_run(cfg, sizes, per_tensor, late_from=3)
    assert _same(_sgd_run(cfg, sizes, late_from=3), expected)
    assert _same(_sgd_run(cfg, sizes, late_from=3, reload_at=2, folder=tmp_path), expected)
    assert not torch.equal(expected[-2], _sgd_run(cfg, sizes, steps=0)[-2])  # the late layer did train


def test_fused_sgd_steps_through_the_same_bits_from_zero_momentum_buffers():
    """The zero buffers make_optimizer starts fused SGD with give the bits of the fused kernel's own
    first step (buffer = gradient), on tensors of any size."""
    cfg = config.make_config(model="mlp", optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=1e-3)

    def without_buffers(net):
        opt = training.make_optimizer(net, cfg)
        assert all("momentum_buffer" in opt.state[p] for p in net.parameters())
        opt.state.clear()
        return opt

    assert _same(_sgd_run(cfg, (5, 7, 3), steps=20), _sgd_run(cfg, (5, 7, 3), without_buffers, steps=20))


def test_sam_starts_where_configured(tmp_path):
    kw = dict(model="fast", optimizer="sgd", lr=0.05, epochs=2, val_split=0.0, augment={"flip": 0.5})
    plain, _ = run(tmp_path, "plain", **kw)
    late, out = run(tmp_path, "late", sam_rho=0.05, sam_start=0.5, **kw)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
            for name in ("plain", "late")}
    assert rows["plain"][0]["train_loss"] == rows["late"][0]["train_loss"]  # the first half: plain SGD
    assert rows["plain"][1]["train_loss"] != rows["late"][1]["train_loss"]  # then SAM's gradients
    assert plain["test_loss"] != late["test_loss"]
    with pytest.raises(ValueError, match=r"sam_start=1.0: expected a fraction of the run in \[0, 1\)"):
        config.make_config(sam_rho=0.05, sam_start=1.0)
    with pytest.raises(ValueError, match=r"sam_rho=-0.1: expected a finite radius >= 0"):
        config.make_config(sam_rho=-0.1)


def test_recipe_values_and_explicit_overrides():
    cfg = config.make_config(recipe="cnn-vs-rnn", epochs=1)
    assert (cfg.model, cfg.batch_size, cfg.val_split, cfg.seed, cfg.epochs) == ("cnn_small", 256, 0.2, 4, 1)
    cfg = config.make_config(recipe="augmented-cnn")
    assert cfg.model_args["resize"] == 32 and cfg.augment == {"flip": 0.5, "rotate": 10.0}


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_schedules(schedule):
    cfg = config.make_config(schedule=schedule, lr=0.1, warmup_epochs=1 if schedule == "cosine" else 0)
    lrs = [training.lr_at(s, 100, cfg, 10) for s in range(100)]
    assert max(lrs) == pytest.approx(0.1) and all(v >= 0 for v in lrs)
    if schedule == "constant":
        assert set(lrs) == {0.1}
    else:
        assert lrs[0] < 0.05 and lrs[-1] < 0.01  # warms up, then anneals
        assert lrs.index(max(lrs)) in ((9,) if schedule == "cosine" else (24,))


def test_device_resolution_never_changes_behaviour():
    """Shuffling and augmentation draw from a CPU generator: the same on every device."""
    g1, g2 = training.epoch_generator(3, 1), training.epoch_generator(3, 1)
    assert torch.equal(torch.randperm(1000, generator=g1), torch.randperm(1000, generator=g2))
    rt = resolve("cpu", "fp32")
    assert rt.precision == "fp32" and rt.channels_last  # NHWC on a CPU at any precision
    assert not resolve("cpu", "fp32", conv_model=False).channels_last
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, mps; got 'tpu'"):
        resolve("tpu")


def _idx_folder(tmp_path, n_train=3000):
    ds = synthetic_dataset(n_train=n_train, n_test=200)
    folder = data.write_idx_folder(tmp_path / "idx", ds)
    return ds, folder, ",".join(ds.class_names)


def test_sigint_saves_and_resume_continues_exactly(tmp_path):
    """A real SIGINT mid-run: exit 130 with a checkpoint; --resume then finishes the very run an
    uninterrupted process would have produced (same metrics to the last digit)."""
    ds, folder, names = _idx_folder(tmp_path, n_train=800)
    common = ["--model", "mlp", "--epochs", "3", "--batch-size", "16", "--val-split", "0.1", "--seed", "5",
              "--augment", "flip=0.5,crop=2", "--data-dir", str(folder), "--class-names", names, "--offline",
              "--threads", "1"]  # the same bits need the same sums: threads chosen from the free cores may differ
    env = {"PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fashionlab", "train", *common]

    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "cut")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    lines = []
    for line in proc.stdout:  # wait for the first finished epoch, then interrupt
        lines.append(line)
        if line.startswith("epoch 1/3:"):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "continue with: fashionlab train --resume" in rest
    assert (tmp_path / "cut" / run_mod.CHECKPOINT).exists() and not (tmp_path / "cut" / "metrics.json").exists()

    saved = schema.checkpoint_state(tmp_path / "cut" / run_mod.CHECKPOINT)
    stopped_at = {"epoch": saved["epoch"], "partial": saved["partial"]}  # where the signal landed
    resumed = subprocess.run([sys.executable, "-m", "fashionlab", "train", "--resume", str(tmp_path / "cut"), "--quiet",
                              "--data-dir", str(folder), "--offline"],
                             capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    whole = subprocess.run([*cmd, "--out", str(tmp_path / "whole"), "--quiet"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=300)
    assert whole.returncode == 0, whole.stderr
    a = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    b = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    # On a mismatch, say where the run stopped and how the two histories part, not just the final loss.
    histories = [(tmp_path / name / "history.jsonl").read_text() for name in ("cut", "whole")]
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"], (
        f"stopped at {stopped_at}; resumed history:\n{histories[0]}uninterrupted:\n{histories[1]}"
        f"cut run's output after the signal:\n{rest}")
    assert a["epochs_run"] == 3 and not (tmp_path / "cut" / run_mod.CHECKPOINT).exists()


@pytest.mark.parametrize("model", ["mlp", "fast"])  # fast: its data-initialised frozen layer must come back too
def test_resume_mid_epoch_in_process(model, tmp_path, monkeypatch):
    """SIGTERM inside an epoch: the checkpoint holds the position in the epoch, and the resumed run
    ends identical to an uninterrupted one."""
    ds = synthetic_dataset(n_train=1000)
    cfg = config.make_config(model=model, epochs=2, batch_size=8, seed=2, augment={"erase": 0.5}, val_split=0.1)
    # Deliver a real SIGTERM at exactly the 30th training batch of epoch 1 (of 113): every batch
    # passes through to_input, so counting its batch-sized calls pins the moment without depending on speed.
    # The untimed warm-up before the first epoch also calls to_input: counting starts after it.
    real_to_input, calls, started = training.evaluate.to_input, [], []

    class Started(training.Callback):
        def on_train_start(self, trainer):
            started.append(True)

    def to_input_then_signal(images, runtime=None):
        if not started:
            return real_to_input(images, runtime)
        calls.append(len(images) == cfg.batch_size)
        if sum(calls) == 30 and calls[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_to_input(images, runtime)

    monkeypatch.setattr(training.evaluate, "to_input", to_input_then_signal)
    with pytest.raises(training.TrainingInterrupted):
        run_mod.train_run(cfg, tmp_path / "cut", dataset=ds, quiet=True, callbacks=[Started()])
    monkeypatch.setattr(training.evaluate, "to_input", real_to_input)
    saved = schema.checkpoint_state(tmp_path / "cut" / run_mod.CHECKPOINT)
    assert saved["epoch"] == 0 and saved["partial"]["step"] == 30
    a = run_mod.resume_run(tmp_path / "cut", quiet=True, dataset=ds).metrics
    b = run_mod.train_run(cfg, tmp_path / "whole", dataset=ds, quiet=True).metrics
    assert a["test_loss"] == b["test_loss"] and a["confusion_matrix"] == b["confusion_matrix"]


def test_finished_run_is_not_overwritten(tmp_path):
    _, out = run(tmp_path, epochs=1)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        run(tmp_path, epochs=1)
    with pytest.raises(UserError, match="already finished"):
        run_mod.resume_run(out, quiet=True, dataset=synthetic_dataset())


@pytest.mark.slow
def test_real_data_training(real_data, tmp_path):
    """A short real run: a small CNN on 10,000 real images for 2 epochs reaches a plausible accuracy,
    and every class has a score."""
    cfg = config.make_config(model="cnn_small", epochs=2, subset=10000, batch_size=128, val_split=0.1)
    metrics = run_mod.train_run(cfg, tmp_path / "real", dataset=real_data, quiet=True).metrics
    assert 0.78 < metrics["test_accuracy"] < 0.95
    assert metrics["num_test"] == 10000
    recalls = {k: v["recall"] for k, v in metrics["per_class"].items()}
    assert min(recalls, key=recalls.get) in {"Shirt", "Pullover", "Coat", "T-shirt/top"}
    assert math.isfinite(metrics["ece"]) and 0 <= metrics["ece"] < 0.1


def test_checkpoint_lays_momentum_out_as_its_channels_last_weight(tmp_path):
    """A checkpoint keeps every tensor contiguous, but a channels_last conv weight is not, and fused SGD
    walks a weight, its gradient and its momentum in memory order: the loaded momentum must take its
    weight's layout, so the next step after a resume is the step the uninterrupted run takes."""
    from dataclasses import asdict
    from fashionlab import checkpoint
    cfg = config.make_config(model="fast", optimizer="sgd", momentum=0.9, nesterov=True, lr=0.1)

    def net_and_optimizer():
        torch.manual_seed(0)
        net = models.build_model("fast").to(memory_format=torch.channels_last)
        return net, training.make_optimizer(net, cfg)

    def one_step(net, opt, seed):
        x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad(set_to_none=True)
        net(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
        opt.step()

    net, opt = net_and_optimizer()
    one_step(net, opt, seed=1)  # the momentum buffers now exist, laid out as their weights
    weight = next(p for p in net.parameters() if p.requires_grad and p.dim() == 4)
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    checkpoint.save_state(tmp_path / "checkpoint.safetensors", net, opt, {"rng.cpu": torch.get_rng_state()},
                          asdict(training.TrainState()))

    loaded_net, loaded_opt = net_and_optimizer()
    checkpoint.load_state(tmp_path / "checkpoint.safetensors", loaded_net, loaded_opt)
    for p, q in zip(net.parameters(), loaded_net.parameters()):
        if p.requires_grad:
            mine, theirs = opt.state[p]["momentum_buffer"], loaded_opt.state[q]["momentum_buffer"]
            assert theirs.stride() == q.stride() and torch.equal(theirs, mine)
    one_step(net, opt, seed=2)
    one_step(loaded_net, loaded_opt, seed=2)
    for (name, p), q in zip(net.named_parameters(), loaded_net.parameters()):
        assert torch.equal(p, q), f"{name} differs after the resumed step"
