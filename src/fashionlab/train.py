"""The training loop: a plain function over tensors held on the device.

The whole training set lives on the device as one uint8 tensor; a batch is an index slice,
converted to floats and augmented as a whole. Shuffling and augmentation draw from a CPU
generator seeded by (seed, epoch), so a run is repeatable on the same device and precision,
and a run stopped mid-epoch resumes into exactly the run it would have been.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, checkpoint, data as data_mod, device as device_mod, evaluate, models
from .atomic import write_text
from .augment import Augment
from .recipes import get_recipe
from .stem_cache import StemCache

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
MONITORS = ("val_accuracy", "val_loss")
INIT_IMAGES = 5000  # training images a model's data-dependent initialisation sees


@dataclass
class TrainConfig:
    model: str = "cnn"
    model_args: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    dataset: str = "fashion-mnist"
    class_names: list[str] | None = None  # a custom IDX dataset in --data-dir (no reference checksums)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    val_split: float = 0.1
    patience: int | None = None  # early stopping: epochs without improvement; None = off
    monitor: str = "val_accuracy"
    restore_best: bool = True
    augment: dict[str, Any] = field(default_factory=dict)
    ema: float | None = None  # decay of an exponential moving average of the weights, used for evaluation
    sam_rho: float = 0.0  # sharpness-aware minimisation: radius of the weight perturbation; 0 = off
    sam_start: float = 0.0  # fraction of the run after which SAM is on (late SAM costs less, gains about as much)
    tta_flip: bool = False  # average predictions over the image and its mirror at evaluation
    tta_shift: int = 0  # also average over copies moved 1 to this many pixels up, down, left and right
    precise_bn: int = 0  # recompute BatchNorm statistics from this many training images before each evaluation
    seed: int = 0
    subset: int | None = None  # stratified subset of the training images
    device: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 1000
    compile: bool = False  # torch.compile the training step's model (CUDA graphs on CUDA); off: compiling costs time
    cache_stem: bool = True  # keep a frozen stem's output per training image (stem_cache); off only to compare

    def validate(self) -> None:
        def bad(name, expected):
            raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")
        if self.model not in models.MODELS:
            raise ValueError(f"model={self.model!r}: unknown model; registered models: {', '.join(sorted(models.MODELS))}")
        if self.epochs < 1: bad("epochs", "an integer >= 1")
        if self.batch_size < 1: bad("batch_size", "an integer >= 1")
        if not self.lr > 0: bad("lr", "a positive number")
        if self.optimizer not in OPTIMIZERS: bad("optimizer", f"one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES: bad("schedule", f"one of {', '.join(SCHEDULES)}")
        if self.monitor not in MONITORS: bad("monitor", f"one of {', '.join(MONITORS)}")
        if not 0 <= self.val_split < 1: bad("val_split", "a fraction in [0, 1)")
        if not 0 <= self.label_smoothing < 1: bad("label_smoothing", "a fraction in [0, 1)")
        if self.patience is not None and self.patience < 1: bad("patience", "an integer >= 1 or None")
        if self.patience is not None and self.val_split == 0:
            raise ValueError("patience (early stopping) needs a validation split: set val_split > 0")
        if self.ema is not None and not 0 < self.ema < 1: bad("ema", "a decay in (0, 1)")
        if not self.sam_rho >= 0: bad("sam_rho", "a radius >= 0 (0 turns SAM off)")
        if not 0 <= self.sam_start < 1: bad("sam_start", "a fraction of the run in [0, 1)")
        if self.subset is not None and self.subset < 10: bad("subset", "an integer >= 10")
        if not isinstance(self.precise_bn, int) or self.precise_bn < 0: bad("precise_bn", "an integer >= 0")
        if not isinstance(self.tta_shift, int) or not 0 <= self.tta_shift <= 4: bad("tta_shift", "an integer from 0 to 4 (pixels)")
        Augment.from_dict(self.augment)
        device_mod.resolve_device(self.device) if self.device != "auto" else None
        if self.precision not in device_mod.PRECISIONS: bad("precision", f"one of {', '.join(device_mod.PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


def make_config(recipe: str | None = None, **overrides) -> TrainConfig:
    """Recipe values first, then explicit overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if recipe:
        values.update(copy.deepcopy(get_recipe(recipe).settings))
        values["recipe"] = recipe
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig.from_dict(values)
    cfg.validate()
    return cfg


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint that --resume continues."""

    def __init__(self, run_dir: Path, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved in {run_dir}")
        self.run_dir, self.signum = run_dir, signum


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    if cfg.weight_decay:
        return torch.optim.Adam(groups, lr=cfg.lr)  # L2 added to the gradient, as Keras/PyTorch Adam do
    return torch.optim.Adam(trainable, lr=cfg.lr)


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
    """Exponential moving average of the weights; buffers (BatchNorm statistics) are copied."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1 - self.decay)
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


