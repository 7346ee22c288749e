"""The classic families and the reference studies' nets: MLP, ConvNet (the CNNs and VGG) and RNN.

Each registry entry is a row of data over a family: the layer sizes the study describes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..device import cpu_has_bf16
from ._registry import ModelEntry, register, register_family
from .layers import FASHION_MEAN, FASHION_STD, Normalize, dense_head, pool2d


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
                    layers += [pool2d(pool), nn.ReLU(inplace=True)]
                    side //= 2
                else:
                    layers.append(nn.ReLU(inplace=True))
                    if dropout and last:
                        layers.append(nn.Dropout(dropout))
                    if last and pool in ("max", "avg"):
                        layers.append(pool2d(pool))
                        side //= 2
            if side < 1:
                raise ValueError(f"input of side {resize or 28} is too small for {len(channels)} blocks with kernel {kernel}")
        layers.append(nn.Flatten())
        layers += dense_head(c_in * side * side, dense, head_dropout, num_classes)
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


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
        if _emulated_bf16_autocast(seq):
            # oneDNN has no bf16 LSTM/GRU kernel on CPUs without AVX-512 BF16 or AMX and refuses to run;
            # there the recurrent part runs in float32 (bf16 would only be emulated, and slower).
            with torch.autocast("cpu", enabled=False):
                out, _ = self.rnn(seq.float())
        else:
            out, _ = self.rnn(seq)
        return self.head(out[:, -1])


def _emulated_bf16_autocast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not cpu_has_bf16()


register_family("mlp", MLP)
register_family("convnet", ConvNet)
register_family("rnn", RNN)

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
