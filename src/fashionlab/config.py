"""Every training setting, declared once: its default, its help text and the values it accepts.

`TrainConfig` is the single table. The `train` command's flags, the README's flag table and the
validation that runs before anything is written all come from the declarations below, so a new
setting is one line here and nowhere else. Recipes (recipes.py) are named sets of these settings.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import reprlib
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable

from . import device as device_mod
from .errors import UserError
from .recipes import get_recipe

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
MONITORS = ("val_accuracy", "val_loss")
DATASETS = ("fashion-mnist",)

# Groups order the `train --help` output and the README table.
GROUPS = ("model", "optimisation", "schedule", "validation", "regularisation", "evaluation", "data", "runtime")


class ConfigError(UserError, ValueError):
    """A training setting with a wrong name, type or value; the message names it and what it accepts."""


def setting(default: Any = None, help: str = "", *, group: str, choices: tuple | Callable[[], tuple] | None = None,
            check: Callable[[Any], bool] | None = None, expected: str = "",
            validator: Callable[[Any], Any] | None = None, flag: str | None = None, metavar: str | None = None,
            cli_type: str | None = None) -> Any:
    """A TrainConfig field with what the CLI, the README and validation need to know about it.

    check/expected: a predicate on a present value and the words for what it accepts.
    validator: for a structured value, a function raising ValueError that says which part is wrong.
    choices: allowed values (or a function returning them, for registries filled at import time).
    cli_type: "keyvalues" for dict settings given as K=V,..., "names" for comma lists or a file.
    """
    meta = dict(help=help, group=group, choices=choices, check=check, expected=expected, validator=validator,
                flag=flag, metavar=metavar, cli_type=cli_type)
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _model_names() -> tuple[str, ...]:
    from . import models  # the registry fills at import time; imported late so config stays light
    return tuple(models.MODELS)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _fraction(v) -> bool:
    return 0 <= v < 1


def _ascending_indices(v) -> bool:
    # Sorted and distinct, so one set of images has one spelling in config.json and "the same settings"
    # compares sets, not orders.
    return len(v) >= 1 and v[0] >= 0 and all(a < b for a, b in zip(v, v[1:]))


def _distinct_names(v) -> bool:
    # Two classes of one name would be one row of the per-class scores and one label for two outputs.
    return len(v) >= 2 and len(set(v)) == len(v) and all(n.strip() for n in v)


def _augment(settings: dict):
    """The augmentation these settings describe; ValueError names a bad one. Imported here, on first use:
    augment.py holds the tensor ops (torch), and this table must load without torch (the command line)."""
    from .augment import Augment
    return Augment.from_dict(settings)


# Per-epoch generators are seeded with seed * 1_000_003 + epoch, which must fit torch's 64 bits.
MAX_SEED = 2**32 - 1


@dataclass
class TrainConfig:
    """Every training setting with its default. Build one with make_config (recipe, then overrides,
    validated); each field's metadata holds its help text, group and allowed values."""

    # ---- model
    model: str = setting("cnn", "registered model name (see `fashionlab models`)", group="model",
                         choices=_model_names, metavar="NAME")
    model_args: dict[str, Any] = setting({}, "override the model's arguments, e.g. dropout=0.3,channels=[16,32]",
                                         group="model", flag="--model-arg", metavar="K=V,...", cli_type="keyvalues")
    recipe: str | None = setting(None, "named preset (see `fashionlab recipes`); explicit settings override it",
                                 group="model", metavar="NAME")
    # ---- optimisation
    epochs: int = setting(10, "passes over the training images", group="optimisation",
                          check=_positive_int, expected="an integer >= 1")
    hard_fraction: float = setting(1.0, "after the first epoch, train each epoch on this fraction of the training "
                                   "images: those whose loss was highest when last trained on (1 = all; "
                                   "hard_examples.py)", group="optimisation",
                                   check=lambda v: 0 < v <= 1, expected="a fraction in (0, 1]", metavar="FRACTION")
    batch_size: int = setting(128, "training images per step", group="optimisation",
                              check=_positive_int, expected="an integer >= 1")
    lr: float = setting(1e-3, "peak learning rate", group="optimisation",
                        check=lambda v: v > 0 and math.isfinite(v), expected="a positive number")
    optimizer: str = setting("adam", "optimiser (weight decay is left off biases and normalisation)",
                             group="optimisation", choices=OPTIMIZERS)
    momentum: float = setting(0.9, "SGD momentum", group="optimisation", check=_fraction,
                              expected="a number in [0, 1)")
    nesterov: bool = setting(False, "Nesterov momentum (SGD)", group="optimisation")
    weight_decay: float = setting(0.0, "L2 weight decay on weights (decoupled for adamw)", group="optimisation",
                                  check=lambda v: v >= 0 and math.isfinite(v), expected="a number >= 0")
    # ---- schedule
    schedule: str = setting("constant", "learning-rate schedule after warm-up", group="schedule", choices=SCHEDULES)
    warmup_epochs: float = setting(0.0, "epochs of linear warm-up (onecycle: a quarter of the run when 0)",
                                   group="schedule", check=lambda v: 0 <= v < math.inf, expected="a finite number >= 0")
    resize_from: int = setting(0, "progressive resizing: the first epoch trains on images resized to PIXELS a side, "
                               "growing to 28 by resize_until of the run; evaluation stays at 28 (0 = off; "
                               "progressive.py)", group="schedule",
                               check=lambda v: v == 0 or 8 <= v < 28,
                               expected="0 (off) or an integer from 8 to 27 (pixels)", metavar="PIXELS")
    resize_until: float = setting(0.75, "with resize_from: the fraction of the run by which the training images are "
                                  "back to full size", group="schedule", check=lambda v: 0 < v <= 1,
                                  expected="a fraction in (0, 1]", metavar="FRACTION")
    # ---- validation and early stopping
    val_split: float = setting(0.1, "fraction of training images held out for validation (stratified)",
                               group="validation", check=_fraction, expected="a fraction in [0, 1)")
    patience: int | None = setting(None, "early stopping after this many epochs without improvement",
                                   group="validation", check=_positive_int, expected="an integer >= 1")
    monitor: str = setting("val_accuracy", "what early stopping and best-epoch selection watch",
                           group="validation", choices=MONITORS)
    restore_best: bool = setting(True, "with --patience: keep the best epoch's weights, not the last",
                                 group="validation")
    # ---- regularisation
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy", group="regularisation",
                                     check=_fraction, expected="a fraction in [0, 1)")
    augment: dict[str, Any] = setting({}, "batch augmentation, e.g. flip=0.5,crop=2,rotate=10,scale=0.1,erase=0.25 "
                                      "(flip and erase: probabilities; crop: pixels, 0 to 14; rotate: degrees, 0 to "
                                      "180; scale: a fraction in [0, 1); light: random contrast and brightness of half the images, a "
                                      "fraction in [0, 1))", group="regularisation", metavar="K=V,...",
                                      cli_type="keyvalues", validator=_augment)
    ema: float | None = setting(None, "evaluate an exponential moving average of the weights with this decay",
                                group="regularisation", check=lambda v: 0 < v < 1, expected="a decay in (0, 1)",
                                metavar="DECAY")
    sam_rho: float = setting(0.0, "sharpness-aware minimisation: gradients at the steepest point within RHO "
                             "(0.05-0.1; a second forward and backward per step; 0 = off)", group="regularisation",
                             check=lambda v: 0 <= v < math.inf, expected="a finite radius >= 0 (0 turns SAM off)",
                             metavar="RHO")
    sam_start: float = setting(0.0, "turn SAM on after this fraction of the run", group="regularisation",
                               check=_fraction, expected="a fraction of the run in [0, 1)", metavar="FRACTION")
    # ---- evaluation
    tta_flip: bool = setting(False, "average predictions with mirror images", group="evaluation")
    tta_shift: int = setting(0, "also average with copies moved 1 to PIXELS pixels up, down, left and right",
                             group="evaluation", check=lambda v: isinstance(v, int) and 0 <= v <= 4,
                             expected="an integer from 0 to 4 (pixels)", metavar="PIXELS")
    precise_bn: int = setting(0, "recompute BatchNorm statistics from N training images before each evaluation",
                              group="evaluation", check=lambda v: isinstance(v, int) and v >= 0,
                              expected="an integer >= 0", metavar="N")
    eval_batch_size: int = setting(1000, "images per evaluation batch", group="evaluation",
                                   check=_positive_int, expected="an integer >= 1")
    # ---- data
    seed: int = setting(0, "seed of the split, initial weights, shuffling and augmentation", group="data",
                        check=lambda v: isinstance(v, int) and 0 <= v <= MAX_SEED,
                        expected=f"an integer from 0 to {MAX_SEED} (2**32 - 1)")
    subset: int | None = setting(None, "train on a stratified subset of N training images", group="data",
                                 check=lambda v: isinstance(v, int) and v >= 10, expected="an integer >= 10",
                                 metavar="N")
    dataset: str = setting("fashion-mnist", "the dataset's reference checksums to verify against", group="data",
                           choices=DATASETS)
    class_names: list[str] | None = setting(None, "comma-separated class names, or a file with one per line: "
                                            "use --data-dir as a custom IDX dataset (no reference checksums)",
                                            group="data", check=_distinct_names,
                                            expected="a list of at least 2 distinct, non-blank names",
                                            cli_type="names")
    exclude: list[int] | None = setting(None, "train without these training images: the suspects an audit's CSV lists "
                                        "(`fashionlab audit`); config.json keeps their indices", group="data",
                                        check=_ascending_indices, expected="a sorted list of distinct image indices >= 0",
                                        metavar="AUDIT_CSV", cli_type="path")
    # ---- runtime (speed only: results never depend on these beyond floating-point rounding)
    device: str = setting("auto", "where to train", group="runtime", choices=device_mod.DEVICES)
    precision: str = setting("auto", "auto: bf16 autocast where the CPU or GPU supports it (conv nets run channels_last "
                             "on a CPU at any precision, and on a GPU in bf16)",
                             group="runtime", choices=device_mod.PRECISIONS)
    compile: bool = setting(False, "torch.compile the training step (CUDA graphs on CUDA); compiling costs time",
                            group="runtime")
    threads: int | None = setting(None, "CPU threads for training (default: the cores other processes leave free "
                                  "when the run starts, at least one)", group="runtime",
                                  check=_positive_int, expected="an integer >= 1", metavar="N")
    cache_stem: bool = setting(True, "keep a frozen stem's output per training image (off only to compare)",
                               group="runtime")

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad setting; returns self so calls chain."""
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.patience is not None and self.val_split == 0:
            raise ConfigError("patience (early stopping) needs a validation split: set val_split > 0")
        classes = len(self.class_names) if self.class_names else 10
        check_model_args(self.model, self.model_args, classes)
        if self.resize_from:  # progressive resizing: the model must take the smallest side too
            problem = _build_problem(self.model, _as_trained(self.model_args, classes), classes, self.resize_from)
            if problem:
                raise ConfigError(f"resize_from={self.resize_from}: model {self.model!r} does not take "
                                  f"{self.resize_from}x{self.resize_from} images ({problem}); progressive resizing "
                                  f"needs a model that pools over the whole image, such as the `best` nets")
        if self.device != "auto":
            device_mod.resolve_device(self.device)  # raises when that device is not there
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-normalised settings (tuples become lists), as config.json stores them."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        check_names(d)
        return cls(**d)


def _type_ok(f, value) -> bool:
    kind = str(f.type)
    if value is None:
        return "None" in kind
    if kind.startswith("bool"):
        return isinstance(value, bool)
    if kind.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind.startswith("float"):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind.startswith("str"):
        return isinstance(value, str)
    if kind.startswith("dict"):
        return isinstance(value, dict)
    if kind.startswith("list[int]"):
        return isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    if kind.startswith("list"):
        return isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
    return True


_TYPE_WORDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
               "dict": "a mapping of names to values", "list": "a list of strings", "list[int]": "a list of integers"}


def _check_field(f, value) -> None:
    meta = f.metadata
    if not _type_ok(f, value):
        kind = str(f.type).split(" ")[0]
        words = _TYPE_WORDS.get(kind, _TYPE_WORDS.get(kind.split("[")[0], str(f.type)))
        raise ConfigError(f"{f.name}={shown_value(value)}: expected {words}")
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None:
        allowed = choices() if callable(choices) else choices
        if value not in allowed:
            what = f"unknown {f.name}; registered: " if callable(choices) else "expected one of "
            raise ConfigError(f"{f.name}={value!r}: {what}{', '.join(allowed)}")
    check = meta.get("check")
    if check is not None and not check(value):
        raise ConfigError(f"{f.name}={shown_value(value)}: expected {meta['expected']}")
    validator = meta.get("validator")
    if validator is not None:
        try:
            validator(value)
        except ValueError as e:
            raise ConfigError(f"{f.name}: {e}") from None


# --------------------------------------------------------------------------- model arguments

def check_model_args(model: str, model_args: dict[str, Any], classes: int) -> None:
    """The model with these arguments must build and classify an image into `classes` outputs: built on
    torch's meta device (shapes only: no memory, no time), within the registry's size limits. A bad
    argument is then a ConfigError naming it before anything is written, not a traceback at the first
    batch or a memory blow-up."""
    defaults = model_arguments(model)
    margs = _as_trained(model_args, classes)
    for name, value in model_args.items():  # the first argument that is wrong on its own is named
        problem = _argument_problem(model, name, value, defaults, classes)
        if problem:
            raise ConfigError(f"model_args {name}={reprlib.repr(value)}: {problem}; {_arguments_text(model, defaults)}")
    problem = _build_problem(model, margs, classes)
    if problem:  # only together: e.g. more pooling blocks than a resized input has room for
        shown = ", ".join(f"{k}={reprlib.repr(v)}" for k, v in model_args.items())
        raise ConfigError(f"model_args {shown}: {problem}; {_arguments_text(model, defaults)}")


def _as_trained(model_args: dict[str, Any], classes: int) -> dict[str, Any]:
    """The model's arguments as training builds it: `num_classes` set for a dataset of other than 10
    classes, unless the arguments name it."""
    return dict(model_args) if classes == 10 else {"num_classes": classes, **model_args}


def model_arguments(model: str) -> dict[str, Any] | None:
    """A registered model's arguments with the values it uses by default; None when its builder takes
    any keyword (then only building it can judge)."""
    import inspect
    from . import models
    entry = models.MODELS[model]
    params = inspect.signature(models.FAMILIES[entry.family]).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    named = {p.name: p.default for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {**named, **entry.kwargs}


def _argument_problem(model: str, name: str, value: Any, defaults: dict[str, Any] | None, classes: int) -> str | None:
    if defaults is not None and name not in defaults:
        close = difflib.get_close_matches(name, list(defaults), 1)
        return f"model {model!r} has no such argument" + (f" (did you mean {close[0]!r}?)" if close else "")
    expected = _kind_of(defaults.get(name)) if defaults is not None else None
    if expected and not expected[0](value):
        return f"expected {expected[1]}, like its default {_json(defaults[name])}"
    return _build_problem(model, _as_trained({name: value}, classes), classes)


def _kind_of(default: Any) -> tuple[Callable[[Any], bool], str] | None:
    """What a value must be, judged from the argument's default: a JSON `true` is never a size, a string
    never a probability. None where the default says nothing (None)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if isinstance(default, bool):
        return (lambda v: isinstance(v, bool)), "true or false"
    if isinstance(default, int):
        return integer, "an integer"
    if isinstance(default, float):
        return number, "a number"
    if isinstance(default, str):
        return (lambda v: isinstance(v, str)), "a string"
    if isinstance(default, (list, tuple)) and default:
        item = _kind_of(default[0])
        if item and item[1] in _PLURALS:
            return (lambda v: isinstance(v, (list, tuple)) and all(map(item[0], v))), f"a list of {_PLURALS[item[1]]}"
    return None


