"""One error contract for the public API: every public name given bad input raises
`fashionlab.errors.UserError` (or a documented subclass), with a one-line message that names the
argument or value, and the command line prints that same line.

The table below holds bad calls of every public name that takes input; a new public name in
`fashionlab.__all__` must be added to it (or to NO_INPUT) or the first test fails."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import fashionlab as fl
from fashionlab import cli
from fashionlab.atomic import OutputError
from fashionlab.config import ConfigError
from fashionlab.data import DataError
from fashionlab.errors import ArgumentError, UnknownNameError, UserError
from fashionlab.images import ImageError
from fashionlab.label_audit import AuditError
from fashionlab.schema import RunError
from fashionlab.studies import StudyError
from fashionlab.sweeps import SpecError

from conftest import synthetic_dataset

DS = synthetic_dataset(n_train=120, n_test=60)

# Public names that take no user input to get wrong (result types, the callback base class, listings).
NO_INPUT = {"AuditResult", "Callback", "Comparison", "Figures", "StudyResult", "SweepResult", "list_models",
            "list_recipes"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> fl.Run:
    return fl.train(model="mlp", out=tmp_path_factory.mktemp("runs") / "mlp", dataset=DS, quiet=True, epochs=1,
                    val_split=0.0)


def bad_calls(run: fl.Run, tmp: Path) -> list[tuple[str, object, type, str]]:
    """(public name, the bad call, the error type it must raise, what the message must name)."""
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    unwritable = "/proc/fashionlab/page.html"
    spec = tmp / "tiny.toml"
    spec.write_text('[experiment]\nname = "tiny"\nmodel = "mlp"\n[train]\nepochs = 1\n[factors]\nlr = [0.01, 0.001]\n')
    return [
        ("load_data", lambda: fl.load_data(class_names=["a", "b"]), DataError, "class_names"),
        ("load_data", lambda: fl.load_data(dataset="mnist-digits"), UserError, "mnist-digits"),
        ("explore", lambda: fl.explore(DS, out=unwritable), OutputError, unwritable),
        ("build_model", lambda: fl.build_model("nosuch"), UnknownNameError, "'nosuch'"),
        ("build_model", lambda: fl.build_model("cnn", dropot=1), ArgumentError, "dropot"),
        ("build_model", lambda: fl.build_model("cnn", channels=[-3, 5]), ArgumentError, "model 'cnn'"),
        ("train", lambda: fl.train(recipe="nosuch", dataset=DS), ConfigError, "'nosuch'"),
        ("train", lambda: fl.train(model="mlp", epoch=3, dataset=DS), ConfigError, "epoch"),
        ("train", lambda: fl.train(model="mlp", epochs=0, dataset=DS), ConfigError, "epochs"),
        ("train", lambda: fl.train(model="mlp", reuse=True, dataset=DS), ArgumentError, "reuse"),
        ("make_config", lambda: fl.make_config(lr=-1.0), ConfigError, "lr"),
        ("TrainConfig", lambda: fl.TrainConfig(batch_size=0).validate(), ConfigError, "batch_size"),
        ("Run", lambda: fl.Run(empty).predict(DS.test_images[:1]), RunError, str(empty)),
        ("Run", lambda: run.predict(DS.test_images[:1], top_k=0), ArgumentError, "top_k"),
        ("Run", lambda: run.predict(tmp / "missing.png"), ImageError, "missing.png"),
        ("Run", lambda: run.predict(np.zeros((3, 3), np.uint8)), ImageError, "(3, 3)"),
        ("Run", lambda: run.figures(which="nope", dataset=DS), ArgumentError, "which='nope'"),
        ("Run", lambda: run.figures(which=["curves", "nope"], dataset=DS), ArgumentError, "'nope'"),
        ("Run", lambda: run.export(format="tflite"), ArgumentError, "format='tflite'"),
        ("Run", lambda: run.calibrate_ood(false_alarm_rate=2.0, dataset=DS), ArgumentError, "false_alarm_rate"),
        ("Run", lambda: run.predict(DS.test_images[:1], device="tpu"), ArgumentError, "'tpu'"),
        ("Run", lambda: run.evaluate(dataset=DS, precision="fp8"), ArgumentError, "'fp8'"),
        ("Run", lambda: run.report(out=unwritable, dataset=DS), OutputError, unwritable),
        ("Run", lambda: run.robustness(images=0, dataset=DS), ArgumentError, "images=0"),
        ("audit", lambda: fl.audit(folds=1, dataset=DS, out=tmp / "audit"), AuditError, "folds=1"),
        ("audit", lambda: fl.audit(recipe="nosuch", dataset=DS, out=tmp / "audit"), ConfigError, "'nosuch'"),
        ("audit", lambda: fl.audit(dataset=DS, out=tmp / "audit", exclude=[1]), AuditError, "exclude"),
        ("study", lambda: fl.study("nosuch", out=tmp / "study"), StudyError, "'nosuch'"),
        ("study", lambda: fl.study("zoo", seeds=0, out=tmp / "zoo", dataset=DS), StudyError, "seeds=0"),
        ("compare", lambda: fl.compare([], out=tmp / "c.html"), ArgumentError, "runs=[]"),
        ("compare", lambda: fl.compare(str(run.path), out=tmp / "c.html"), ArgumentError, "runs="),
        ("compare", lambda: fl.compare([empty], out=tmp / "c.html"), StudyError, str(empty)),
        ("sweep", lambda: fl.sweep(tmp / "missing.toml"), SpecError, "missing.toml"),
        ("sweep", lambda: fl.sweep(spec, workers=0), ArgumentError, "--workers 0"),
    ]


def test_every_public_name_that_takes_input_is_walked_with_bad_input(run, tmp_path):
    walked = {name for name, *_ in bad_calls(run, tmp_path)}
    assert walked | NO_INPUT == set(fl.__all__), "add bad calls of the new public name to bad_calls()"


def test_bad_input_raises_a_documented_user_error_naming_the_argument(run, tmp_path):
    documented = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for name, call, expected, named in bad_calls(run, tmp_path):
        with pytest.raises(UserError) as err:
            call()
            pytest.fail(f"{name}: no error for bad input")
        e = err.value
        where = f"{name}: {type(e).__name__}: {e}"
        assert isinstance(e, expected), where
        assert named in str(e), f"{where}: the message does not name {named!r}"
        assert "\n" not in str(e) and str(e) == cli._message(e), where  # one line, printed as it is
        assert re.search(rf"`[\w.]+\.{type(e).__name__}`", documented), \
            f"{where}: {type(e).__name__} is not listed in docs/api.md's Errors"


def test_the_errors_still_are_the_built_in_types_callers_catch():
    with pytest.raises(KeyError):
        fl.build_model("nosuch")
    with pytest.raises(ValueError):
        fl.build_model("cnn", dropot=1)
    with pytest.raises(ValueError):
        fl.study("nosuch")
    assert str(UnknownNameError("unknown model 'x'")) == "unknown model 'x'"  # not KeyError's quoted repr


def test_the_command_line_prints_the_api_message_on_one_line_and_exits_2(capsys, tmp_path):
    with pytest.raises(StudyError) as err:
        fl.study("nosuch", out=tmp_path / "s")
    assert cli.main(["study", "nosuch", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == f"fashionlab study: error: {err.value}\n"


def test_figures_take_one_name_or_a_list(run):
    assert list(run.figures(which="curves", dataset=DS)) == ["curves"]
    assert set(run.figures(which=["curves", "confusion"], dataset=DS)) == {"curves", "confusion"}
    assert re.search(r"available: curves, confusion", str(pytest.raises(ArgumentError, run.figures, "c").value))
