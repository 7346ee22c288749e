"""The registry's tables and the functions over them: no architecture lives here.

Families (classic.py, records.py) import this module and register themselves; this module imports
none of them, so the registry can never be half-initialised by an import cycle.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    origin: str = ""
    channels_last: bool = True  # whether conv layers benefit from NHWC memory layout


# Insertion order is meaningful: `fashionlab models`, studies and benchmarks list models in it.
FAMILIES: dict[str, Callable[..., nn.Module]] = {}
MODELS: dict[str, ModelEntry] = {}


def register_family(name: str, builder: Callable[..., nn.Module]) -> None:
    FAMILIES[name] = builder


def register(entry: ModelEntry) -> ModelEntry:
    if entry.family not in FAMILIES:
        raise ValueError(f"model {entry.name!r}: unknown family {entry.family!r}")
    MODELS[entry.name] = entry
    return entry


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
    builder = FAMILIES[family]
    unknown, valid = _unknown_arguments(builder, kwargs)
    if unknown:
        # Checked before building so a typo is named with the valid spellings, not as Python's bare TypeError.
        raise ValueError(f"bad arguments for model family {family!r}: unknown argument(s) {', '.join(unknown)}; "
                         f"valid arguments: {', '.join(valid)}")
    try:
        return builder(**kwargs)
    except TypeError as e:  # e.g. a missing required argument: callers catch ValueError for any bad argument
        raise ValueError(f"bad arguments for model family {family!r}: {e}") from None


def _unknown_arguments(builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The keywords the builder does not accept (sorted) and those it does (in signature order)."""
    params = inspect.signature(builder).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return [], []  # a **kwargs builder accepts anything; let it judge for itself
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return sorted(set(kwargs) - set(valid)), valid


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


def count_trainable(model: nn.Module) -> int:
    """Parameters training updates: frozen layers (FastNet's whitening filters) excluded."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def list_models() -> list[dict[str, Any]]:
    """One row per registered model, in registration order: what `fashionlab models` prints.

    Each model is built to count its parameters, so the counts cannot drift from the architecture
    the way a hand-written table can."""
    rows = []
    # Building draws initial weights from the global generator: listing must not shift the
    # weights of a model the caller builds next under its own seed.
    with torch.random.fork_rng(devices=[]):
        for name, entry in MODELS.items():
            model = build_model(name)
            rows.append({"name": name, "family": entry.family, "params": count_params(model),
                         "trainable": count_trainable(model), "origin": entry.origin})
    return rows


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