_PLURALS = {"an integer": "integers", "a number": "numbers", "a string": "strings"}


def _build_problem(model: str, margs: dict[str, Any], classes: int, side: int | None = None) -> str | None:
    """Why the model with these arguments cannot be trained on `classes` classes (on images `side`
    pixels square, when given), or None."""
    from . import models
    from .models._registry import meta_model
    spec = models.model_spec(model, **margs)
    try:
        with warnings.catch_warnings():  # torch's notes on zero-sized meta tensors: the error below says it better
            warnings.simplefilter("ignore")
            _, outputs = meta_model(spec["family"], spec["kwargs"], side)
    except ValueError as e:
        return str(e)
    if outputs != classes:
        return f"the model gives {outputs} outputs; the dataset has {classes} classes"
    return None


def _arguments_text(model: str, defaults: dict[str, Any] | None) -> str:
    if defaults is None:
        return f"see the arguments of model {model!r} in `fashionlab models`"
    return f"model {model!r} takes " + ", ".join(f"{k}={_json(v)}" for k, v in defaults.items())


def _json(value: Any) -> str:
    """A default as the command line writes it (--model-arg values are JSON)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def shown_value(value: Any, limit: int = 8) -> str:
    """A setting's value for a message, a page or a table: a long list (the images `exclude` names) as its
    first items and its length, not thousands of numbers."""
    if isinstance(value, (list, tuple)) and len(value) > limit:
        head = ", ".join(json.dumps(v) for v in value[:limit // 2])
        return f"[{head}, ... {len(value):,} items]"
    return repr(value)


def check_setting(name: str, value: Any) -> None:
    """One setting's value on its own (type, allowed values, range); ConfigError names it."""
    check_names({name: value})
    _check_field(next(f for f in fields(TrainConfig) if f.name == name), value)


