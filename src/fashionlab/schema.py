"""What a run folder's files may hold, checked before anything is built or loaded from them.

A run folder may come from anywhere (a colleague, a download, a damaged disk), so every reader goes
through this module: RunFolder's properties (config.json, history.jsonl, metrics.json, model.json)
and checkpoint.py's read_model and load_state (model.safetensors, checkpoint.safetensors). Each
check raises RunError with one line naming the file and the field, in the form the training settings
use (`FILE: FIELD=VALUE: expected WHAT`), so the CLI, the API and the service all say the same.

Bounds, so that a hostile file costs little to refuse:
- JSON files are read only up to MAX_JSON_BYTES and nested at most MAX_JSON_DEPTH deep;
- a model description is built on torch's meta device first (models.meta_model), within its limits
  on parameters, layers and layer sizes, and its class names must match its outputs;
- a safetensors file's header (names, dtypes, shapes) must match that model exactly before any of
  its data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import safe_open

from . import models
from .config import ConfigError, TrainConfig, check_setting, settings_of
from .errors import UserError
from .models._registry import meta_model as build_on_meta

MAX_JSON_BYTES = 4 << 20  # metrics.json of 500 classes (its confusion matrix) fits; a run's others are KB
MAX_JSON_DEPTH = 32  # the deepest a run's own JSON goes is 5
SHOWN = 60  # characters of a bad value quoted in a message


class RunError(UserError):
    """A run folder is missing a file or holds one that cannot be read."""


# --------------------------------------------------------------------------- JSON, bounded

def read_json(path: Path) -> Any:
    """A run's JSON file, refused (RunError naming it) when missing, too large, too deep or not JSON."""
    path = _regular_file(path)
    with open(path, "rb") as fh:
        raw = fh.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise RunError(f"{path}: larger than {MAX_JSON_BYTES:,} bytes; not a file a run writes")
    return parse_json(raw, str(path))


def _regular_file(path: Path) -> Path:
    """path, when it is a regular file (not a folder, a device such as /dev/zero or a pipe)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: {'not a regular file' if path.exists() else 'file not found'}")
    return path


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON text (a file, a line of one, a metadata entry) nested at most MAX_JSON_DEPTH deep."""
    try:
        obj = json.loads(text)
    except RecursionError:  # the parser recurses per level: a file nested 200,000 deep ends here
        raise RunError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels; not a file a run writes") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise RunError(f"{where}: not valid JSON ({e})") from None
    if _depth(obj) > MAX_JSON_DEPTH:  # shallower than the parser's limit, still deeper than any reader goes
        raise RunError(f"{where}: nested deeper than {MAX_JSON_DEPTH} levels; not a file a run writes")
    return obj


