"""The training loop, as a few named steps over one state object.

    trainer = Trainer.set_up(cfg, folder, dataset)   # runtime, data split, model, optimiser
    trainer.start() or trainer.restore()             # config.json, or the checkpoint of a stopped run
    for each epoch: train_epoch -> validate -> end_epoch (history, events, early stopping, checkpoint)
    trainer.finish()                                 # test metrics, model.safetensors, metrics.json

The whole training set lives on the device as one uint8 tensor; a batch is an index slice,
converted to floats and augmented as a whole. Shuffling and augmentation draw from a generator
seeded by (seed, epoch), on the CPU for a CPU run and on the GPU for a CUDA run (no step waits for
the host), so a run is repeatable on the same device and precision, and a run stopped mid-epoch
resumes into exactly the run it would have been. Nothing inside an epoch reads a value back from
a GPU: the running sums stay on the device until the epoch ends.

Progress bars, benchmarks and trackers plug in as `Callback`s (on_epoch_end, should_stop, ...).
The run folder is written through a `run.RunFolder` handed in by run.py, the module that owns
the folder's layout; this module never imports it, so data flows one way (training -> run).
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, checkpoint, data as data_mod, device as device_mod, evaluate, models, progressive
from .augment import Augment
from .config import ConfigError, TrainConfig
from .errors import TrainingInterrupted
from .hard_examples import HardExamples
from .stem_cache import StemCache

INIT_IMAGES = 5000  # training images a model's data-dependent initialisation sees
threads_log = logging.getLogger("fashionlab.threads")  # pinned threads beyond the free cores


class Callback:
    """Training events. Subclass and override what you need; every method is optional.

    on_step runs after every optimiser step, so it must not force a device sync unless it means
    to (the progress bar reads the running loss every 20 steps). The others run once per epoch,
    outside the timed part of training.
    """

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_epoch_start(self, trainer: "Trainer", epoch: int, first_step: int) -> None: ...

    def on_step(self, trainer: "Trainer", step: int, epoch_stats: "EpochStats") -> None: ...

    def on_epoch_end(self, trainer: "Trainer", row: dict[str, Any]) -> None: ...

    def should_stop(self, trainer: "Trainer", row: dict[str, Any]) -> bool:
        return False

    def on_interrupt(self, trainer: "Trainer") -> None:
        """A signal stopped training mid-epoch; a checkpoint has been saved."""

    def on_train_end(self, trainer: "Trainer", metrics: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- state

@dataclass
class TrainState:
    """Everything about progress that a checkpoint stores (as JSON) and a resumed run restores."""
    epoch: int = 0  # epochs finished
    step: int = 0  # optimiser steps taken
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None  # best monitored validation value so far
    best_epoch: int | None = None
    since_best: int = 0
    train_seconds: float = 0.0
    partial: dict[str, Any] | None = None  # a mid-epoch stop: where in the epoch, and its running sums


@dataclass
class EpochStats:
    """Running sums of one epoch, kept on the device (read only when an epoch ends or a bar refreshes)."""
    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int = 0
    seconds: float = 0.0  # time already spent in this epoch (before a resume, or the data init)


@dataclass
class Split:
    """The training and validation images as tensors: training on the device, validation on the CPU."""
    X: torch.Tensor  # uint8 (N, 1, 28, 28)
    Y: torch.Tensor
    Xv: torch.Tensor
    Yv: torch.Tensor

    @property
    def n(self) -> int:
        return len(self.Y)

    @property
    def n_val(self) -> int:
        return len(self.Yv)


def split_data(cfg: TrainConfig, ds: data_mod.Dataset, device: torch.device) -> Split:
    """The training images left after `exclude`, a stratified subset of them, then a stratified validation
    split, all seeded by cfg.seed."""
    pool = kept_indices(cfg, len(ds.train_labels))
    if cfg.subset:
        pool = pool[data_mod.stratified_subset(ds.train_labels[pool], min(cfg.subset, len(pool)), cfg.seed)]
    tr_rel, va_rel = data_mod.stratified_split(ds.train_labels[pool], cfg.val_split, cfg.seed)
    tr_idx, va_idx = pool[tr_rel], pool[va_rel]
    check_split(cfg, len(pool), len(tr_idx), len(va_idx))
    return Split(torch.from_numpy(ds.train_images[tr_idx]).unsqueeze(1).to(device),
                 torch.from_numpy(ds.train_labels[tr_idx]).to(device),
                 torch.from_numpy(ds.train_images[va_idx]), torch.from_numpy(ds.train_labels[va_idx]))


def kept_indices(cfg: TrainConfig, n_images: int) -> np.ndarray:
    """The training images cfg trains on before any subset or split: all of them but those `exclude` names
    (each of which must be one of the n_images: an index beyond them means another, larger dataset)."""
    pool = np.arange(n_images)
    if not cfg.exclude:
        return pool
    if cfg.exclude[-1] >= n_images:
        raise ConfigError(f"exclude: image index {cfg.exclude[-1]} is beyond this dataset's {n_images:,} training "
                          f"images; the list was made for another dataset")
    keep = np.ones(n_images, dtype=bool)
    keep[np.asarray(cfg.exclude, dtype=np.int64)] = False
    return pool[keep]


def check_split(cfg: TrainConfig, pool: int, n_train: int, n_val: int) -> None:
    """Both parts of the split hold images: on a small dataset or subset, a val_split near 1 leaves
    nothing to train on, and one near 0 leaves a validation set of no images (rounded per class)."""
    where = (f"{pool:,} training images" + (f" (subset={cfg.subset})" if cfg.subset else "")
             + (f" left after excluding {len(cfg.exclude):,}" if cfg.exclude else ""))
    if n_train == 0:
        raise ConfigError(f"val_split={cfg.val_split} leaves none of the {where} to train on; "
                          "lower val_split")
    if cfg.val_split > 0 and n_val == 0:
        raise ConfigError(f"val_split={cfg.val_split} gives no validation images from the {where} "
                          "(rounded per class); raise val_split, or set 0 for no validation")


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator an epoch's shuffle and augmentation draw from (device: Runtime.random_device)."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + epoch)


# --------------------------------------------------------------------------- the trainer

@dataclass
class Trainer:
    cfg: TrainConfig
    folder: Any  # run.RunFolder: where config, history, checkpoints, model and metrics go
    dataset: data_mod.Dataset
    runtime: device_mod.Runtime
    split: Split
    model_args: dict[str, Any]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: "EMA | None"
    step_model: Callable  # the model's forward as the training step calls it (compiled when asked)
    init_seconds: float  # data-dependent initialisation: counted as part of the first epoch
    augment: Augment
    callbacks: Sequence[Callback] = ()
    log: Callable[[str], None] = lambda message: None
    state: TrainState = field(default_factory=TrainState)
    best_weights: dict[str, torch.Tensor] | None = None
    resume_gen_state: torch.Tensor | None = None  # the epoch generator's state at a mid-epoch stop
    resume_stem: dict[str, torch.Tensor] = field(default_factory=dict)  # the stem cache's checkpointed state
    cache: StemCache | None = None
    hard: HardExamples | None = None  # with hard_fraction < 1: each image's last loss, and the epoch's choice
    from_stem: Callable | None = None
    stop_signal: dict[str, int] = field(default_factory=dict)
    wall_start: float = field(default_factory=time.perf_counter)
    warmup_seconds: float = 0.0  # the untimed warm-up before the first step (warm_up)

    # ---- set-up

    @classmethod
    def set_up(cls, cfg: TrainConfig, folder, dataset: data_mod.Dataset, callbacks: Sequence[Callback] = (),
               log: Callable[[str], None] | None = None, resume: bool = False) -> "Trainer":
        """Runtime, data split, model (seeded, initialised from data unless resuming) and optimiser."""
        wall_start = time.perf_counter()
        margs = dict(cfg.model_args)
        if dataset.num_classes != 10:
            margs.setdefault("num_classes", dataset.num_classes)
        rt = device_mod.resolve(cfg.device, cfg.precision, conv_model=models.MODELS[cfg.model].channels_last)
        if rt.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the fastest kernels for the few shapes a run uses
        split = split_data(cfg, dataset, rt.device)
        model, init_seconds = build_model(cfg, margs, split, rt, initialise=not resume)
        optimizer = make_optimizer(model, cfg)
        return cls(cfg=cfg, folder=folder, dataset=dataset, runtime=rt, split=split, model_args=margs, model=model,
                   optimizer=optimizer, ema=EMA(model, cfg.ema) if cfg.ema else None,
                   step_model=_compiled(model, cfg, rt), init_seconds=init_seconds,
                   augment=Augment.from_dict(cfg.augment), callbacks=callbacks,
                   log=log or (lambda message: None), wall_start=wall_start,
                   hard=HardExamples(split.n, cfg.hard_fraction, rt.device) if cfg.hard_fraction < 1 else None)

    @property
    def steps_per_epoch(self) -> int:
        """The steps of a pass over every training image (the unit of warmup_epochs)."""
        return math.ceil(self.split.n / self.cfg.batch_size)

    def images_in(self, epoch: int) -> int:
        """How many images epoch (0-based) trains on: all, or after the first the hard fraction."""
        return self.hard.images_in(epoch) if self.hard else self.split.n

    def steps_in(self, epoch: int) -> int:
        return math.ceil(self.images_in(epoch) / self.cfg.batch_size)

    def side_in(self, epoch: int) -> int:
        """The side, in pixels, of the images epoch (0-based) trains on (progressive resizing)."""
        return progressive.side_at(epoch, self.cfg.epochs, self.cfg.resize_from, self.cfg.resize_until)

    @property
    def total_steps(self) -> int:
        return sum(self.steps_in(e) for e in range(self.cfg.epochs))

    @property
    def opt_params(self) -> list[torch.Tensor]:
        """What the optimiser trains (and SAM perturbs)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def eval_model(self) -> torch.nn.Module:
        """The model evaluation uses: the moving average of the weights when EMA is on."""
        return self.ema.model if self.ema else self.model

    def start(self) -> None:
        """A new run: config.json records the settings, the environment and the data."""
        self.folder.write_config({**self.cfg.to_dict(), "environment": environment(self.runtime),
                                  "data": {"source": self.dataset.source, "verification": self.dataset.verification,
                                           "name": self.dataset.name},
                                  "split": {"train": self.split.n, "validation": self.split.n_val}})

    def restore(self) -> None:
        """Weights, optimiser, random state and progress of a stopped run, from its checkpoint."""
        path = self.folder.checkpoint_path
        if not path.exists():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        extra, state = checkpoint.load_state(path, self.model, self.optimizer)
        self.state = TrainState(**state)
        torch.set_rng_state(extra.pop("rng.cpu"))
        if "rng.cuda" in extra and self.runtime.device.type == "cuda":
            torch.cuda.set_rng_state(extra.pop("rng.cuda"))
        if self.ema:
            self.ema.model.load_state_dict({k[4:]: v for k, v in extra.items() if k.startswith("ema.")})
        self.best_weights = {k[5:]: v for k, v in extra.items() if k.startswith("best.")} or None
        if self.hard:
            self.hard.load(extra, str(path))
        self.resume_stem = {k: v for k, v in extra.items() if k.startswith("stem.")}  # for attach_stem_cache
        self.resume_gen_state = extra.get("rng.epoch")
        self.log(f"resuming {self.folder.path} at epoch {self.state.epoch + 1}, step {self.state.step}")

    def attach_stem_cache(self) -> None:
        """After the weights are final for the run (loaded on resume): the cache holds what the frozen
        stem computes from them."""
        if not self.cfg.cache_stem:
            return
        if self.cfg.resize_from:
            self.log("frozen stem: not cached, progressive resizing changes the image before the stem")
            return
        self.cache, note = StemCache.for_run(self.model, self.augment, self.split.X, self.runtime)
        if self.cache:
            self.from_stem = _compiled(self.model.forward_from_stem, self.cfg, self.runtime)
            self.log(f"frozen stem: computed once per image in the first epoch, before its first step; every step "
                     f"reads it from a cache ({note})")
            if self.resume_stem:  # before the resumed run's first step, so its time is not training's
                with self.runtime.autocast():
                    n = self.cache.load(self.resume_stem, self.split.X, self.cfg.batch_size, self.runtime,
                                        str(self.folder.checkpoint_path))
                self.log(f"frozen stem: {n:,} entries recomputed as the checkpointed run computed them")

    # ---- the loop

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end (or until stopped), then evaluate and write the model; returns the metrics."""
        device_mod.keep_freed_memory()
        with device_mod.threads_for_training(self.cfg.threads):
            return self._run(resume)

    def _run(self, resume: bool) -> dict[str, Any]:
        self.restore() if resume else self.start()
        self.log(self.describe())
        if self.cfg.threads and self.runtime.device.type == "cpu":
            crowded = device_mod.oversubscribed(self.cfg.threads)
            if crowded:
                threads_log.warning("%s: %s", self.folder.path, crowded)
        self.attach_stem_cache()
        self.warm_up()
        self._emit("on_train_start")
        with _stop_on_signals(self.stop_signal):
            for epoch in range(self.state.epoch, self.cfg.epochs):
                row = self.train_epoch(epoch)
                self.validate(row)
                if self.end_epoch(row):
                    break
        return self.finish()

    def warm_up(self) -> None:
        """Untimed forward and backward passes at each batch size an epoch uses, before the first timed step.

        A process pays once for what no later run in it pays again: the kernels each layer's shapes need
        (oneDNN creates and JIT-compiles them on the first call), thread pools, lazy initialisation, and
        torch.compile's compilation when it is on, and on CUDA the capture of its CUDA graphs (a compiled
        function runs eagerly once, is recorded on its second call and replayed from the third, so each
        batch size is warmed up three times there). Paid inside the first epoch, that made a study's first
        run look many times slower than the next seed's on small budgets. Nothing of the run changes: the
        optimiser does not step, the gradients are dropped, the BatchNorm statistics and the global random
        state (dropout draws from it) are put back, augmentation draws from a generator of its own, and the
        stem cache is read around, never filled. The seconds are reported apart, as warmup_seconds.
        """
        t0 = time.perf_counter()
        dev = self.runtime.device
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        repeats = 3 if self.cfg.compile and self.runtime.cuda_graphs else 1
        self.model.train()
        with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev], device_type=dev.type):
            for side, n in self._step_shapes():
                for _ in range(repeats):
                    self._warm_up_step(torch.arange(n, device=dev), side)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), saved_buffers):
                b.copy_(saved)
        for p in self.model.parameters():
            p.grad = None
        if dev.type == "cuda":
            torch.cuda.synchronize()  # the queued warm-up kernels must not run inside the first timed step
        self.warmup_seconds = time.perf_counter() - t0

    def _step_shapes(self) -> list[tuple[int, int]]:
        """The (image side, batch size) pairs the epochs left to train will step at, largest first: each
        epoch's full batch and its last, shorter one, at that epoch's side."""
        bs, shapes = self.cfg.batch_size, set()
        for epoch in range(self.state.epoch, self.cfg.epochs):
            n = self.images_in(epoch)
            shapes |= {(self.side_in(epoch), size) for size in (min(bs, n), n % bs) if size}
        return sorted(shapes, reverse=True)

    def _warm_up_step(self, idx: torch.Tensor, side: int) -> None:
        """A training step's forward and backward on the batch at idx, as train_step runs them, without
        its side effects (see warm_up)."""
        rt = self.runtime
        if self.cache:  # the cached path's shapes (the fill's too), without writing the cache
            with rt.autocast(), torch.no_grad():
                xb, forward = self.cache.run_stem(evaluate.to_input(self.split.X[idx], rt)), self.from_stem
        else:
            xb, forward = self._batch(idx, torch.Generator(rt.random_device).manual_seed(0), side)
        self._step_begin()
        with rt.autocast():
            out = forward(xb)
        F.cross_entropy(out.float(), self.split.Y[idx], label_smoothing=self.cfg.label_smoothing).backward()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the shuffled training images; returns the epoch's history row (no validation yet)."""
        g = epoch_generator(self.cfg.seed, epoch, self.runtime.random_device)
        perm = torch.randperm(self.split.n, generator=g, device=g.device).to(self.runtime.device)
        stats, first_step = self._epoch_stats(epoch, g)
        self.model.train()
        self._emit("on_epoch_start", epoch, first_step)
        t0 = time.perf_counter()
        if self.hard:  # inside the timed part: choosing is part of the epoch's cost
            perm = self.hard.begin_epoch(epoch, perm)
        if self.cache and not self.cache.complete:  # the first epoch computes the frozen stem once per image
            self._fill_stem_cache(perm[first_step * self.cfg.batch_size:], g)
        steps, side = self.steps_in(epoch), self.side_in(epoch)
        for s in range(first_step, steps):
            self.train_step(perm[s * self.cfg.batch_size:(s + 1) * self.cfg.batch_size], g, stats, side)
            self._emit("on_step", s, stats)
            if self.stop_signal.get("signum") and s < steps - 1:
                self._stop_mid_epoch(epoch, s + 1, stats, t0, g)
        self._end_of_pass()
        stats.seconds += time.perf_counter() - t0
        self.state.train_seconds += stats.seconds
        return {"epoch": epoch + 1, "train_loss": float(stats.loss_sum) / stats.seen,
                "train_accuracy": int(stats.correct) / stats.seen, "lr": self.optimizer.param_groups[0]["lr"],
                "seconds": stats.seconds, "images_per_s": stats.seen / stats.seconds}

    def _fill_stem_cache(self, perm: torch.Tensor, g: torch.Generator) -> None:
        """Every entry of the stem cache, each image from the orientation this epoch's steps (those still
        to run, on perm's images) will draw for it, before the first of them."""
        mirrored = StemCache.first_epoch_mirrors(self.split.n, perm, self.cfg.batch_size, self.augment, g)
        with self.runtime.autocast():
            self.cache.fill(self.split.X, mirrored, self.cfg.batch_size, self.runtime)

    def _epoch_stats(self, epoch: int, g: torch.Generator) -> tuple[EpochStats, int]:
        dev = self.runtime.device
        stats = EpochStats(torch.zeros((), device=dev), torch.zeros((), device=dev, dtype=torch.long),
                           seconds=self.init_seconds if epoch == 0 else 0.0)
        p = self.state.partial
        if not p:
            return stats, 0
        # Resuming mid-epoch: continue the same random stream and running sums.
        stats.seen, stats.seconds = p["seen"], p["seconds"]
        stats.loss_sum += p["loss_sum"]
        stats.correct += p["correct"]
        try:
            g.set_state(self.resume_gen_state)
        except RuntimeError:  # another generator's state: a CPU stream resumed on a GPU, or back
            raise ConfigError(f"{self.folder.checkpoint_path}: this run stopped mid-epoch on another kind of "
                              f"device; resume it on the kind it was started on, or start it again") from None
        self.state.partial = None
        return stats, p["step"]

    def train_step(self, idx: torch.Tensor, g: torch.Generator, stats: EpochStats,
                   side: int = progressive.FULL) -> None:
        """Learning rate, batch (images `side` pixels a side), forward and backward (twice with SAM),
        optimiser step, EMA, running sums."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, self.total_steps, cfg, self.steps_per_epoch)
        xb, forward = self._batch(idx, g, side)
        yb = self.split.Y[idx]

        def logits_and_loss(record: bool = False):
            self._step_begin()
            with self.runtime.autocast():
                out = forward(xb)
            if not self.hard:
                return out, F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
            losses = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing, reduction="none")
            if record:
                self.hard.record(idx, losses)
            return out, losses.mean()

        logits, loss = logits_and_loss(record=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # The running sums read this forward's outputs now: a CUDA-graph replay (SAM's second forward,
        # the next step) writes over them.
        stats.loss_sum += loss.detach() * len(idx)
        stats.correct += (logits.detach().argmax(1) == yb).sum()
        stats.seen += len(idx)
        if cfg.sam_rho and self.state.step >= int(cfg.sam_start * self.total_steps):
            sharpness_aware_gradients(self.opt_params, lambda: logits_and_loss()[1], cfg.sam_rho)
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model, self.state.step)
        self.state.step += 1

    def _step_begin(self) -> None:
        """Before each compiled forward on CUDA: a new iteration begins. torch.compile's CUDA graphs
        (mode "reduce-overhead") reuse their output memory from one replay to the next; marking the step
        tells them the previous outputs are no longer read, where otherwise a second call before the
        first one's outputs were freed (the warm-up's two batch sizes, SAM's second pass) fails with
        "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run"."""
        if self.cfg.compile and self.runtime.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _batch(self, idx: torch.Tensor, g: torch.Generator,
               side: int = progressive.FULL) -> tuple[torch.Tensor, Callable]:
        """The augmented batch, resized to `side` pixels, and the forward that takes it (from the stem's
        cached output when cached: a run that resizes has no cache)."""
        rt = self.runtime
        if self.cache:
            return self.cache.batch(idx, self.augment, g), self.from_stem
        xb = evaluate.to_input(self.split.X[idx])
        if self.augment.active:
            xb = self.augment(xb, g)
        if side != xb.shape[-1]:
            xb = progressive.resize(xb, side)
        if rt.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.step_model

    def _stop_mid_epoch(self, epoch: int, next_step: int, stats: EpochStats, t0: float, g: torch.Generator):
        """A signal arrived: checkpoint where the epoch stands, with its random stream, and stop."""
        stats.seconds += time.perf_counter() - t0
        self.state.epoch = epoch
        self.state.partial = {"step": next_step, "seen": stats.seen, "seconds": stats.seconds,
                              "loss_sum": float(stats.loss_sum), "correct": int(stats.correct)}
        self.save_checkpoint(g.get_state())
        self._emit("on_interrupt")
        raise TrainingInterrupted(self.folder.path, self.stop_signal["signum"])

    def _end_of_pass(self) -> None:
        """Work that finishes an epoch's model, inside the timed part."""
        if self.hard:
            self.hard.end_epoch()
        if self.cfg.precise_bn:
            recompute_batchnorm(self.eval_model(), self.split.X[:self.cfg.precise_bn], self.runtime,
                                self.cfg.batch_size)
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize()  # honest timing: wait for queued kernels

    def validate(self, row: dict[str, Any]) -> None:
        """Validation loss and accuracy into the row (no-op without a validation split)."""
        if not self.split.n_val:
            return
        logits = evaluate.predict_logits(self.eval_model(), self.split.Xv, self.runtime, self.cfg.eval_batch_size,
                                         self.cfg.tta_flip, self.cfg.tta_shift)
        row["val_loss"], row["val_accuracy"] = evaluate.quick_scores(logits, self.split.Yv)

    def end_epoch(self, row: dict[str, Any]) -> bool:
        """History, events, early stopping and the checkpoint; True when training should stop."""
        self.state.history.append(row)
        self.state.epoch = row["epoch"]
        self.log(epoch_line(row, self.cfg.epochs))
        self._emit("on_epoch_end", row)
        early = self._early_stopping(row)
        self.folder.write_history(self.state.history)
        if early:
            self.log(f"early stopping: no {self.cfg.monitor} improvement for {self.cfg.patience} epochs "
                     f"(best {self.state.best:.4f} at epoch {self.state.best_epoch})")
        if early or any(cb.should_stop(self, row) for cb in self.callbacks):
            return True
        if self.stop_signal.get("signum"):
            self.save_checkpoint()
            raise TrainingInterrupted(self.folder.path, self.stop_signal["signum"])
        if row["epoch"] < self.cfg.epochs:
            self.save_checkpoint()
        return False

    def _early_stopping(self, row: dict[str, Any]) -> bool:
        """Track the best monitored epoch (keeping its weights when they will be restored)."""
        if not self.split.n_val:
            return False
        cfg, st = self.cfg, self.state
        value = row[cfg.monitor]
        better = st.best is None or (value > st.best if cfg.monitor == "val_accuracy" else value < st.best)
        if better:
            st.best, st.best_epoch, st.since_best = value, row["epoch"], 0
            if cfg.patience is not None and cfg.restore_best:
                self.best_weights = {k: v.detach().cpu().clone() for k, v in self.eval_model().state_dict().items()}
            return False
        st.since_best += 1
        return cfg.patience is not None and st.since_best >= cfg.patience

    def save_checkpoint(self, epoch_gen_state: torch.Tensor | None = None) -> None:
        extra = {"rng.cpu": torch.get_rng_state()}
        if self.runtime.device.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state()
        if self.ema:
            extra.update({f"ema.{k}": v for k, v in self.ema.model.state_dict().items()})
        if self.best_weights:
            extra.update({f"best.{k}": v for k, v in self.best_weights.items()})
        if epoch_gen_state is not None:
            extra["rng.epoch"] = epoch_gen_state
        if self.hard:
            extra.update(self.hard.state())
        if self.cache:
            extra.update(self.cache.state())
        checkpoint.save_state(self.folder.checkpoint_path, self.model, self.optimizer, extra, asdict(self.state))

    # ---- the end

    def finish(self) -> dict[str, Any]:
        """The chosen weights on the test set; model.safetensors, model.json and metrics.json written."""
        cfg, st, ds = self.cfg, self.state, self.dataset
        final = self.eval_model()
        if self.best_weights and cfg.restore_best:
            final.load_state_dict(self.best_weights)
        metrics = evaluate.evaluate_model(final, ds.test_images, ds.test_labels, ds.class_names, self.runtime,
                                          cfg.eval_batch_size, cfg.tta_flip, cfg.tta_shift)
        metrics.update(
            params=models.count_params(self.model), train_seconds=st.train_seconds, epochs_run=len(st.history),
            best_epoch=st.best_epoch, wall_seconds=time.perf_counter() - self.wall_start,
            images_per_s=sum(r["seconds"] * r["images_per_s"] for r in st.history) / max(st.train_seconds, 1e-9),
            model=cfg.model, recipe=cfg.recipe, seed=cfg.seed, precision=self.runtime.precision,
            device=str(self.runtime.device), stem_cached=self.cache is not None,
            warmup_seconds=self.warmup_seconds,
        )
        self.folder.save_model(final, model_info(cfg, self.model_args, self.runtime, ds.class_names))
        self.folder.write_metrics(metrics)
        self.folder.checkpoint_path.unlink(missing_ok=True)  # finished: nothing left to resume
        self.log(f"test accuracy {metrics['test_accuracy']:.4f}  loss {metrics['test_loss']:.4f}  "
                 f"({metrics['train_seconds']:.1f} s training) -> {self.folder.path}")
        self._emit("on_train_end", metrics)
        return metrics

    # ---- helpers

    def describe(self) -> str:
        rt = self.runtime
        return (f"{self.cfg.model}: {models.count_params(self.model):,} parameters | {self.split.n:,} train / "
                f"{self.split.n_val:,} val / {len(self.dataset.test_labels):,} test | {rt.device.type} {rt.precision}"
                f"{' channels_last' if rt.channels_last else ''} | {torch.get_num_threads()} CPU threads"
                f"{self._resizing_note()}")

    def _resizing_note(self) -> str:
        cfg = self.cfg
        if not cfg.resize_from:
            return ""
        sides = progressive.sides(cfg.epochs, cfg.resize_from, cfg.resize_until)
        return f" | training images {sides[0]} px at epoch 1, {sides[-1]} px from epoch {sides.index(sides[-1]) + 1}"

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            hook = getattr(cb, event, None)
            if hook is not None:
                hook(self, *args)