def setting_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def check_names(d: dict[str, Any]) -> None:
    """Unknown setting names raise with the closest valid name and the full list."""
    known = setting_names()
    unknown = sorted(set(d) - set(known))
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, 1)) else repr(u)
                 for u in unknown]
        raise ConfigError(f"unknown training setting {', '.join(hints)}; valid settings: {', '.join(known)}")


def make_config(recipe: str | None = None, **overrides) -> TrainConfig:
    """The recipe's values first, then explicit overrides (None means 'not given'); validated."""
    values: dict[str, Any] = {}
    if recipe:
        try:
            chosen = get_recipe(recipe)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
        device_type = recipe_device_type(chosen, overrides.get("device"))
        precision = recipe_precision(chosen, device_type, overrides.get("precision"))
        amx = f"{device_type}-amx" in chosen.on_device and device_mod.cpu_has_amx()  # settings_for checks bf16
        values.update(copy.deepcopy(chosen.settings_for(device_type, precision, amx)))
        values["recipe"] = recipe
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values).validate()


def recipe_device_type(recipe, device: str | None) -> str:
    """The device type a recipe's per-device settings are chosen for: the one the run will use ("auto"
    resolved as training resolves it). Only a recipe with such settings needs torch to tell."""
    if not recipe.on_device or (device is not None and device not in device_mod.DEVICES):
        return "cpu"  # an unknown device name is reported by validation, with the setting's choices
    return device_mod.resolve_device(device or TrainConfig.device).type


