"""The model registry: every architecture by name, each a row of data over a few families.

Contract shared by every model: input is a float tensor of pixels in [0, 1] with shape
(N, 1, 28, 28); output is (N, num_classes) logits. Input normalisation (and any resize a
recipe asks for) happens inside the model, so serving, export and explanations need no
preprocessing knowledge beyond "divide bytes by 255".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # pixel statistics of the training set


class Normalize(nn.Module):
    """(x - mean) / std, optionally resizing first (bilinear) to the size a recipe trains at."""

    def __init__(self, mean: float = FASHION_MEAN, std: float = FASHION_STD, resize: int | None = None):
        super().__init__()
        self.mean, self.std, self.resize = float(mean), float(std), resize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, resize={self.resize}"


# --------------------------------------------------------------------------- families

def dense_head(width: int, hidden, dropout: float, num_classes: int) -> list[nn.Module]:
    """Dense layers with ReLU (and dropout after each hidden layer), then the classifier."""
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    return layers + [nn.Linear(width, num_classes)]


class MLP(nn.Module):
    def __init__(self, hidden=(256, 128), dropout: float = 0.0, num_classes: int = 10,
                 mean=FASHION_MEAN, std=FASHION_STD, resize=None):
        super().__init__()
        side = resize or 28
        self.net = nn.Sequential(Normalize(mean, std, resize), nn.Flatten(),
                                 *dense_head(side * side, hidden, dropout, num_classes))

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    """Blocks of 3x3-style convolutions with pooling, then a dense head.

    One family covers the reference CNNs and VGG and the sweep's factors (kernel size,
    filters, depth, pooling, dropout). Where nothing sits between ReLU and max-pooling
    the pool runs first: max commutes with ReLU, so the result is identical and ReLU
    touches 4x fewer elements.
    """

    def __init__(self, channels=(32, 64), kernel: int = 3, padding: str = "same", convs_per_block: int = 1,
                 pool: str = "max", dense=(128,), dropout: float = 0.0, head_dropout: float | None = None,
                 batchnorm: bool = False, num_classes: int = 10, mean=FASHION_MEAN, std=FASHION_STD,
                 resize=None, in_channels: int = 1):
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
        if pool not in ("max", "avg", "stride", "none"):
            raise ValueError(f"pool must be one of max, avg, stride, none; got {pool!r}")
        head_dropout = dropout if head_dropout is None else head_dropout
        side = resize or 28
        layers: list[nn.Module] = [Normalize(mean, std, resize)]
        c_in = in_channels
        for c_out in channels:
            for i in range(convs_per_block):
                last = i == convs_per_block - 1
                stride = 2 if (pool == "stride" and last) else 1
                pad = kernel // 2 if padding == "same" else 0
                layers.append(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, bias=not batchnorm))
                side = (side + 2 * pad - kernel) // stride + 1
                if batchnorm:
                    layers.append(nn.BatchNorm2d(c_out))
                c_in = c_out
                if last and pool in ("max", "avg") and not dropout:
                    layers += [_pool(pool), nn.ReLU(inplace=True)]
                    side //= 2
                else:
                    layers.append(nn.ReLU(inplace=True))
                    if dropout and last:
                        layers.append(nn.Dropout(dropout))
                    if last and pool in ("max", "avg"):
                        layers.append(_pool(pool))
                        side //= 2
            if side < 1:
                raise ValueError(f"input of side {resize or 28} is too small for {len(channels)} blocks with kernel {kernel}")
        layers.append(nn.Flatten())
        layers += dense_head(c_in * side * side, dense, head_dropout, num_classes)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def _pool(kind: str) -> nn.Module:
    return nn.MaxPool2d(2) if kind == "max" else nn.AvgPool2d(2)


class RNN(nn.Module):
    """Reads the image's rows as a sequence (28 time steps of 28 pixels), classifies the last state."""

    def __init__(self, hidden: int = 128, layers: int = 1, cell: str = "lstm", bidirectional: bool = False,
                 num_classes: int = 10, mean=FASHION_MEAN, std=FASHION_STD, resize=None):
        super().__init__()
        cells = {"lstm": nn.LSTM, "gru": nn.GRU}
        if cell not in cells:
            raise ValueError(f"cell must be one of {sorted(cells)}, got {cell!r}")
        self.norm = Normalize(mean, std, resize)
        self.rnn = cells[cell](resize or 28, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x):
        seq = self.norm(x).squeeze(1)  # (N, rows, cols): rows are time steps
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