def build_model(cfg: TrainConfig, margs: dict[str, Any], split: Split, rt: device_mod.Runtime,
                initialise: bool) -> tuple[torch.nn.Module, float]:
    """The model seeded by cfg.seed, initialised from data when it asks to be; returns it and the
    seconds the data-dependent initialisation took (part of training time)."""
    torch.manual_seed(cfg.seed)
    model = models.build_model(cfg.model, **margs).to(rt.device)
    init_seconds = 0.0
    # Data-dependent initialisation, e.g. FastNet's whitening filters; a resumed run loads them instead.
    # 5,000 images (3.9 million 3x3 patches) set the whitening filters to within about 1.5% of what
    # 10,000 give, in half the time (0.4 s against 0.8 s on 2 cores).
    if hasattr(model, "init_from_data") and initialise:
        t_init = time.perf_counter()
        model.init_from_data(evaluate.to_input(split.X[:INIT_IMAGES]))
        init_seconds = time.perf_counter() - t_init
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, init_seconds


def _compiled(fn: Callable, cfg: TrainConfig, rt: device_mod.Runtime) -> Callable:
    """torch.compile when asked (CUDA graphs on CUDA). Compiled functions share the model's
    parameters; evaluation and checkpoints use the plain model."""
    if not cfg.compile:
        return fn
    if cfg.resize_from:  # a graph per side and batch size (a full batch, the last of a full and of a hard
        # epoch): more than dynamo's default limit of 8, past which it would run the step uncompiled
        shapes = 3 * len(set(progressive.sides(cfg.epochs, cfg.resize_from, cfg.resize_until)))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, shapes)
    return torch.compile(fn, mode="reduce-overhead" if rt.cuda_graphs else None)