def recipe_precision(recipe, device_type: str, precision: str | None) -> str | None:
    """The precision a run on this device type will train at ("auto" resolved as training resolves it),
    where the recipe's settings depend on it; else None, without asking torch."""
    precision = precision or recipe.settings.get("precision") or TrainConfig.precision
    if not recipe.has_precision_rule(device_type) or precision not in device_mod.PRECISIONS:
        return None  # an unknown precision is reported by validation, with the setting's choices
    return device_mod.auto_precision(device_type) if precision == "auto" else precision


def settings_of(saved: dict[str, Any]) -> dict[str, Any]:
    """The training settings in a config.json (recorded facts such as the environment left out), with
    defaults filled in for settings added since the run was made, so old and new runs compare."""
    names = set(setting_names())
    defaults = TrainConfig().to_dict()
    return {**defaults, **{k: v for k, v in saved.items() if k in names}}


# --------------------------------------------------------------------------- the command line

def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_train_flags(parser) -> None:
    """One flag per setting, grouped, generated from the declarations (default None = 'not given')."""
    import argparse
    groups = {g: parser.add_argument_group(f"{g} settings") for g in GROUPS}
    for f in fields(TrainConfig):
        meta, kind = f.metadata, str(f.type)
        kw: dict[str, Any] = dict(dest=f.name, default=None, help=_help_text(f))
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        if kind.startswith("bool"):
            kw["action"] = argparse.BooleanOptionalAction
            kw.pop("metavar", None)
        elif meta.get("cli_type") == "keyvalues":
            kw["type"] = _flag_parser(flag_name(f), parse_key_values)
        elif meta.get("cli_type") == "names":
            kw["type"] = parse_names
        elif meta.get("cli_type") == "path":  # read where the data is known (api.train), not here
            kw["type"] = str
        elif kind.startswith("int"):
            kw["type"] = int
        elif kind.startswith("float"):
            kw["type"] = float
        choices = meta.get("choices")
        if choices is not None and not callable(choices):
            kw["choices"] = choices
        groups[meta["group"]].add_argument(flag_name(f), **kw)