FAMILIES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "convnet": ConvNet, "rnn": RNN}


def register_family(name: str, builder: Callable[..., nn.Module]) -> None:
    FAMILIES[name] = builder


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    channels_last: bool = True  # whether conv layers benefit from NHWC memory layout


MODELS: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if entry.family not in FAMILIES:
        raise ValueError(f"model {entry.name!r}: unknown family {entry.family!r}")
    MODELS[entry.name] = entry
    return entry


for _entry in [
    ModelEntry("mlp", "mlp", dict(hidden=(256, 128)), "dense-vs-conv study: Flatten, Dense 256, Dense 128, Dense 10",
               channels_last=False),
    ModelEntry("cnn", "convnet", dict(channels=(32, 64), padding="same", dense=(128,)),
               "dense-vs-conv study: Conv 32, MaxPool, Conv 64, MaxPool, Dense 128, Dense 10"),
    ModelEntry("cnn_dropout", "convnet", dict(channels=(32, 64), padding="same", dense=(128,), dropout=0.5),
               "dropout-cnn study: Conv 32, Dropout 0.5, MaxPool, Conv 64, Dropout 0.5, MaxPool, Dense 128, Dropout 0.5"),
    ModelEntry("cnn_small", "convnet", dict(channels=(32, 32), padding="valid", dense=(100,)),
               "cnn-vs-rnn study: Conv 32 valid, MaxPool, Conv 32 valid, MaxPool, Dense 100, Dense 10"),
    ModelEntry("lstm", "rnn", dict(hidden=128), "cnn-vs-rnn study: LSTM 128 over the 28 rows, Dense 10",
               channels_last=False),
    ModelEntry("vgg", "convnet", dict(channels=(64, 128, 256), convs_per_block=2, padding="same", dense=(256,),
                                      head_dropout=0.5),
               "VGG study: blocks of 2 convs with 64, 128, 256 filters, max-pooling, Dense 256, Dropout 0.5"),
]:
    register(_entry)


def build_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override the entry's defaults."""
    try:
        entry = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}") from None
    return build_from_spec(entry.family, {**entry.kwargs, **overrides})


def build_from_spec(family: str, kwargs: dict[str, Any]) -> nn.Module:
    """Rebuild any model from its family and full arguments (what a checkpoint records)."""
    if family not in FAMILIES:
        raise KeyError(f"unknown model family {family!r}; known families: {', '.join(sorted(FAMILIES))}")
    try:
        return FAMILIES[family](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model family {family!r}: {e}") from None


def model_spec(name: str, **overrides) -> dict[str, Any]:
    """The JSON-able description of a model: enough to rebuild it without the registry entry."""
    entry = MODELS[name]
    kwargs = {**entry.kwargs, **overrides}
    return {"name": name, "family": entry.family, "kwargs": _jsonable(kwargs), "channels_last": entry.channels_last}


def _jsonable(obj):
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: nn.Module, input_shape=(1, 1, 28, 28)) -> list[dict[str, Any]]:
    """Per-layer output shapes and parameter counts (what Keras' summary shows)."""
    rows: list[dict[str, Any]] = []
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue

        def hook(mod, inp, out, name=name):
            shape = tuple(out[0].shape) if isinstance(out, tuple) else tuple(out.shape)
            own = list(mod.parameters(recurse=False))
            rows.append({"layer": name, "type": type(mod).__name__, "output_shape": list(shape[1:]),
                         "params": sum(p.numel() for p in own),
                         "trainable": sum(p.numel() for p in own if p.requires_grad)})
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


# The record families (fast and best) live in their own module and register themselves here.
from . import resnets as _resnets  # noqa: E402,F401
