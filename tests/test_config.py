"""Settings declared once: every setting has a flag, help and a README row; values are checked."""

from __future__ import annotations

import dataclasses

import pytest

from fashionlab import config
from fashionlab.cli import build_parser
from conftest import ROOT


def _train_parser():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_setting_has_a_flag_with_help():
    flags = {a.dest: a for a in _train_parser()._actions}
    for f in dataclasses.fields(config.TrainConfig):
        assert f.name in flags, f"training setting {f.name} has no `train` flag"
        assert f.metadata.get("help"), f"training setting {f.name} has no help text"
        assert flags[f.name].help and flags[f.name].default is None  # None: 'not given', the recipe decides


def test_readme_flag_table_is_generated_from_the_settings():
    text = (ROOT / "README.md").read_text()
    block = text.split(config.README_BEGIN, 1)[1].split(config.README_END, 1)[0]
    assert block.strip() == config.flags_markdown().strip(), \
        "README's flag table is stale: run `python -m fashionlab.config README.md`"
    for f in dataclasses.fields(config.TrainConfig):
        assert f"`{config.flag_name(f)}" in block


def test_sync_readme_rewrites_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{config.README_BEGIN}\nold\n{config.README_END}\nafter\n")
    assert config.sync_readme(str(readme)) and not config.sync_readme(str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "| `--epochs` |" in text


def test_flags_reach_the_settings():
    args = _train_parser().parse_args(["--epochs", "3", "--augment", "flip=0.5,crop=2", "--no-cache-stem",
                                       "--model-arg", "channels=[16,32]", "--class-names", "a,b,c", "--nesterov"])
    assert config.settings_from_flags(args) == {"epochs": 3, "augment": {"flip": 0.5, "crop": 2},
                                                "cache_stem": False, "model_args": {"channels": [16, 32]},
                                                "class_names": ["a", "b", "c"], "nesterov": True}
    assert config.settings_from_flags(_train_parser().parse_args([])) == {}


@pytest.mark.parametrize("settings, message", [
    ({"epochz": 3}, r"unknown training setting 'epochz' \(did you mean 'epochs'\?\); valid settings: model, "),
    ({"epochs": "3"}, r"epochs='3': expected an integer"),
    ({"epochs": 2.5}, r"epochs=2.5: expected an integer"),
    ({"nesterov": 1}, r"nesterov=1: expected true or false"),
    ({"lr": float("nan")}, r"lr=nan: expected a positive number"),
    ({"model": "resnet9000"}, r"model='resnet9000': unknown model; registered: mlp, cnn"),
    ({"device": "tpu"}, r"device='tpu': expected one of auto, cpu, cuda, mps"),
    ({"class_names": "abc"}, r"class_names='abc': expected a list of strings"),
    ({"class_names": ["one"]}, r"expected a list of at least 2 distinct, non-blank names"),
    ({"class_names": ["a", "b", "a"]}, r"class_names=\['a', 'b', 'a'\]: expected a list of at least 2 distinct"),
    ({"class_names": ["a", " "]}, r"expected a list of at least 2 distinct, non-blank names"),
    ({"seed": 2**64}, r"seed=18446744073709551616: expected an integer from 0 to 4294967295"),
    ({"warmup_epochs": float("inf")}, r"warmup_epochs=inf: expected a finite number >= 0"),
    ({"sam_rho": float("inf")}, r"sam_rho=inf: expected a finite radius >= 0"),
    ({"augment": {"blur": 1}}, r"augment: unknown augmentation blur"),
    ({"augment": {"flip": "yes"}}, r"augment: flip='yes': expected a probability from 0 to 1"),
    ({"augment": {"crop": -2}}, r"augment: crop=-2: expected an integer from 0 to 14 \(pixels\)"),
    ({"model_args": {"dropout": "abc"}}, r"model_args dropout='abc': expected a number, like its default 0.0; "
                                         r"model 'cnn' takes channels=\[32, 64\]"),
    ({"model_args": {"chanels": [16]}}, r"model_args chanels=\[16\]: model 'cnn' has no such argument \(did you "
                                        r"mean 'channels'\?\)"),
    ({"model_args": {"num_classes": 3}, "class_names": ["a", "b"]}, r"model_args num_classes=3: the model gives 3 "
                                                                     r"outputs; the dataset has 2 classes"),
    ({"recipe": "fastest"}, r"unknown recipe 'fastest'"),
])
def test_bad_values_name_the_setting(settings, message):
    with pytest.raises(config.ConfigError, match=message):
        recipe = settings.pop("recipe", None)
        config.make_config(recipe, **settings)


def test_recipe_first_then_explicit_settings_and_defaults_for_old_runs():
    cfg = config.make_config("fast", epochs=6, precision="bf16")
    assert (cfg.model, cfg.epochs, cfg.lr, cfg.recipe) == ("fast_strided_valid_fixed", 6, 1.15, "fast")
    saved = {k: v for k, v in cfg.to_dict().items() if k != "cache_stem"}  # a run from before a setting existed
    assert config.settings_of({**saved, "environment": {}}) == cfg.to_dict()


def test_setting_groups_are_known():
    assert {f.metadata["group"] for f in dataclasses.fields(config.TrainConfig)} <= set(config.GROUPS)


def test_check_setting_checks_what_a_structured_value_holds():
    """Sweep specs check each level with check_setting: an augmentation's values are checked there too."""
    config.check_setting("augment", {"flip": 0.5, "crop": 2})
    with pytest.raises(config.ConfigError, match=r"^augment: flip=2: expected a probability from 0 to 1$"):
        config.check_setting("augment", {"flip": 2})