def _depth(obj: Any) -> int:
    """How deep lists and objects nest (iteratively: the value may be as deep as the parser allowed)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


# --------------------------------------------------------------------------- values

def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    return _is_int(v) and v >= 0


def _non_negative(v: Any) -> bool:
    return _is_number(v) and v >= 0


def _non_negative_or_nan(v: Any) -> bool:  # a diverged run's loss is NaN or infinite, and still its record
    return _is_number(v) and (math.isnan(v) or v >= 0)


def _fraction(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _fraction_or_nan(v: Any) -> bool:
    return _is_number(v) and (math.isnan(v) or 0 <= v <= 1)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and all(check(x) for x in v)


def _object(v: Any) -> bool:
    return isinstance(v, dict)


def _text(v: Any) -> bool:
    return isinstance(v, str)


# A table of fields: name -> (check, what it accepts in words, required).
Fields = dict[str, tuple[Callable[[Any], bool], str, bool]]


def check_fields(obj: Any, fields: Fields, where: str, prefix: str = "") -> dict[str, Any]:
    """obj must be an object whose fields pass their checks; returns it. RunError names the first that fails."""
    if not isinstance(obj, dict):
        field = f"{prefix.rstrip('.')}={_shown(obj)}: " if prefix else ""
        raise RunError(f"{where}: {field}expected a JSON object, got {_kind(obj)}")
    for name, (check, expected, required) in fields.items():
        if name not in obj:
            if required:
                raise RunError(f"{where}: {prefix}{name} is missing; expected {expected}")
            continue
        if not check(obj[name]):
            raise RunError(f"{where}: {prefix}{name}={_shown(obj[name])}: expected {expected}")
    return obj


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true or false", type(None): "null", dict: "an object"}.get(
        type(value), "a number")


def _class_names(v: Any) -> bool:
    return (isinstance(v, list) and bool(v) and all(isinstance(n, str) and n.strip() and n.isprintable() for n in v)
            and len(set(v)) == len(v))


CLASS_NAMES = (_class_names, "a list of distinct, non-empty, printable strings", True)


def check_class_names(names: Any, where: str) -> list[str]:
    """Class names as a run records them (model.json, an exported model's metadata)."""
    return check_fields({"class_names": names}, {"class_names": CLASS_NAMES}, where)["class_names"]


# --------------------------------------------------------------------------- model.json

ARCHITECTURE: Fields = {
    "name": (_text, "the model's name (a string)", True),
    "family": (_text, "a model family's name (a string)", True),
    "kwargs": (_object, "an object of the family's arguments", True),
    "channels_last": (lambda v: isinstance(v, bool), "true or false", False),
}
MODEL_INFO: Fields = {
    "architecture": (_object, "an object with name, family and kwargs", True),
    "class_names": CLASS_NAMES,
    "input": (_object, "an object", False),
    "versions": (_object, "an object", False),
}
# model.json's fields that are training settings, checked as the settings table checks them
MODEL_SETTINGS = ("precision", "tta_flip", "tta_shift")


def model_info(obj: Any, where: str) -> dict[str, Any]:
    """model.json's fields (types and ranges); what the architecture builds is checked by meta_model."""
    check_fields(obj, MODEL_INFO, where)
    check_fields(obj["architecture"], ARCHITECTURE, where, "architecture.")
    family = obj["architecture"]["family"]
    if family not in models.FAMILIES:
        raise RunError(f"{where}: architecture.family={_shown(family)}: expected one of "
                       f"{', '.join(sorted(models.FAMILIES))}")
    normalisation = obj.get("input", {}).get("normalisation", {})
    if not isinstance(normalisation, dict):
        raise RunError(f"{where}: input.normalisation={_shown(normalisation)}: expected an object")
    for name in MODEL_SETTINGS:
        if name in obj:
            try:
                check_setting(name, obj[name])
            except ConfigError as e:
                raise RunError(f"{where}: {e}") from None
    return obj


def meta_model(info: dict[str, Any], where: str) -> torch.nn.Module:
    """model.json's architecture built on the meta device, within the size limits, with as many outputs as
    class names: what the weights must fit. RunError names the file and why it was refused."""
    arch = info["architecture"]
    try:
        model, outputs = build_on_meta(arch["family"], arch["kwargs"])
    except ValueError as e:
        raise RunError(f"{where}: architecture {arch['name']!r} refused: {e}") from None
    if outputs != len(info["class_names"]):
        raise RunError(f"{where}: class_names has {len(info['class_names'])} names; architecture "
                       f"{arch['name']!r} has {outputs} outputs")
    return model


# --------------------------------------------------------------------------- safetensors files

# torch dtypes as a safetensors header names them
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_DTYPE_WORDS = {v: str(k).removeprefix("torch.") for k, v in _DTYPES.items()}

Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (dtype, shape), as the file declares them


def tensor_header(path: Path, what: str = "safetensors file") -> tuple[dict[str, str], Header]:
    """A safetensors file's metadata and its tensors' dtypes and shapes, read without reading any tensor."""
    path = _regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            header = {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise RunError(f"{path}: not a readable {what} ({e})") from None
    return meta, header


def expected_tensors(state: dict[str, torch.Tensor]) -> Header:
    """What a state dict's file header must declare (from a meta model: no data needed)."""
    return {k: (_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape)) for k, v in state.items()}


def compare_tensors(header: Header, expected: Header, where: str, needs: str, prefix: str = "") -> None:
    """The file's tensors (those under prefix) must be exactly the expected names, dtypes and shapes."""
    have = {k[len(prefix):]: v for k, v in header.items() if k.startswith(prefix)}
    missing, unexpected = _few(expected.keys() - have.keys(), prefix), _few(have.keys() - expected.keys(), prefix)
    if missing:
        raise RunError(f"{where}: tensor(s) {missing} missing; {needs} needs them")
    if unexpected:
        raise RunError(f"{where}: unexpected tensor(s) {unexpected}; {needs} has no such weights")
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = have[name]
        if got_shape != shape:
            raise RunError(f"{where}: tensor {prefix}{name} has shape {list(got_shape)}; {needs} needs {list(shape)}")
        if got_dtype != dtype:
            raise RunError(f"{where}: tensor {prefix}{name} is {_DTYPE_WORDS.get(got_dtype, got_dtype)}; "
                           f"expected {_DTYPE_WORDS.get(dtype, dtype)} as saved")


def _few(names: Iterable[str], prefix: str, shown: int = 3) -> str:
    names = sorted(names)
    listed = ", ".join(prefix + n for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_weights(path: Path, model: torch.nn.Module, description: Path) -> None:
    """model.safetensors must hold exactly the tensors of model.json's model (built on meta), as saved."""
    _, header = tensor_header(path)
    compare_tensors(header, expected_tensors(model.state_dict()), str(path),
                    f"the architecture in {Path(description).name}")


# --------------------------------------------------------------------------- checkpoint.safetensors

CHECKPOINT_METADATA = {"optimizer": "the optimiser's settings and state", "state": "the training progress"}


def check_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything a resume reads from a checkpoint, checked against the model and optimiser it is loaded
    into, before any tensor is read. Returns the optimiser's metadata and the training state."""
    where = str(path)
    meta, header = tensor_header(path, "checkpoint")
    for key, what in CHECKPOINT_METADATA.items():
        if key not in meta:
            raise RunError(f"{where}: metadata {key!r} is missing ({what}, which a resume needs)")
    opt_meta = parse_json(meta["optimizer"], f"{where}: metadata 'optimizer'")
    state = train_state(parse_json(meta["state"], f"{where}: metadata 'state'"), f"{where}: metadata 'state'")
    params = model.state_dict()
    compare_tensors(header, expected_tensors(params), where, "the model of config.json", "model.")
    _check_optimizer(opt_meta, header, optimizer, where)
    _check_extras(header, params, state, where)
    unknown = [k for k in header if not k.startswith(("model.", "optim.", "extra."))]
    if unknown:
        raise RunError(f"{where}: unexpected tensor(s) {_few(unknown, '')}")
    return opt_meta, state


def _check_optimizer(opt_meta: Any, header: Header, optimizer: torch.optim.Optimizer, where: str) -> None:
    """The optimiser's groups (same parameters, same settings' types) and per-parameter state tensors."""
    where_meta = f"{where}: metadata 'optimizer'"
    check_fields(opt_meta, {"param_groups": (_list_of(_object), "a list of objects", True),
                            "state": (_object, "an object of per-parameter states", True)}, where_meta)
    own = optimizer.state_dict()["param_groups"]
    groups = opt_meta["param_groups"]
    if len(groups) != len(own):
        raise RunError(f"{where_meta}: {len(groups)} parameter groups; the optimiser of config.json has {len(own)}")
    shapes = {}
    for i, (group, mine) in enumerate(zip(groups, own)):
        if group.get("params") != mine["params"]:
            raise RunError(f"{where_meta}: param_groups[{i}].params={_shown(group.get('params'))}: expected "
                           f"{_shown(mine['params'])}, the parameters of the model of config.json")
        for key, value in mine.items():  # a setting torch added since the save is missing: torch fills it in
            if key in group and not _same_kind(group[key], value):
                raise RunError(f"{where_meta}: param_groups[{i}].{key}={_shown(group[key])}: expected "
                               f"{_kind(value)} as {type(optimizer).__name__} has")
        shapes.update({pid: tuple(p.shape) for pid, p in zip(mine["params"], optimizer.param_groups[i]["params"])})
    for pid, pstate in opt_meta["state"].items():
        if not (pid.isdigit() and int(pid) in shapes and isinstance(pstate, dict)):
            raise RunError(f"{where_meta}: state[{pid!r}]: expected the state of one of parameters 0 to "
                           f"{len(shapes) - 1}")
        for name, value in pstate.items():
            if value == "tensor":
                _check_state_tensor(header, f"optim.{pid}.{name}", shapes[int(pid)], where)
            elif not _is_number(value) and not isinstance(value, bool) and value is not None:
                raise RunError(f"{where_meta}: state[{pid!r}].{name}={_shown(value)}: expected a number or a tensor")


def _same_kind(value: Any, like: Any) -> bool:
    """Whether a loaded optimiser setting has the type of the live one (JSON turns tuples into lists)."""
    if isinstance(like, bool) or like is None:  # switches such as foreach: unset (null) or true/false
        return isinstance(value, bool) or value is None
    if _is_number(like):
        return _is_number(value)
    if isinstance(like, (list, tuple)):
        return isinstance(value, list) and len(value) == len(like) and all(map(_same_kind, value, like))
    return isinstance(value, type(like))


def _check_state_tensor(header: Header, name: str, param_shape: tuple[int, ...], where: str) -> None:
    """An optimiser state tensor: floating point, the parameter's shape or a scalar (a step count)."""
    if name not in header:
        raise RunError(f"{where}: tensor {name} is missing; the optimiser's state needs it")
    dtype, shape = header[name]
    if dtype not in ("F32", "F64", "F16", "BF16") or shape not in (param_shape, ()):
        raise RunError(f"{where}: tensor {name} is {_DTYPE_WORDS.get(dtype, dtype)} {list(shape)}; expected "
                       f"floating point of shape {list(param_shape)} (or a scalar)")


def _check_extras(header: Header, params: dict[str, torch.Tensor], state: dict[str, Any], where: str) -> None:
    """The random states (the CPU's always, the epoch's after a mid-epoch stop) and any copies of the weights."""
    rng = ("U8", tuple(torch.get_rng_state().shape))
    needed = {"rng.cpu": "the random state", **({"rng.epoch": "a mid-epoch stop's random stream"}
                                                if state.get("partial") else {})}
    for name, what in needed.items():
        if f"extra.{name}" not in header:
            raise RunError(f"{where}: tensor extra.{name} is missing ({what}, which a resume needs)")
    for name in ("rng.cpu", "rng.epoch"):
        if f"extra.{name}" in header and header[f"extra.{name}"] != rng:
            dtype, shape = header[f"extra.{name}"]
            raise RunError(f"{where}: tensor extra.{name} is {_DTYPE_WORDS.get(dtype, dtype)} {list(shape)}; "
                           f"expected a random state (uint8 {list(rng[1])})")
    if "extra.rng.cuda" in header and (header["extra.rng.cuda"][0] != "U8" or len(header["extra.rng.cuda"][1]) != 1):
        raise RunError(f"{where}: tensor extra.rng.cuda: expected a random state (uint8, one dimension)")
    for copy, what in (("ema.", "the moving average of the weights"), ("best.", "the best epoch's weights")):
        if any(k.startswith("extra." + copy) for k in header):
            compare_tensors(header, expected_tensors(params), where, what, "extra." + copy)
    _check_per_image_extras(header, where)
    known = {"extra.rng.cpu", "extra.rng.epoch", "extra.rng.cuda",
             *(name for row in PER_IMAGE_EXTRAS for name in (row[0], row[3]))}
    unknown = [k for k in header if k.startswith("extra.") and k not in known
               and not k.startswith(("extra.ema.", "extra.best."))]
    if unknown:
        raise RunError(f"{where}: unexpected tensor(s) {_few(unknown, '')}")


# Per-image tensors a checkpoint may keep: the tensor, its dtype, what each entry is, and the bool
# tensor of the same shape that may come with it (hard-example epochs' losses and the epoch's choice;
# the stem cache's filled entries and the orientation each was computed from).
PER_IMAGE_EXTRAS = (("extra.hard.loss", "F32", "a loss per training image", "extra.hard.chosen"),
                    ("extra.stem.filled", "BOOL", "one per training image", "extra.stem.mirrored"))


def _check_per_image_extras(header: Header, where: str) -> None:
    for name, dtype, what, companion in PER_IMAGE_EXTRAS:
        main, extra = header.get(name), header.get(companion)
        if main is not None and (main[0] != dtype or len(main[1]) != 1):
            raise RunError(f"{where}: tensor {name} is {_DTYPE_WORDS.get(main[0], main[0])} {list(main[1])}; "
                           f"expected {_DTYPE_WORDS[dtype]} of one dimension ({what})")
        if extra is not None and (main is None or extra != ("BOOL", main[1])):
            raise RunError(f"{where}: tensor {companion} is {_DTYPE_WORDS.get(extra[0], extra[0])} "
                           f"{list(extra[1])}; expected bool of the shape of {name} (one per training image)")


def checkpoint_state(path: Path) -> dict[str, Any]:
    """A checkpoint's training state (epochs done, step, ...), checked, read from its header alone."""
    meta, _ = tensor_header(path, "checkpoint")
    if "state" not in meta:
        raise RunError(f"{path}: metadata 'state' is missing (the training state, which a resume needs)")
    return train_state(parse_json(meta["state"], f"{path}: metadata 'state'"), f"{path}: metadata 'state'")


def check_resume(path: Path, cfg) -> None:
    """What the run's settings (cfg, from config.json) make a resume read beyond what load_state checks
    against the model and optimiser: the moving average's weights (ema), the best epoch's (early
    stopping that restores them) and the images' losses (hard_fraction); without them training would
    go on silently from other weights or other images."""
    meta, header = tensor_header(path, "checkpoint")
    state = train_state(parse_json(meta["state"], f"{path}: metadata 'state'"), f"{path}: metadata 'state'") \
        if "state" in meta else {}
    needs = {"ema.": ("the moving average of the weights: config.json sets ema", bool(cfg.ema)),
             "best.": ("the best epoch's weights: config.json restores them",
                       cfg.patience is not None and cfg.restore_best and state.get("best_epoch") is not None),
             "hard.": ("each training image's last loss: config.json sets hard_fraction", cfg.hard_fraction < 1)}
    for prefix, (what, needed) in needs.items():
        if needed and not any(k.startswith("extra." + prefix) for k in header):
            raise RunError(f"{path}: tensors extra.{prefix}* are missing ({what})")


# --------------------------------------------------------------------------- progress: history and state

HISTORY_ROW: Fields = {
    "epoch": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", True),
    **{k: (_is_number, "a number", False) for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                                      "lr", "seconds", "images_per_s")},
}


def read_history(path: Path) -> list[dict[str, Any]]:
    """history.jsonl: one object per finished epoch ([] when the file is absent)."""
    path = Path(path)
    if not path.exists():
        return []
    if _regular_file(path).stat().st_size > MAX_JSON_BYTES:
        raise RunError(f"{path}: larger than {MAX_JSON_BYTES:,} bytes; not a file a run writes")
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            where = f"{path}: line {n}"
            rows.append(check_fields(parse_json(line, where), HISTORY_ROW, where))
    return rows


PARTIAL: Fields = {
    "step": (_count, "an integer >= 0", True), "seen": (_count, "an integer >= 0", True),
    "seconds": (_non_negative, "a number >= 0", True), "loss_sum": (_is_number, "a number", True),
    "correct": (_count, "an integer >= 0", True),
}
TRAIN_STATE: Fields = {
    "epoch": (_count, "an integer >= 0", True),
    "step": (_count, "an integer >= 0", True),
    "history": (_list_of(_object), "a list of epoch rows", True),
    "best": (_optional(_is_number), "a number or null", False),
    "best_epoch": (_optional(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null", False),
    "since_best": (_count, "an integer >= 0", False),
    "train_seconds": (_non_negative, "a number >= 0", False),
    "partial": (_optional(_object), "an object or null", False),
}


def train_state(obj: Any, where: str) -> dict[str, Any]:
    """A checkpoint's training state: the fields of training.TrainState, each of its type."""
    known = set(TRAIN_STATE)  # training.TrainState's fields (a test keeps the two in step; no import cycle)
    check_fields(obj, TRAIN_STATE, where)
    unknown = sorted(set(obj) - known)
    if unknown:
        raise RunError(f"{where}: unknown field(s) {', '.join(unknown)}; expected those of {', '.join(sorted(known))}")
    for i, row in enumerate(obj["history"]):
        check_fields(row, HISTORY_ROW, where, f"history[{i}].")
    if obj.get("partial"):
        check_fields(obj["partial"], PARTIAL, where, "partial.")
    return obj


# --------------------------------------------------------------------------- metrics.json

PER_CLASS_SCORES: Fields = {
    "precision": (_fraction, "a number from 0 to 1", True), "recall": (_fraction, "a number from 0 to 1", True),
    "f1": (_fraction, "a number from 0 to 1", True), "support": (_count, "an integer >= 0", True),
}
CONFUSED_PAIR: Fields = {"true": (_text, "a class name", True), "predicted": (_text, "a class name", True),
                         "count": (_count, "an integer >= 0", True)}
RELIABILITY_BIN: Fields = {k: (_fraction_or_nan, "a number from 0 to 1", True)
                           for k in ("lower", "upper", "accuracy", "confidence")}
RELIABILITY_BIN["count"] = (_count, "an integer >= 0", True)

METRICS: Fields = {
    # what the CLI, reports, comparisons and the notebook summary read
    "test_accuracy": (_fraction, "a number from 0 to 1", True),
    "test_loss": (_non_negative_or_nan, "a number >= 0", True),
    "per_class": (_object, "an object of per-class scores", True),
    "confusion_matrix": (_list_of(_list_of(_count)), "a square list of lists of counts", True),
    "params": (_count, "an integer >= 0", True),
    "train_seconds": (_non_negative, "a number >= 0", True),
    "epochs_run": (_count, "an integer >= 0", True),
    "warmup_seconds": (_non_negative, "a number >= 0", False),
    "most_confused": (_list_of(_object), "a list of confused pairs", False),
    "ece": (_fraction_or_nan, "a number from 0 to 1", False),
    "reliability": (_list_of(_object), "a list of bins", False),
    "best_epoch": (_optional(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null", False),
    "images_per_s": (_non_negative, "a number >= 0", False),
    "wall_seconds": (_non_negative, "a number >= 0", False),
    "num_test": (_count, "an integer >= 0", False),
    "seed": (_count, "an integer >= 0", False),
    **{k: (_optional(_text), "a string or null", False) for k in ("model", "recipe", "device", "precision")},
}


def metrics(obj: Any, where: str, class_names: list[str] | None = None) -> dict[str, Any]:
    """metrics.json: every value a reader uses, of its type and range; with class_names, per-class rows
    for exactly those classes."""
    check_fields(obj, METRICS, where)
    per_class, cm = obj["per_class"], obj["confusion_matrix"]
    for name, scores in per_class.items():
        check_fields(scores, PER_CLASS_SCORES, where, f"per_class.{name}.")
    if len(cm) != len(per_class) or any(len(row) != len(cm) for row in cm):
        raise RunError(f"{where}: confusion_matrix: expected {len(per_class)} rows of {len(per_class)} counts "
                       f"(one per class of per_class)")
    for i, pair in enumerate(obj.get("most_confused", [])):
        check_fields(pair, CONFUSED_PAIR, where, f"most_confused[{i}].")
    for i, b in enumerate(obj.get("reliability", [])):
        check_fields(b, RELIABILITY_BIN, where, f"reliability[{i}].")
    if class_names is not None and list(per_class) != list(class_names):
        raise RunError(f"{where}: per_class has classes {_shown(list(per_class))}; the run's are "
                       f"{_shown(list(class_names))}")
    return obj


# --------------------------------------------------------------------------- config.json

RECORD: Fields = {
    "environment": (_object, "an object", False),
    "data": (lambda v: isinstance(v, dict) and all(_optional(_text)(x) for x in v.values()),
             "an object of strings", False),
    "split": (lambda v: isinstance(v, dict) and all(_count(x) for x in v.values()),
              "an object of image counts", False),
}


def record(obj: Any, where: str) -> dict[str, Any]:
    """config.json as written: an object, with the environment, data and split a report shows."""
    return check_fields(obj, RECORD, where)


def train_config(saved: dict[str, Any], where: str) -> TrainConfig:
    """The training settings of a config.json, validated as `train` validates them (config.TrainConfig)."""
    try:
        cfg = TrainConfig.from_dict(settings_of(saved))
        # The recorded device need only be a valid name here: a run trained on a GPU is still read
        # (evaluated, reported, served) on a machine without one.
        check_setting("device", cfg.device)
        dataclasses.replace(cfg, device="auto").validate()
    except ConfigError as e:
        raise RunError(f"{where}: {e}") from None
    return cfg



# --------------------------------------------------------------------------- ood.safetensors

MAX_OOD_FEATURES = 4096  # the precision matrix's side is one more: 128 MiB of float64 at most
MAX_OOD_CLASSES = 1000
OOD_METADATA = "fashionlab_ood"  # the metadata entry holding the threshold and its calibration
OOD_TENSORS = ("means", "precision")


def _finite_number(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _open_fraction(v: Any) -> bool:
    return _is_number(v) and 0 < v < 1


OOD_INFO: Fields = {
    "threshold": (lambda v: _finite_number(v) and v >= 0, "a finite number >= 0", True),
    "false_alarm_rate": (_open_fraction, "a number between 0 and 1 (exclusive)", True),
    "feature_size": (lambda v: _is_int(v) and 1 <= v <= MAX_OOD_FEATURES, f"an integer from 1 to {MAX_OOD_FEATURES}",
                     True),
    "calibrated_on": (_text, "a string", True),
    "calibration_images": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", True),
    "fit_images": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", True),
    "calibration_false_alarm_rate": (_optional(_fraction), "a number from 0 to 1 or null", False),
    "measured_false_alarm_rate": (_optional(_fraction), "a number from 0 to 1 or null", False),
    "measured_on": (_optional(_text), "a string or null", False),
    "measured_images": (_count, "an integer >= 0", False),
    "ridge": (_non_negative, "a number >= 0", False),
    "seed": (_count, "an integer >= 0", False),
    "score": (_text, "a string", False),
    "model_sha256": (_optional(_text), "a string or null", False),
    "precision": (_optional(_text), "a string or null", False),
}


def ood_file(path: Path, feature_size: int | None = None, num_classes: int | None = None
             ) -> tuple[Any, Any, dict[str, Any]]:
    """ood.safetensors, checked before and after its tensors are read: the metadata's fields; exactly the
    tensors means (K, D + 1) and precision (D + 1, D + 1), float64 (ood.embed adds one to the features),
    D the feature size the model's last layer takes (when given) and K at most its classes, both bounded
    before anything is read; then finite values and a symmetric, positive definite precision matrix.
    Returns (means, precision, metadata) as numpy."""
    import numpy as np
    where = str(path)
    meta, header = tensor_header(path, "out-of-distribution file")
    if OOD_METADATA not in meta:
        raise RunError(f"{where}: metadata {OOD_METADATA!r} is missing (the threshold and its calibration)")
    info = check_fields(parse_json(meta[OOD_METADATA], f"{where}: metadata {OOD_METADATA!r}"), OOD_INFO,
                        f"{where}: metadata {OOD_METADATA!r}")
    size = info["feature_size"]
    if feature_size is not None and size != feature_size:
        raise RunError(f"{where}: feature_size={size}: the model's last layer takes {feature_size} features; "
                       f"the file belongs to another model (calibrate this run again)")
    unexpected = sorted(set(header) - set(OOD_TENSORS))
    if unexpected:
        raise RunError(f"{where}: unexpected tensor(s) {_few(unexpected, '')}; expected {', '.join(OOD_TENSORS)}")
    classes_allowed = min(MAX_OOD_CLASSES, num_classes or MAX_OOD_CLASSES)
    shapes = {"means": "(classes, feature_size + 1)", "precision": "(feature_size + 1, feature_size + 1)"}
    for name in OOD_TENSORS:
        if name not in header:
            raise RunError(f"{where}: tensor {name} is missing; expected float64 of shape {shapes[name]}")
        dtype, shape = header[name]
        wanted = (size + 1, size + 1) if name == "precision" else (shape[0] if shape else 0, size + 1)
        too_many = name == "means" and not 1 <= shape[0] <= classes_allowed
        if dtype != "F64" or len(shape) != 2 or shape != wanted or too_many:
            raise RunError(f"{where}: tensor {name} is {_DTYPE_WORDS.get(dtype, dtype)} {list(shape)}; expected "
                           f"float64 of shape {shapes[name]} with feature_size {size} and 1 to {classes_allowed} "
                           f"classes")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            means, precision = fh.get_tensor("means"), fh.get_tensor("precision")
    except Exception as e:  # safetensors raises its own error types
        raise RunError(f"{where}: not a readable out-of-distribution file ({e})") from None
    if not (np.isfinite(means).all() and np.isfinite(precision).all()):
        raise RunError(f"{where}: tensors hold NaN or infinite values; expected finite means and precision")
    if not np.array_equal(precision, precision.T):
        raise RunError(f"{where}: tensor precision is not symmetric; expected the inverse of a covariance matrix")
    try:
        np.linalg.cholesky(precision)
    except np.linalg.LinAlgError:
        raise RunError(f"{where}: tensor precision is not positive definite; expected the inverse of a covariance "
                       f"matrix") from None
    return means, precision, info


# --------------------------------------------------------------------------- calibration.json

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0  # calibration.py searches the same range
MAX_BINS = 100  # of a reliability diagram


def _reliability_bins(v: Any) -> bool:
    return isinstance(v, list) and 1 <= len(v) <= MAX_BINS


CALIBRATION: Fields = {
    "temperature": (lambda v: _finite_number(v) and MIN_TEMPERATURE <= v <= MAX_TEMPERATURE,
                    f"a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g}", True),
    "fitted_on": (_text, "a string (the held-out images the temperature was fitted on)", True),
    "fit_images": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", True),
    "measured_on": (_text, "a string", True),
    "measured_images": (_count, "an integer >= 0", True),
    "ece_before": (_fraction, "a number from 0 to 1", True),
    "ece_after": (_fraction, "a number from 0 to 1", True),
    **{k: (_optional(lambda v: _finite_number(v) and v >= 0), "a finite number >= 0 or null", False)
       for k in ("nll_before", "nll_after", "fit_nll_before", "fit_nll_after")},
    "reliability_before": (_reliability_bins, f"a list of 1 to {MAX_BINS} reliability bins", False),
    "reliability_after": (_reliability_bins, f"a list of 1 to {MAX_BINS} reliability bins", False),
    "bins": (lambda v: _is_int(v) and 1 <= v <= MAX_BINS, f"an integer from 1 to {MAX_BINS}", False),
    "method": (_text, "a string", False),
    "model_sha256": (_optional(_text), "a string or null", False),
    "precision": (_optional(_text), "a string or null", False),
}


def calibration(obj: Any, where: str) -> dict[str, Any]:
    """calibration.json: the temperature (in the range a fit gives) and how it was fitted and measured."""
    check_fields(obj, CALIBRATION, where)
    for key in ("reliability_before", "reliability_after"):
        for i, b in enumerate(obj.get(key, [])):
            check_fields(b, RELIABILITY_BIN, where, f"{key}[{i}].")
    return obj


# --------------------------------------------------------------------------- robustness.json

MAX_CORRUPTIONS = 64
MAX_SEVERITIES = 10
SCORES: Fields = {
    "accuracy": (_fraction, "a number from 0 to 1", True),
    "ece": (_fraction, "a number from 0 to 1", True),
    "unsure": (_optional(_fraction), "a number from 0 to 1 or null (no out-of-distribution detector)", True),
}
SEVERITY_SCORES: Fields = {
    "severity": (lambda v: _is_int(v) and 1 <= v <= MAX_SEVERITIES, f"an integer from 1 to {MAX_SEVERITIES}", True),
    **SCORES,
}


def _name(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64 and v.isprintable()


ROBUSTNESS: Fields = {
    "images": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", True),
    "measured_on": (_text, "a string", True),
    "clean": (_object, "an object of accuracy, ece and unsure", True),
    "results": (lambda v: isinstance(v, dict) and 1 <= len(v) <= MAX_CORRUPTIONS and all(map(_name, v)),
                f"an object of 1 to {MAX_CORRUPTIONS} corruptions (printable names of at most 64 characters)", True),
    "mean_corruption_accuracy": (_fraction, "a number from 0 to 1", True),
    "mean_corruption_ece": (_fraction, "a number from 0 to 1", True),
    "mean_corruption_unsure": (_optional(_fraction), "a number from 0 to 1 or null", True),
    "temperature": (_optional(lambda v: _finite_number(v) and MIN_TEMPERATURE <= v <= MAX_TEMPERATURE),
                    f"a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE:g} or null", False),
    "severities": (lambda v: _is_int(v) and 1 <= v <= MAX_SEVERITIES, f"an integer from 1 to {MAX_SEVERITIES}", False),
    "seed": (_count, "an integer >= 0", False),
    "model_sha256": (_optional(_text), "a string or null", False),
    "precision": (_optional(_text), "a string or null", False),
}


def robustness(obj: Any, where: str) -> dict[str, Any]:
    """robustness.json: the clean scores and, per corruption, one row of scores per severity."""
    check_fields(obj, ROBUSTNESS, where)
    check_fields(obj["clean"], SCORES, where, "clean.")
    for name, rows in obj["results"].items():
        if not (isinstance(rows, list) and 1 <= len(rows) <= MAX_SEVERITIES):
            raise RunError(f"{where}: results.{name}={_shown(rows)}: expected a list of 1 to {MAX_SEVERITIES} rows "
                           f"(one per severity)")
        for i, row in enumerate(rows):
            check_fields(row, SEVERITY_SCORES, where, f"results.{name}[{i}].")
    return obj