def default_run_dir(model: str) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{model}"


def environment(runtime: device_mod.Runtime) -> dict[str, Any]:
    return {**runtime.describe(), "fashionlab": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def model_info(cfg: TrainConfig, margs: dict[str, Any], runtime: device_mod.Runtime,
               class_names: list[str]) -> dict[str, Any]:
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


def train(cfg: TrainConfig, out_dir: str | Path | None = None, dataset: data_mod.Dataset | None = None,
          quiet: bool = False, resume: bool = False, data_dir=None, offline: bool | None = None,
          on_epoch: Callable[[dict, torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Train, evaluate on the test set, write the run folder; returns metrics.json's content.

    on_epoch(row, model) is called after each epoch, outside the timed part, with the history row
    and the model evaluation would use (the EMA copy when on): progress displays use the row,
    benchmarks measure test accuracy per epoch with the model.
    """
    cfg.validate()
    run_dir = Path(out_dir) if out_dir else default_run_dir(cfg.model)
    if not resume and (run_dir / checkpoint.MODEL_JSON).exists():
        raise FileExistsError(f"{run_dir} already holds a finished run; choose another --out")
    if not resume and (run_dir / checkpoint.STATE_FILE).exists():
        raise FileExistsError(f"{run_dir} holds an interrupted run; continue it with --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Flushed, so epoch lines reach a pipe or log file as they happen.
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    wall_start = time.perf_counter()

    spec = data_mod.custom_spec(cfg.class_names) if cfg.class_names else data_mod.get_spec(cfg.dataset)
    ds = dataset or data_mod.load(spec, data_dir=data_dir, offline=offline, progress=log)
    margs = dict(cfg.model_args)
    if ds.num_classes != 10:
        margs.setdefault("num_classes", ds.num_classes)
    entry = models.MODELS[cfg.model]
    rt = device_mod.resolve(cfg.device, cfg.precision, conv_model=entry.channels_last)
    dev = rt.device

    # ---- data: a stratified subset, then a stratified validation split, all seeded
    pool = np.arange(len(ds.train_labels))
    if cfg.subset:
        pool = data_mod.stratified_subset(ds.train_labels, min(cfg.subset, len(pool)), cfg.seed)
    tr_rel, va_rel = data_mod.stratified_split(ds.train_labels[pool], cfg.val_split, cfg.seed)
    tr_idx, va_idx = pool[tr_rel], pool[va_rel]
    X = torch.from_numpy(ds.train_images[tr_idx]).unsqueeze(1).to(dev)  # uint8 (N, 1, 28, 28)
    Y = torch.from_numpy(ds.train_labels[tr_idx]).to(dev)
    Xv = torch.from_numpy(ds.train_images[va_idx])
    Yv = torch.from_numpy(ds.train_labels[va_idx])
    n, bs = len(Y), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = steps_per_epoch * cfg.epochs
    aug = Augment.from_dict(cfg.augment)

    # ---- model and optimiser (the global seed fixes the initial weights)
    torch.manual_seed(cfg.seed)
    model = models.build_model(cfg.model, **margs).to(dev)
    init_seconds = 0.0
    # Data-dependent initialisation, e.g. FastNet's whitening filters; a resumed run loads them instead.
    # 5,000 images (3.9 million 3x3 patches) set the whitening filters to within about 1.5% of what
    # 10,000 give, in half the time (0.4 s against 0.8 s on 2 cores), which counts as training time.
    if hasattr(model, "init_from_data") and not resume:
        t_init = time.perf_counter()
        model.init_from_data(evaluate.to_input(X[:INIT_IMAGES]))
        init_seconds = time.perf_counter() - t_init  # part of training: counted in the first epoch's time
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)
    opt_params = [p for group in opt.param_groups for p in group["params"]]  # what SAM perturbs: what is trained
    sam_from_step = int(cfg.sam_start * total_steps)
    ema = EMA(model, cfg.ema) if cfg.ema else None
    # Compiled functions share the model's parameters; evaluation and checkpoints use the plain model.
    def compiled(fn):
        return torch.compile(fn, mode="reduce-overhead" if dev.type == "cuda" else None) if cfg.compile else fn
    step_model = compiled(model)
    n_params = models.count_params(model)

    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "best": None, "best_epoch": None,
                             "since_best": 0, "train_seconds": 0.0, "partial": None}
    best_weights: dict[str, torch.Tensor] | None = None
    resume_gen_state: torch.Tensor | None = None  # the epoch generator's state at a mid-epoch stop
    ckpt_path = run_dir / checkpoint.STATE_FILE
    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"{ckpt_path}: no checkpoint to resume from")
        extra, state = checkpoint.load_state(ckpt_path, model, opt)
        torch.set_rng_state(extra.pop("rng.cpu"))
        if "rng.cuda" in extra and dev.type == "cuda":
            torch.cuda.set_rng_state(extra.pop("rng.cuda"))
        if ema:
            ema.model.load_state_dict({k[4:]: v for k, v in extra.items() if k.startswith("ema.")})
        best_weights = {k[5:]: v for k, v in extra.items() if k.startswith("best.")} or None
        resume_gen_state = extra.get("rng.epoch")
        log(f"resuming {run_dir} at epoch {state['epoch'] + 1}, step {state['step']}")
    else:
        checkpoint.write_json(run_dir / "config.json", {**cfg.to_dict(), "environment": environment(rt),
                              "data": {"source": ds.source, "verification": ds.verification, "name": ds.name},
                              "split": {"train": int(n), "validation": int(len(va_idx))}})
    log(f"{cfg.model}: {n_params:,} parameters | {n:,} train / {len(va_idx):,} val / {len(ds.test_labels):,} test "
        f"| {dev.type} {rt.precision}{' channels_last' if rt.channels_last else ''}")

    # After a resume has loaded the weights: the cache holds what the frozen stem computes from them.
    cache, cache_note = StemCache.for_run(model, aug, X, rt) if cfg.cache_stem else (None, "")
    from_stem = compiled(model.forward_from_stem) if cache else None
    if cache:
        log(f"frozen stem: computed in the first epoch, read from a cache after it ({cache_note})")

    def save_checkpoint(epoch_gen_state=None):
        extra = {"rng.cpu": torch.get_rng_state()}
        if dev.type == "cuda":
            extra["rng.cuda"] = torch.cuda.get_rng_state()
        if ema:
            extra.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
        if best_weights:
            extra.update({f"best.{k}": v for k, v in best_weights.items()})
        if epoch_gen_state is not None:
            extra["rng.epoch"] = epoch_gen_state
        checkpoint.save_state(ckpt_path, model, opt, extra, state)

    def eval_model():
        return ema.model if ema else model

    flag: dict[str, int] = {}
    with _stop_on_signals(flag):
        for epoch in range(state["epoch"], cfg.epochs):
            g = _epoch_generator(cfg.seed, epoch)
            perm = torch.randperm(n, generator=g).to(dev)
            start_step = 0
            loss_sum = torch.zeros((), device=dev)
            correct = torch.zeros((), device=dev, dtype=torch.long)
            seen, epoch_seconds = 0, (init_seconds if epoch == 0 else 0.0)
            if state["partial"]:  # resuming mid-epoch: continue the same random stream
                p = state["partial"]
                start_step, seen, epoch_seconds = p["step"], p["seen"], p["seconds"]
                loss_sum += p["loss_sum"]
                correct += p["correct"]
                g.set_state(resume_gen_state)
                state["partial"] = None
            model.train()
            bar = _progress(steps_per_epoch, start_step, f"epoch {epoch + 1}/{cfg.epochs}", quiet)
            t0 = time.perf_counter()
            for s in range(start_step, steps_per_epoch):
                for group in opt.param_groups:
                    group["lr"] = lr_at(state["step"], total_steps, cfg, steps_per_epoch)
                idx = perm[s * bs:(s + 1) * bs]
                yb = Y[idx]
                if cache:
                    with rt.autocast():
                        xb = cache.batch(X, idx, aug, g, rt)
                    forward = from_stem
                else:
                    xb, forward = evaluate.to_input(X[idx]), step_model
                    if aug.active:
                        xb = aug(xb, g)
                    if rt.channels_last:
                        xb = xb.contiguous(memory_format=torch.channels_last)

                def logits_and_loss():
                    with rt.autocast():
                        out = forward(xb)
                    return out, F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)

                logits, loss = logits_and_loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.sam_rho and state["step"] >= sam_from_step:
                    sharpness_aware_gradients(opt_params, lambda: logits_and_loss()[1], cfg.sam_rho)
                opt.step()
                if ema:
                    ema.update(model)
                state["step"] += 1
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == yb).sum()
                seen += len(idx)
                if bar is not None and (s % 20 == 0 or s == steps_per_epoch - 1):
                    el = epoch_seconds + time.perf_counter() - t0
                    bar.set_postfix_str(f"loss {loss_sum.item() / seen:.4f} acc {correct.item() / seen:.4f} "
                                        f"{seen / max(el, 1e-9):,.0f} img/s", refresh=False)
                if bar is not None:
                    bar.update(1)
                if flag.get("signum") and s < steps_per_epoch - 1:
                    epoch_seconds += time.perf_counter() - t0
                    state["epoch"] = epoch
                    state["partial"] = {"step": s + 1, "seen": seen, "seconds": epoch_seconds,
                                        "loss_sum": float(loss_sum), "correct": int(correct)}
                    save_checkpoint(g.get_state())
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(run_dir, flag["signum"])
            if cache:
                cache.end_epoch()
            if cfg.precise_bn:  # part of producing the epoch's model, so inside the timed part
                recompute_batchnorm(eval_model(), X[:cfg.precise_bn], rt, bs)
            if dev.type == "cuda":
                torch.cuda.synchronize()  # honest timing: wait for queued kernels
            epoch_seconds += time.perf_counter() - t0
            if bar is not None:
                bar.close()
            state["train_seconds"] += epoch_seconds

            row = {"epoch": epoch + 1, "train_loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen,
                   "lr": opt.param_groups[0]["lr"], "seconds": epoch_seconds, "images_per_s": seen / epoch_seconds}
            if len(va_idx):
                vl, va = evaluate.quick_scores(
                    evaluate.predict_logits(eval_model(), Xv, rt, cfg.eval_batch_size, cfg.tta_flip, cfg.tta_shift), Yv)
                row.update(val_loss=vl, val_accuracy=va)
            state["history"].append(row)
            state["epoch"] = epoch + 1
            log(_epoch_line(row, cfg.epochs))
            if on_epoch:
                on_epoch(row, eval_model())

            stop = False
            if len(va_idx):
                value = row[cfg.monitor]
                better = state["best"] is None or (value > state["best"] if cfg.monitor == "val_accuracy"
                                                   else value < state["best"])
                if better:
                    state.update(best=value, best_epoch=epoch + 1, since_best=0)
                    if cfg.patience is not None and cfg.restore_best:
                        best_weights = {k: v.detach().cpu().clone() for k, v in eval_model().state_dict().items()}
                else:
                    state["since_best"] += 1
                    stop = cfg.patience is not None and state["since_best"] >= cfg.patience
            _write_history(run_dir, state["history"])
            if stop:
                log(f"early stopping: no {cfg.monitor} improvement for {cfg.patience} epochs "
                    f"(best {state['best']:.4f} at epoch {state['best_epoch']})")
                break
            if flag.get("signum"):
                save_checkpoint()
                raise TrainingInterrupted(run_dir, flag["signum"])
            if epoch + 1 < cfg.epochs:
                save_checkpoint()

    final = eval_model()
    if best_weights and cfg.restore_best:
        final.load_state_dict(best_weights)
    metrics = evaluate.evaluate_model(final, ds.test_images, ds.test_labels, ds.class_names, rt,
                                      cfg.eval_batch_size, cfg.tta_flip, cfg.tta_shift)
    metrics.update(
        params=n_params, train_seconds=state["train_seconds"], epochs_run=len(state["history"]),
        best_epoch=state["best_epoch"], wall_seconds=time.perf_counter() - wall_start,
        images_per_s=sum(r["seconds"] * r["images_per_s"] for r in state["history"]) / max(state["train_seconds"], 1e-9),
        model=cfg.model, recipe=cfg.recipe, seed=cfg.seed, precision=rt.precision, device=str(dev),
        stem_cached=cache is not None,
    )
    checkpoint.save_model(run_dir, final, model_info(cfg, margs, rt, ds.class_names))
    checkpoint.write_json(run_dir / "metrics.json", metrics)
    ckpt_path.unlink(missing_ok=True)  # finished: nothing left to resume
    log(f"test accuracy {metrics['test_accuracy']:.4f}  loss {metrics['test_loss']:.4f}  "
        f"({metrics['train_seconds']:.1f} s training) -> {run_dir}")
    return metrics


def _write_history(run_dir: Path, history: list[dict]) -> None:
    write_text(run_dir / "history.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def _epoch_line(row: dict, epochs: int) -> str:
    s = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"
    if "val_accuracy" in row:
        s += f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f}"
    return s + f" | {row['seconds']:.1f} s, {row['images_per_s']:,.0f} img/s"


def _progress(total: int, initial: int, desc: str, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, mininterval=0.5, dynamic_ncols=True)


def resume(run_dir: str | Path, quiet: bool = False, dataset=None, data_dir=None, offline=None) -> dict[str, Any]:
    """Continue an interrupted run from its checkpoint, with its recorded configuration."""
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists() and not (run_dir / checkpoint.STATE_FILE).exists():
        raise ValueError(f"{run_dir} is already finished (metrics.json exists); nothing to resume")
    saved = checkpoint.read_json(run_dir / "config.json")
    for key in ("environment", "data", "split"):
        saved.pop(key, None)
    cfg = TrainConfig.from_dict(saved)
    return train(cfg, run_dir, dataset=dataset, quiet=quiet, resume=True, data_dir=data_dir, offline=offline)