# --------------------------------------------------------------------------- the pieces of a step

def lr_at(step: int, total: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Learning rate for a global step: linear warm-up, then the schedule's decay."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and warm == 0:
        warm = int(0.25 * total)
    if step < warm:
        start = cfg.lr / 25 if cfg.schedule == "onecycle" else 0.0
        return start + (cfg.lr - start) * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - warm) / max(total - warm, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters (1-D tensors); frozen weights are left out.
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel updates every parameter instead of a launch (on a CPU, a pass over memory) per
    # tensor and operation. On a GPU for every optimiser; on a CPU for SGD, whose fused kernel is 6 times
    # faster for `best` (2.2 against 0.4 ms a step on 2 cores) and computes the same bits as the
    # per-tensor one on every tensor whose size is a multiple of the CPU's vector (8 floats with AVX2, 16
    # with AVX-512), as all of FastNet's are; on the last values of another (a 10-value bias) it can
    # differ in the last bit. Adam's CPU kernel rounds differently everywhere, so Adam stays as it was.
    fused = {"fused": True} if trainable and trainable[0].is_cuda else {}
    if cfg.optimizer == "sgd":
        fused_sgd = {"fused": True} if trainable and trainable[0].device.type in ("cuda", "cpu") else {}
        sgd = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused_sgd)
        start_momentum(sgd)
        return sgd
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, **fused)
    if cfg.weight_decay:
        return torch.optim.Adam(groups, lr=cfg.lr, **fused)  # L2 added to the gradient, as Keras/PyTorch Adam do
    return torch.optim.Adam(trainable, lr=cfg.lr, **fused)


