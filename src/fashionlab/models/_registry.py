"""The registry's tables and the functions over them: no architecture lives here.

Families (classic.py, records.py) import this module and register themselves; this module imports
none of them, so the registry can never be half-initialised by an import cycle.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ..errors import ArgumentError, UnknownNameError


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
        raise UnknownNameError(f"unknown model {name!r}; registered models: {', '.join(sorted(MODELS))}") from None
    try:
        return build_from_spec(entry.family, {**entry.kwargs, **overrides})
    except ArgumentError as e:
        raise ArgumentError(f"model {name!r}: {e}") from None  # the name the caller gave, beside its family


def build_from_spec(family: str, kwargs: dict[str, Any]) -> nn.Module:
    """Rebuild any model from its family and full arguments (what a checkpoint records)."""
    if not isinstance(family, str) or family not in FAMILIES:
        raise UnknownNameError(f"unknown model family {family!r}; known families: {', '.join(sorted(FAMILIES))}")
    builder = FAMILIES[family]
    unknown, valid = _unknown_arguments(builder, kwargs)
    if unknown:
        # Checked before building so a typo is named with the valid spellings, not as Python's bare TypeError.
        raise ArgumentError(f"bad arguments for model family {family!r}: unknown argument(s) {', '.join(unknown)}; "
                         f"valid arguments: {', '.join(valid)}")
    try:
        return builder(**kwargs)
    except Exception as e:
        # Whatever a builder trips over (a missing argument's TypeError, a negative size's RuntimeError, a
        # range's ValueError) is a bad argument: callers catch ValueError for all of them.
        raise ArgumentError(f"bad arguments for model family {family!r}: {e}") from None


# Limits on a model rebuilt from a description someone else may have written (a run's model.json): generous
# beside the registry's largest (wrn16_4: 2.7 million parameters in 70 tensors, 50,176 values per image in
# its largest layer output), and checked without memory, so refusing costs next to nothing.
MAX_PARAMS = 100_000_000
MAX_PARAM_TENSORS = 4096  # bounds the time a builder's loops can take before the parameter count is known
MAX_LAYER_VALUES = 16_000_000  # one layer's output for one image: 64 MB in float32
IMAGE_SHAPE = (1, 28, 28)  # what every model takes per image


def meta_model(family: str, kwargs: dict[str, Any], side: int | None = None) -> tuple[nn.Module, int]:
    """Build a description on torch's meta device (shapes and dtypes only: no memory, no initialisation)
    and run an empty batch of images (`side` pixels square, full size by default: smaller for progressive
    resizing) through a
    copy of it. Returns the meta model and its number of outputs (classes); ValueError when it cannot be
    built or run, or exceeds the limits above, with the figure that does."""
    with _tensor_budget(MAX_PARAM_TENSORS), torch.device("meta"):
        model = build_from_spec(family, kwargs)
    params = count_params(model)
    if params > MAX_PARAMS:
        raise ValueError(f"{params:,} parameters; the limit is {MAX_PARAMS:,}")
    side = side or IMAGE_SHAPE[-1]
    shape = (IMAGE_SHAPE[0], side, side)
    (values, layer), out = _probe(_hollow_copy(model), shape)
    if values > MAX_LAYER_VALUES:
        raise ValueError(f"layer {layer or 'output'} gives {values:,} values per image; the limit is "
                         f"{MAX_LAYER_VALUES:,}")
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = ["N", *out.shape[1:]] if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"gives {got} for images of shape [N, {', '.join(map(str, shape))}]; "
                         f"expected logits of shape [N, classes]")
    return model, int(out.shape[1])


def _hollow_copy(model: nn.Module) -> nn.Module:
    """A CPU copy of a meta model with uninitialised weights (memory reserved, never written).

    torch's own Module.to_empty would do, but it loads torch's Python meta kernels (about 500 modules,
    a second or more), which would slow every command that loads a run."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:  # setattr, so that modules keeping their own lists (LSTM) see the new tensor
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad))
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
    return twin


def _probe(model: nn.Module, shape: tuple[int, int, int]) -> tuple[tuple[int, str], Any]:
    """An empty batch through the model: every layer's output shape without computing anything. Returns
    the largest layer output per image (values, layer name) and the model's output."""
    largest = [(0, "")]

    def record(name):
        def hook(module, inputs, output):
            values = math.prod(output.shape[1:]) if isinstance(output, torch.Tensor) else 0
            if values > largest[0][0]:
                largest[0] = (values, name)
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((0, *shape)))
    except Exception as e:  # e.g. a kernel larger than what is left of the image
        raise ValueError(f"cannot classify images of shape [N, {', '.join(map(str, shape))}]: {e}") from None
    finally:
        for h in handles:
            h.remove()
    return largest[0], out


_budget = threading.local()


@contextmanager
def _tensor_budget(limit: int):
    """Stop building (ValueError) once this thread's builder has created `limit` parameter tensors:
    a description asking for millions of layers is refused in a fraction of a second."""
    def count(module, name, param):
        if getattr(_budget, "left", None) is None:
            return None  # another thread's build
        _budget.left -= 1
        if _budget.left < 0:
            raise ValueError(f"more than {limit:,} parameter tensors")
        return None

    _budget.left = limit
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(count)
    try:
        yield
    finally:
        handle.remove()
        _budget.left = None


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