def default_of(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _help_text(f) -> str:
    default = default_of(f)
    shown = "" if default in (None, {}, [], False) else f" (default {default})"
    return (f.metadata["help"] + shown).replace("%", "%%")


def _flag_parser(flag: str, parse: Callable[[str, str], Any]) -> Callable[[str], Any]:
    import argparse

    def convert(text: str):
        try:
            return parse(text, flag)
        except ValueError as e:  # argparse shows an ArgumentTypeError's own words
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def settings_from_flags(args) -> dict[str, Any]:
    """The settings a parsed `train` command line gives explicitly."""
    return {name: getattr(args, name) for name in setting_names() if getattr(args, name, None) is not None}


def parse_key_values(text: str, flag: str = "--augment") -> dict[str, Any]:
    """'a=1,b=[3,5],c=max' -> {'a': 1, 'b': [3, 5], 'c': 'max'} (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for part in _split_top(text):
        if "=" not in part:
            raise ValueError(f"{flag} {text!r}: expected key=value pairs separated by commas, got {part!r}")
        key, value = part.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so list values survive."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p.strip()]


def parse_names(value: str) -> list[str]:
    """Class names: a file with one name per line, or a comma-separated list."""
    from pathlib import Path
    path = Path(value)
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [n.strip() for n in value.split(",") if n.strip()]


def flags_markdown() -> str:
    """The README's table of training flags, generated from the declarations."""
    lines = ["| flag | default | what it does |", "|---|---|---|"]
    for f in fields(TrainConfig):
        default = default_of(f)
        shown = "" if default in (None, {}, []) else f"`{json.dumps(default)}`"
        name = flag_name(f)
        if str(f.type).startswith("bool"):
            name = f"{name} / --no-{name[2:]}"
        choices = f.metadata.get("choices")
        allowed = "" if choices is None else " (" + " \\| ".join(choices() if callable(choices) else choices) + ")"
        lines.append(f"| `{name}` | {shown} | {f.metadata['help']}{allowed} |")
    return "\n".join(lines) + "\n"



README_BEGIN, README_END = "<!-- train-flags:begin -->", "<!-- train-flags:end -->"


def sync_readme(path: str) -> bool:
    """Rewrite the README's flag table from the declarations; returns whether it changed."""
    from pathlib import Path
    from .atomic import write_text
    from .tables import replace_between
    text = Path(path).read_text()
    new = replace_between(text, README_BEGIN, README_END, flags_markdown(), path, "where the flag table goes")
    if new != text:
        write_text(path, new)
    return new != text


if __name__ == "__main__":  # python -m fashionlab.config README.md: regenerate the flag table
    import sys
    print("updated" if sync_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md") else "up to date")