@torch.no_grad()
def start_momentum(optimizer: torch.optim.Optimizer) -> None:
    """For fused SGD with momentum (nothing otherwise): a zero momentum buffer for every parameter that
    has none, before the first step (a checkpoint's state without one keeps it: checkpoint.load_state).

    The fused kernel takes a step's buffers as one list, and fails (TypeError: "expected Tensor ... but
    got NoneType") when some parameters have one and another gets its first gradient in that step: a
    layer that joins training late (unfrozen, or a branch a model starts using), which the per-tensor
    kernel handles. From a zero buffer the first update sets the buffer to momentum x 0 + gradient ==
    gradient exactly, as the kernel's own first step does, so a run steps through the same bits.
    zeros_like keeps each weight's layout (channels_last), which the kernel walks weight and buffer in."""
    if not (isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["fused"] and optimizer.defaults["momentum"]):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


@torch.no_grad()
def sharpness_aware_gradients(params: list[torch.Tensor], loss_at: Callable[[], torch.Tensor], rho: float) -> None:
    """SAM (Foret et al., 2021): replace the gradients in params' .grad, computed at w, by those at
    w + rho * g / ||g||, the nearby point where the loss rises fastest; the weights are put back.

    loss_at() runs the forward pass on the same batch (the augmentation drawn once) and returns the loss.
    Costs a second forward and backward per step."""
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    saved = [p.detach().clone() for p in params]  # restored by copy: w + e - e is not always w in floating point
    torch._foreach_add_(params, torch._foreach_mul(grads, rho / (norm + 1e-12)))  # a tensor: no device sync
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss_at().backward()
    torch._foreach_copy_(params, saved)


