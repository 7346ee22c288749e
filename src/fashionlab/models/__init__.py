"""The model registry: every architecture by name, each a row of data over a few families.

Contract shared by every model: input is a float tensor of pixels in [0, 1] with shape
(N, 1, 28, 28); output is (N, num_classes) logits. Input normalisation (and any resize a
recipe asks for) happens inside the model, so serving, export and explanations need no
preprocessing knowledge beyond "divide bytes by 255".

Layout: _registry holds the tables and the functions over them and imports no family;
layers holds the shared building blocks; classic (the reference studies' nets) and records
(the speed and accuracy records' nets) each define families and register their rows. The family
modules import only _registry and layers, which import no module of this package, so the imports
form no cycle (tests/test_models.py checks it).
"""

from __future__ import annotations

from ._registry import (FAMILIES, MODELS, ModelEntry, build_from_spec, build_model, count_params, count_trainable,
                        list_models, model_spec, register, register_family, summary)
from .layers import FASHION_MEAN, FASHION_STD, Normalize, dense_head, pool2d

# Imported for their registrations, in this order: it is the order of MODELS (and so of
# `fashionlab models`, study defaults and benchmarks).
from . import classic, records  # noqa: F401
from .classic import MLP, RNN, ConvNet
from .records import FastNet, PreActBlock, ResNet, wide_resnet_blocks

__all__ = [
    "FAMILIES", "MODELS", "ModelEntry", "build_from_spec", "build_model", "count_params", "count_trainable",
    "list_models", "model_spec", "register", "register_family", "summary",
    "FASHION_MEAN", "FASHION_STD", "Normalize", "dense_head", "pool2d",
    "MLP", "ConvNet", "RNN", "FastNet", "PreActBlock", "ResNet", "wide_resnet_blocks",
]