class EMA:
    """Exponential moving average of the weights; buffers (BatchNorm statistics) are copied.

    The average warms up: update t (from 0) uses the decay min(decay, (1 + t) / (10 + t)), as TensorFlow's
    ExponentialMovingAverage(num_updates) and timm do. A plain average starts from the initial weights and
    forgets them only after a few times 1 / (1 - decay) steps: with 0.99, 37% of it is still the random
    initial weights after 100 steps, so a short run evaluated at 10% test accuracy without a word.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """Average in the weights after optimiser step `step` (counted from 0 over the whole run, so a
        resumed run warms up exactly as the uninterrupted one did)."""
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - self.decay_at(step))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, images_u8: torch.Tensor, rt: device_mod.Runtime,
                        batch_size: int) -> None:
    """Precise BatchNorm: replace every BatchNorm layer's running statistics by the average of the
    batch statistics the current weights give on these images (at the training batch size).

    A running average with momentum 0.1 remembers the last ~10 batches, whose weights differ from
    the final ones. In a pre-activation ResNet the residual stream is not normalised, so its scale
    moves with every step and the stale statistics can cost tens of points of test accuracy in
    eval mode while the training batches look fine; an EMA of the weights has no statistics of its
    own at all. Training itself is untouched: it always uses batch statistics.
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers or not len(images_u8):
        return
    momenta = [m.momentum for m in layers]
    was_training = model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    try:
        for i in range(0, len(images_u8), batch_size):
            with rt.autocast():
                model(evaluate.to_input(images_u8[i: i + batch_size], rt))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)


# --------------------------------------------------------------------------- what a run records

def environment(runtime: device_mod.Runtime) -> dict[str, Any]:
    return {**runtime.describe(), "fashionlab": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def model_info(cfg: TrainConfig, margs: dict[str, Any], runtime: device_mod.Runtime,
               class_names: list[str]) -> dict[str, Any]:
    """model.json: enough to rebuild and use the model without the registry or the training settings."""
    spec = models.model_spec(cfg.model, **margs)
    kw = spec["kwargs"]
    return {
        "architecture": spec,
        "class_names": class_names,
        "input": {"shape": [1, 28, 28], "dtype": "float32", "scale": "uint8 pixel / 255",
                  "normalisation": {"mean": kw.get("mean", models.FASHION_MEAN), "std": kw.get("std", models.FASHION_STD),
                                    "resize": kw.get("resize")}},
        "precision": runtime.precision,
        "tta_flip": cfg.tta_flip,
        "tta_shift": cfg.tta_shift,
        "versions": {"fashionlab": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }


def epoch_line(row: dict, epochs: int) -> str:
    s = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
    if "val_accuracy" in row:
        s += f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
    return s + f" | {row['seconds']:.1f} s, {row['images_per_s']:,.0f} img/s"


# --------------------------------------------------------------------------- stock callbacks

class ProgressBar(Callback):
    """A tqdm bar per epoch with the running loss, accuracy and speed, refreshed every 20 steps on a
    CPU. Reading the running sums waits for a GPU to catch up, so there it is refreshed 4 times an
    epoch at most (the bar's count still moves every step)."""

    def __init__(self):
        self.bar = None
        self.every = self.steps = 20

    def on_epoch_start(self, trainer: Trainer, epoch: int, first_step: int) -> None:
        from tqdm import tqdm
        self.steps = trainer.steps_in(epoch)
        self.bar = tqdm(total=self.steps, initial=first_step, desc=f"epoch {epoch + 1}/{trainer.cfg.epochs}",
                        unit="batch", leave=False, mininterval=0.5, dynamic_ncols=True)
        self.t0 = time.perf_counter()
        on_gpu = trainer.runtime.device.type != "cpu"
        self.every = max(20, self.steps // 4) if on_gpu else 20

    def on_step(self, trainer: Trainer, step: int, stats: EpochStats) -> None:
        if step % self.every == 0 or step == self.steps - 1:
            el = stats.seconds + time.perf_counter() - self.t0
            self.bar.set_postfix_str(f"loss {stats.loss_sum.item() / stats.seen:.4f} "
                                     f"acc {stats.correct.item() / stats.seen:.4f} "
                                     f"{stats.seen / max(el, 1e-9):,.0f} img/s", refresh=False)
        self.bar.update(1)
        if step == self.steps - 1:
            self.close()

    def on_interrupt(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EpochHook(Callback):
    """A plain function called with (row, model) after each epoch: the model evaluation would use."""

    def __init__(self, fn: Callable[[dict[str, Any], torch.nn.Module], None]):
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.fn(row, trainer.eval_model())


@contextmanager
def _stop_on_signals(flag: dict):
    """First SIGINT/SIGTERM asks the loop to checkpoint and stop; a second SIGINT stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.get("signum") and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["signum"] = signum

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
