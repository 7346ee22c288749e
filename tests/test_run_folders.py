"""Damaged or tampered run folders (issue 18): every reader refuses them, before building or loading
anything, with one line naming the file and the field; no description makes loading allocate beyond
the limits. Each case is a copy of one tiny trained run with one file changed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fashionlab import api, cli, config, data, run as run_mod, schema, training
from fashionlab.errors import UserError
from fashionlab.schema import RunError
from conftest import rewrite_tensors, run_cli, synthetic_dataset

DS = synthetic_dataset(n_train=200, n_test=100)
SETTINGS = dict(model="cnn_small", epochs=1, batch_size=32, val_split=0.2, class_names=DS.class_names)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished run, an interrupted one (SGD, EMA, early stopping, stopped mid-epoch) and the data as IDX."""
    tmp = tmp_path_factory.mktemp("runs")
    run_mod.train_run(config.make_config(**SETTINGS), tmp / "finished", dataset=DS, quiet=True)

    class StopInSecondEpoch(training.Callback):
        def on_step(self, trainer, step, stats):
            if trainer.state.epoch == 1 and step == 1:
                trainer.stop_signal["signum"] = 15  # as SIGTERM would: checkpoint mid-epoch, then stop

    cut = config.make_config(**{**SETTINGS, "epochs": 3, "optimizer": "sgd", "nesterov": True, "ema": 0.9,
                                "patience": 2})
    with pytest.raises(training.TrainingInterrupted):
        run_mod.train_run(cut, tmp / "interrupted", dataset=DS, quiet=True, callbacks=[StopInSecondEpoch()])
    np.save(tmp / "images.npy", DS.test_images[:2])
    return {"finished": tmp / "finished", "interrupted": tmp / "interrupted",
            "idx": data.write_idx_folder(tmp / "idx", DS), "images": tmp / "images.npy"}


def damaged(made, tmp_path, edit, which: str = "finished") -> Path:
    folder = tmp_path / "run"
    shutil.copytree(made[which], folder)
    edit(folder)
    return folder


# --------------------------------------------------------------------------- edits

def edit_json(name: str, change):
    """change(obj) edits the parsed file in place, or returns what to write instead."""
    def edit(folder: Path):
        path = folder / name
        obj = json.loads(path.read_text())
        new = change(obj)
        path.write_text(json.dumps(obj if new is None else new))
    return edit


def _parent(obj, dotted: str):
    """The container of the dotted path's last key (numbers index lists), and that key."""
    *parents, last = dotted.split(".")
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    return obj, last


def put(dotted: str, value):
    def change(obj):
        parent, last = _parent(obj, dotted)
        parent[last] = value
    return change


def drop(dotted: str):
    def change(obj):
        parent, last = _parent(obj, dotted)
        del parent[last]
    return change


def write(name: str, text: str):
    return lambda folder: (folder / name).write_text(text)


def as_folder(name: str):
    def edit(folder: Path):
        (folder / name).unlink()
        (folder / name).mkdir()
    return edit


def as_dev_zero(name: str):
    """The file replaced by a link to an endless stream of zeros."""
    def edit(folder: Path):
        (folder / name).unlink()
        (folder / name).symlink_to("/dev/zero")
    return edit


def edit_tensors(name: str, change):
    """change(tensors, metadata) edits both in place; the file is written back whole."""
    return lambda folder: rewrite_tensors(folder / name, change)


def tensors_do(fn):
    return lambda tensors, meta: fn(tensors)


def set_tensor(name: str, value: torch.Tensor):
    return tensors_do(lambda t: t.update({name: value}))


def every_tensor_to(dtype: torch.dtype):
    return tensors_do(lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))


def metadata_do(fn):
    return lambda tensors, meta: fn(meta)


def edit_meta_json(key: str, change):
    def fn(meta):
        obj = json.loads(meta[key])
        new = change(obj)
        meta[key] = json.dumps(obj if new is None else new)
    return metadata_do(fn)


def drop_prefix(prefix: str):
    def fn(tensors):
        for k in [k for k in tensors if k.startswith(prefix)]:
            del tensors[k]
    return tensors_do(fn)


def with_weights(family: str, kwargs: dict):
    """model.json and model.safetensors of another architecture, consistent with each other."""
    def edit(folder: Path):
        from fashionlab import checkpoint, models
        info = json.loads((folder / MODEL).read_text())
        info["architecture"] = {"name": "x", "family": family, "kwargs": kwargs}
        checkpoint.write_model(folder / WEIGHTS, folder / MODEL, models.build_from_spec(family, kwargs), info)
    return edit


DEEP = "[" * 200_000 + "]" * 200_000
MODEL, WEIGHTS, METRICS, CONFIG, CHECKPOINT = "model.json", "model.safetensors", "metrics.json", "config.json", \
    "checkpoint.safetensors"

# (case, edit, what the one-line error must say)
MODEL_CASES = [
    ("family-list", edit_json(MODEL, put("architecture.family", ["convnet"])),
     r"model\.json: architecture\.family=\['convnet'\]: expected a model family's name"),
    ("family-unknown", edit_json(MODEL, put("architecture.family", "transformer")),
     r"model\.json: architecture\.family='transformer': expected one of convnet, fastnet"),
    ("kwargs-list", edit_json(MODEL, put("architecture.kwargs", [32])),
     r"model\.json: architecture\.kwargs=\[32\]: expected an object"),
    ("architecture-missing", edit_json(MODEL, drop("architecture")), r"model\.json: architecture is missing"),
    ("model-json-list", write(MODEL, "[1, 2]"), r"model\.json: expected a JSON object, got a list"),
    ("model-json-deep", write(MODEL, DEEP), r"model\.json: nested deeper than 32 levels"),
    ("model-json-deep-in-a-field", edit_json(MODEL, put("versions", json.loads("[" * 100 + "]" * 100))),
     r"model\.json: nested deeper than 32 levels"),
    ("model-json-huge", write(MODEL, " " * (5 << 20) + "{}"), r"model\.json: larger than 4,194,304 bytes"),
    ("model-json-not-json", write(MODEL, "{oops"), r"model\.json: not valid JSON"),
    ("negative-channels", edit_json(MODEL, put("architecture.kwargs.channels", [-32, 32])),
     r"model\.json: architecture 'cnn_small' refused: bad arguments for model family 'convnet': .*negative"),
    ("unknown-argument", edit_json(MODEL, put("architecture.kwargs.chanels", [16])),
     r"model\.json: architecture 'cnn_small' refused: .*unknown argument\(s\) chanels; valid arguments: channels"),
    ("argument-of-wrong-type", edit_json(MODEL, put("architecture.kwargs.dense", "wide")),
     r"model\.json: architecture 'cnn_small' refused: bad arguments for model family 'convnet'"),
    ("kernel-larger-than-image", edit_json(MODEL, put("architecture.kwargs.kernel", 40)),
     r"model\.json: architecture 'cnn_small' refused: .*too small for 2 blocks with kernel 40"),
    ("dense-2M-units", edit_json(MODEL, put("architecture.kwargs.dense", [2_000_000])),
     r"model\.json: architecture 'cnn_small' refused: 1,622,009,578 parameters; the limit is 100,000,000"),
    ("5000-layers", edit_json(MODEL, put("architecture.kwargs.dense", [1] * 5000)),
     r"model\.json: architecture 'cnn_small' refused: .*more than 4,096 parameter tensors"),
    ("huge-layer-output", edit_json(MODEL, put("architecture", {"name": "x", "family": "fastnet", "kwargs": {
        "widths": [30000], "stem": 0, "convs_per_block": 1}})),
     r"model\.json: architecture 'x' refused: layer net\.1 gives 23,520,000 values per image; the limit is 16,000,000"),
    ("huge-layer-output-with-its-weights",
     with_weights("fastnet", {"widths": [30000], "stem": 0, "convs_per_block": 1}),
     r"model\.json: architecture 'x' refused: layer net\.1 gives 23,520,000 values per image"),
    ("tta-shift-text", edit_json(MODEL, put("tta_shift", "abc")), r"model\.json: tta_shift='abc': expected an integer"),
    ("tta-shift-400", edit_json(MODEL, put("tta_shift", 400)),
     r"model\.json: tta_shift=400: expected an integer from 0 to 4 \(pixels\)"),
    ("tta-shift-negative", edit_json(MODEL, put("tta_shift", -1)),
     r"model\.json: tta_shift=-1: expected an integer from 0"),
    ("tta-shift-fraction", edit_json(MODEL, put("tta_shift", 2.5)),
     r"model\.json: tta_shift=2\.5: expected an integer"),
    ("tta-flip-text", edit_json(MODEL, put("tta_flip", "no")), r"model\.json: tta_flip='no': expected true or false"),
    ("precision-unknown", edit_json(MODEL, put("precision", "fp8")), r"model\.json: precision='fp8': expected one of"),
    ("normalisation-list", edit_json(MODEL, put("input.normalisation", [0.2, 0.3])),
     r"model\.json: input\.normalisation=\[0\.2, 0\.3\]: expected an object"),
    ("5-class-names-for-10-outputs", edit_json(MODEL, lambda o: put("class_names", o["class_names"][:5])(o)),
     r"model\.json: class_names has 5 names; architecture 'cnn_small' has 10 outputs"),
    ("class-names-one-string", edit_json(MODEL, put("class_names", "abcdefghij")),
     r"model\.json: class_names='abcdefghij': expected a list of distinct, non-empty, printable strings"),
    ("class-names-repeated", edit_json(MODEL, put("class_names", ["a"] * 10)), r"class_names=\['a', 'a'.*distinct"),
    ("class-names-empty", edit_json(MODEL, put("class_names", [""] + [f"c{i}" for i in range(9)])), r"non-empty"),
    ("class-names-numbers", edit_json(MODEL, put("class_names", list(range(10)))), r"class_names=\[0, 1, 2"),
    ("class-name-with-newline", edit_json(MODEL, put("class_names", ["a\nb"] + [f"c{i}" for i in range(9)])),
     r"printable strings"),
    ("model-json-missing", lambda f: (f / MODEL).unlink(), r"model\.json: file not found"),
    ("model-json-a-folder", as_folder(MODEL), r"model\.json: not a regular file"),
    ("model-json-dev-zero", as_dev_zero(MODEL), r"model\.json: not a regular file"),
]
WEIGHT_CASES = [
    ("weights-wrong-shape", edit_tensors(WEIGHTS, set_tensor("net.1.weight", torch.zeros(16, 1, 3, 3))),
     r"model\.safetensors: tensor net\.1\.weight has shape \[16, 1, 3, 3\]; the architecture in model\.json needs "
     r"\[32, 1, 3, 3\]"),
    ("weights-int32", edit_tensors(WEIGHTS, every_tensor_to(torch.int32)),
     r"model\.safetensors: tensor net\.\S+ is int32; expected float32 as saved"),
    ("weights-float64", edit_tensors(WEIGHTS, every_tensor_to(torch.float64)),
     r"model\.safetensors: tensor net\.\S+ is float64; expected float32 as saved"),
    ("weights-missing-tensor", edit_tensors(WEIGHTS, tensors_do(lambda t: t.pop("net.1.bias"))),
     r"model\.safetensors: tensor\(s\) net\.1\.bias missing; the architecture in model\.json needs them"),
    ("weights-extra-tensor", edit_tensors(WEIGHTS, set_tensor("evil", torch.zeros(3))),
     r"model\.safetensors: unexpected tensor\(s\) evil"),
    ("weights-not-safetensors", write(WEIGHTS, "garbage"), r"model\.safetensors: not a readable safetensors file"),
    ("weights-missing", lambda f: (f / WEIGHTS).unlink(), r"model\.safetensors: file not found"),
    ("weights-dev-zero", as_dev_zero(WEIGHTS), r"model\.safetensors: not a regular file"),
]


def _metrics(change):
    return edit_json(METRICS, change)


METRICS_CASES = [
    ("metrics-list", write(METRICS, "[0.9]"), r"metrics\.json: expected a JSON object, got a list"),
    ("metrics-deep", write(METRICS, DEEP), r"metrics\.json: nested deeper than 32 levels"),
    ("accuracy-text", _metrics(put("test_accuracy", "high")),
     r"metrics\.json: test_accuracy='high': expected a number from 0 to 1"),
    ("accuracy-above-1", _metrics(put("test_accuracy", 1.5)), r"metrics\.json: test_accuracy=1\.5: expected a number"),
    ("loss-null", _metrics(put("test_loss", None)), r"metrics\.json: test_loss=None: expected a number >= 0"),
    ("loss-missing", _metrics(drop("test_loss")), r"metrics\.json: test_loss is missing"),
    ("per-class-list", _metrics(put("per_class", [1, 2])), r"metrics\.json: per_class=\[1, 2\]: expected an object"),
    ("per-class-score-text", _metrics(put("per_class.class3.f1", "good")),
     r"metrics\.json: per_class\.class3\.f1='good': expected a number from 0 to 1"),
    ("confusion-strings", _metrics(lambda m: put("confusion_matrix", [["1"] * 10] * 10)(m)),
     r"metrics\.json: confusion_matrix=\[\['1'.*expected a square list of lists of counts"),
    ("confusion-not-square", _metrics(lambda m: put("confusion_matrix", m["confusion_matrix"][:9])(m)),
     r"metrics\.json: confusion_matrix: expected 10 rows of 10 counts"),
    ("params-text", _metrics(put("params", "many")), r"metrics\.json: params='many': expected an integer >= 0"),
    ("train-seconds-null", _metrics(put("train_seconds", None)),
     r"metrics\.json: train_seconds=None: expected a number"),
    ("epochs-run-text", _metrics(put("epochs_run", "3")), r"metrics\.json: epochs_run='3': expected an integer"),
    ("most-confused-entry", _metrics(put("most_confused", [{"true": 1}])),
     r"metrics\.json: most_confused\[0\]\.true=1: expected a class name"),
    ("images-per-s-text", _metrics(put("images_per_s", "fast")),
     r"metrics\.json: images_per_s='fast': expected a number"),
]
CONFIG_CASES = [
    ("config-list", write(CONFIG, "[]"), r"config\.json: expected a JSON object, got a list"),
    ("config-deep", write(CONFIG, DEEP), r"config\.json: nested deeper than 32 levels"),
    ("eval-batch-size-0", edit_json(CONFIG, put("eval_batch_size", 0)),
     r"config\.json: eval_batch_size=0: expected an integer >= 1"),
    ("eval-batch-size-text", edit_json(CONFIG, put("eval_batch_size", "all")),
     r"config\.json: eval_batch_size='all': expected an integer"),
    ("lr-text", edit_json(CONFIG, put("lr", "fast")), r"config\.json: lr='fast': expected a number"),
    ("config-tta-shift-400", edit_json(CONFIG, put("tta_shift", 400)),
     r"config\.json: tta_shift=400: expected an integer from 0 to 4"),
    ("device-unknown", edit_json(CONFIG, put("device", "tpu")),
     r"config\.json: device='tpu': expected one of auto, cpu"),
    ("config-class-names-string", edit_json(CONFIG, put("class_names", "abcdefghij")),
     r"config\.json: class_names='abcdefghij': expected a list of strings"),
    ("environment-list", edit_json(CONFIG, put("environment", [1])),
     r"config\.json: environment=\[1\]: expected an object"),
    ("split-text", edit_json(CONFIG, put("split", {"train": "many"})),
     r"config\.json: split=\{'train': 'many'\}: expected an object of image counts"),
]
HISTORY_CASES = [
    ("history-dev-zero", as_dev_zero("history.jsonl"), r"history\.jsonl: not a regular file"),
    ("history-huge", write("history.jsonl", "\n" * (5 << 20)), r"history\.jsonl: larger than 4,194,304 bytes"),
    ("history-deep", write("history.jsonl", DEEP + "\n"), r"history\.jsonl: line 1: nested deeper than 32 levels"),
    ("history-row-list", write("history.jsonl", "[1, 2]\n"),
     r"history\.jsonl: line 1: expected a JSON object, got a list"),
    ("history-epoch-text", write("history.jsonl", '{"epoch": "one"}\n'),
     r"history\.jsonl: line 1: epoch='one': expected an integer"),
    ("history-loss-text", write("history.jsonl", '{"epoch": 1, "train_loss": "low"}\n'),
     r"history\.jsonl: line 1: train_loss='low': expected a number"),
]


def _ckpt(change):
    return edit_tensors(CHECKPOINT, change)


CHECKPOINT_CASES = [
    ("no-optimizer-metadata", _ckpt(metadata_do(lambda m: m.pop("optimizer"))),
     r"checkpoint\.safetensors: metadata 'optimizer' is missing \(the optimiser's settings and state"),
    ("no-state-metadata", _ckpt(metadata_do(lambda m: m.pop("state"))),
     r"checkpoint\.safetensors: metadata 'state' is missing \(the training progress"),
    ("optimizer-not-json", _ckpt(metadata_do(lambda m: m.update(optimizer="{oops"))),
     r"checkpoint\.safetensors: metadata 'optimizer': not valid JSON"),
    ("optimizer-deep", _ckpt(metadata_do(lambda m: m.update(optimizer=DEEP))),
     r"checkpoint\.safetensors: metadata 'optimizer': nested deeper than 32 levels"),
    ("optimizer-no-groups", _ckpt(edit_meta_json("optimizer", put("param_groups", []))),
     r"metadata 'optimizer': 0 parameter groups; the optimiser of config\.json has 2"),
    ("optimizer-lr-text", _ckpt(edit_meta_json("optimizer", put("param_groups.0.lr", "fast"))),
     r"metadata 'optimizer': param_groups\[0\]\.lr='fast': expected a number as SGD has"),
    ("optimizer-params-renumbered", _ckpt(edit_meta_json("optimizer", put("param_groups.0.params", [7, 8]))),
     r"metadata 'optimizer': param_groups\[0\]\.params=\[7, 8\]: expected \[0, 1, 2"),
    ("optimizer-state-of-no-parameter", _ckpt(edit_meta_json("optimizer", put("state.99", {}))),
     r"metadata 'optimizer': state\['99'\]: expected the state of one of parameters 0 to 7"),
    ("optimizer-tensor-missing", _ckpt(tensors_do(lambda t: t.pop("optim.0.momentum_buffer"))),
     r"checkpoint\.safetensors: tensor optim\.0\.momentum_buffer is missing"),
    ("optimizer-tensor-wrong-shape", _ckpt(set_tensor("optim.0.momentum_buffer", torch.zeros(3))),
     r"tensor optim\.0\.momentum_buffer is float32 \[3\]; expected floating point of shape \[32, 1, 3, 3\]"),
    ("model-tensor-wrong-shape", _ckpt(set_tensor("model.net.1.weight", torch.zeros(16, 1, 3, 3))),
     r"checkpoint\.safetensors: tensor model\.net\.1\.weight has shape \[16, 1, 3, 3\]; "
     r"the model of config\.json needs"),
    ("model-tensor-int32", _ckpt(set_tensor("model.net.1.bias", torch.zeros(32, dtype=torch.int32))),
     r"tensor model\.net\.1\.bias is int32; expected float32 as saved"),
    ("rng-missing", _ckpt(tensors_do(lambda t: t.pop("extra.rng.cpu"))),
     r"checkpoint\.safetensors: tensor extra\.rng\.cpu is missing \(the random state"),
    ("rng-wrong", _ckpt(set_tensor("extra.rng.cpu", torch.zeros(5, dtype=torch.int32))),
     r"tensor extra\.rng\.cpu is int32 \[5\]; expected a random state \(uint8 \[5056\]\)"),
    ("epoch-rng-missing-mid-epoch", _ckpt(tensors_do(lambda t: t.pop("extra.rng.epoch"))),
     r"tensor extra\.rng\.epoch is missing \(a mid-epoch stop's random stream"),
    ("ema-missing", _ckpt(drop_prefix("extra.ema.")),
     r"checkpoint\.safetensors: tensors extra\.ema\.\* are missing \(the moving average of the weights"),
    ("best-missing", _ckpt(drop_prefix("extra.best.")),
     r"checkpoint\.safetensors: tensors extra\.best\.\* are missing \(the best epoch's weights"),
    ("ema-wrong-shape", _ckpt(set_tensor("extra.ema.net.1.bias", torch.zeros(3))),
     r"tensor extra\.ema\.net\.1\.bias has shape \[3\]; the moving average of the weights needs \[32\]"),
    ("state-unknown-field", _ckpt(edit_meta_json("state", put("bogus", 1))),
     r"metadata 'state': unknown field\(s\) bogus; expected those of best, best_epoch"),
    ("state-epoch-text", _ckpt(edit_meta_json("state", put("epoch", "one"))),
     r"metadata 'state': epoch='one': expected an integer >= 0"),
    ("state-partial-text", _ckpt(edit_meta_json("state", put("partial.step", "x"))),
     r"metadata 'state': partial\.step='x': expected an integer >= 0"),
    ("state-history-row", _ckpt(edit_meta_json("state", put("history", [[1]]))),
     r"metadata 'state': history=\[\[1\]\]: expected a list of epoch rows"),
    ("unknown-tensor", _ckpt(set_tensor("evil", torch.zeros(1))),
     r"checkpoint\.safetensors: unexpected tensor\(s\) evil"),
    ("checkpoint-garbage", write(CHECKPOINT, "garbage"), r"checkpoint\.safetensors: not a readable checkpoint"),
    ("resume-config-2M-units", edit_json(CONFIG, put("model_args", {"dense": [2_000_000]})),
     r"config\.json: model_args .*1,622,009,578 parameters; the limit is 100,000,000"),
]


def ids(cases):
    return [c[0] for c in cases]


def one_line_error(capsys, command: str, rc: int, pattern: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"fashionlab {command}: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err


# --------------------------------------------------------------------------- the model and its weights

@pytest.mark.parametrize("case, edit, message", MODEL_CASES + WEIGHT_CASES, ids=ids(MODEL_CASES + WEIGHT_CASES))
def test_a_bad_model_or_weights_is_one_line_from_the_api_and_the_cli(made, tmp_path, capsys, case, edit, message):
    folder = damaged(made, tmp_path, edit)
    run = api.Run(folder)
    with pytest.raises(RunError, match=message):
        run.evaluate(DS)
    with pytest.raises(RunError, match=message):
        run.predict(DS.test_images[:2])
    one_line_error(capsys, "evaluate", cli.main(["evaluate", str(folder), "--data-dir", str(made["idx"]), "--offline"]),
                   message)
    one_line_error(capsys, "predict", cli.main(["predict", str(folder), str(made["images"])]), message)


EXPORT_AND_SERVE = ["family-list", "dense-2M-units", "5-class-names-for-10-outputs", "weights-wrong-shape",
                    "weights-int32"]


@pytest.mark.parametrize("case, edit, message", [c for c in MODEL_CASES + WEIGHT_CASES if c[0] in EXPORT_AND_SERVE],
                         ids=EXPORT_AND_SERVE)
def test_export_package_report_and_serve_refuse_a_bad_model(made, tmp_path, case, edit, message):
    from fashionlab import serve
    folder = damaged(made, tmp_path, edit)
    run = api.Run(folder)
    with pytest.raises(RunError, match=message):
        run.export(dataset=DS)
    with pytest.raises(RunError, match=message):
        run.package()
    with pytest.raises(RunError, match=message):
        run.report(dataset=DS, with_explain=False)
    with pytest.raises(RunError, match=message):
        serve.create_app(serve.Settings.from_env({}, run=str(folder), samples=0))
    written = {p.name for p in folder.iterdir()} - {p.name for p in made["finished"].iterdir()}
    assert not written  # no ONNX file, archive, report or figure


def test_a_refused_description_allocates_nothing(made, tmp_path):
    """The 2,000,000-unit dense layer would take 6.5 GB for its weights alone; refusing it takes no memory."""
    import resource
    folder = damaged(made, tmp_path, MODEL_CASES[ids(MODEL_CASES).index("dense-2M-units")][1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RunError, match="parameters; the limit is"):
        api.Run(folder).load_model()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: under 200 MB


# --------------------------------------------------------------------------- metrics, settings, history

@pytest.mark.parametrize("case, edit, message", METRICS_CASES, ids=ids(METRICS_CASES))
def test_bad_metrics_are_one_line_from_the_api_and_evaluate(made, tmp_path, capsys, case, edit, message):
    folder = damaged(made, tmp_path, edit)
    with pytest.raises(RunError, match=message):
        api.Run(folder).metrics
    with pytest.raises(RunError, match=message):
        api.run_summary_html(api.Run(folder))
    with pytest.raises(RunError, match=message):
        api.Run(folder).evaluate(DS)
    one_line_error(capsys, "evaluate", cli.main(["evaluate", str(folder), "--data-dir", str(made["idx"]), "--offline"]),
                   message)


@pytest.mark.parametrize("case, edit, message", CONFIG_CASES, ids=ids(CONFIG_CASES))
def test_bad_settings_are_one_line_from_the_api_and_evaluate(made, tmp_path, capsys, case, edit, message):
    folder = damaged(made, tmp_path, edit)
    with pytest.raises(RunError, match=message):
        api.Run(folder).config
    with pytest.raises(RunError, match=message):
        api.Run(folder).evaluate(DS)
    one_line_error(capsys, "evaluate", cli.main(["evaluate", str(folder), "--data-dir", str(made["idx"]), "--offline"]),
                   message)


@pytest.mark.parametrize("case, edit, message", HISTORY_CASES, ids=ids(HISTORY_CASES))
def test_bad_history_is_one_line(made, tmp_path, case, edit, message):
    folder = damaged(made, tmp_path, edit)
    with pytest.raises(RunError, match=message):
        api.Run(folder).history
    with pytest.raises(RunError, match=message):
        api.Run(folder).report(dataset=DS, with_explain=False)


def test_per_class_scores_of_other_classes_are_refused_by_the_report(made, tmp_path):
    def rename(metrics):
        metrics["per_class"] = {f"other{i}": scores for i, scores in enumerate(metrics["per_class"].values())}
    folder = damaged(made, tmp_path, edit_json(METRICS, rename))
    with pytest.raises(RunError, match=r"metrics\.json: per_class has classes \['other0'.*; the run's are \['class0'"):
        api.Run(folder).report(dataset=DS, with_explain=False)


def test_a_run_trained_on_a_gpu_is_still_read_on_a_machine_without_one(made, tmp_path):
    folder = damaged(made, tmp_path, edit_json(CONFIG, put("device", "cuda")))
    assert api.Run(folder).config.device == "cuda"
    assert len(api.Run(folder).predict(DS.test_images[:2])) == 2


def test_a_diverged_runs_nan_loss_is_still_its_record(made, tmp_path):
    folder = damaged(made, tmp_path, edit_json(METRICS, put("test_loss", float("nan"))))
    assert np.isnan(api.Run(folder).metrics["test_loss"])


# --------------------------------------------------------------------------- checkpoints

def test_the_interrupted_run_resumes_through_the_checks(made, tmp_path):
    folder = damaged(made, tmp_path, lambda f: None, "interrupted")
    state = json.loads(safe_open(str(folder / CHECKPOINT), "pt").metadata()["state"])
    assert state["partial"] and state["best_epoch"] == 1  # the fixture covers the mid-epoch and best-weights parts
    assert api.Run(folder).resume(quiet=True, dataset=DS).status == run_mod.FINISHED


@pytest.mark.parametrize("case, edit, message", CHECKPOINT_CASES, ids=ids(CHECKPOINT_CASES))
def test_a_bad_checkpoint_is_one_line_and_left_as_it_was(made, tmp_path, capsys, case, edit, message):
    folder = damaged(made, tmp_path, edit, "interrupted")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(RunError, match=message):
        api.Run(folder).resume(quiet=True, dataset=DS)
    one_line_error(capsys, "train", cli.main(["train", "--resume", str(folder), "--quiet", "--data-dir",
                                              str(made["idx"]), "--offline"]), message)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing written, nothing half-written


def test_the_checkpoint_state_fields_are_those_of_train_state():
    import dataclasses
    assert set(schema.TRAIN_STATE) == {f.name for f in dataclasses.fields(training.TrainState)}


# --------------------------------------------------------------------------- the command line, for real

CLI_CASES = [("family-list", "evaluate"), ("weights-int32", "predict"), ("accuracy-text", "evaluate"),
             ("no-optimizer-metadata", "train")]


@pytest.mark.parametrize("case, command", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_the_fashionlab_command_prints_one_line(made, tmp_path, case, command):
    every = {c[0]: c for c in MODEL_CASES + WEIGHT_CASES + METRICS_CASES + CHECKPOINT_CASES}
    _, edit, message = every[case]
    folder = damaged(made, tmp_path, edit, "interrupted" if command == "train" else "finished")
    data_args = ["--data-dir", str(made["idx"]), "--offline"]
    args = {"evaluate": ["evaluate", str(folder), *data_args], "predict": ["predict", str(folder), str(made["images"])],
            "train": ["train", "--resume", str(folder), "--quiet", *data_args]}[command]
    proc = run_cli(*args, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"fashionlab {command}: error: ") and re.search(message, proc.stderr), proc.stderr


def test_every_registered_model_fits_the_limits():
    from fashionlab import models
    from fashionlab.models._registry import meta_model
    for name, entry in models.MODELS.items():
        model, outputs = meta_model(entry.family, entry.kwargs)
        assert outputs == 10 and all(p.device.type == "meta" for p in model.parameters()), name


def test_user_error_is_what_every_entry_point_catches():
    assert issubclass(RunError, UserError)


# --------------------------------------------------------------------------- an exported model's metadata

@pytest.mark.parametrize("names, message", [
    ('"abcdefghij"', r"model\.onnx: metadata: class_names='abcdefghij': expected a list of distinct"),
    (json.dumps([f"c{i}" for i in range(5)]), r"model\.onnx: metadata: 5 class names for 10 outputs"),
    (DEEP, r"model\.onnx: metadata class_names: nested deeper than 32 levels"),
], ids=["one-string", "5-names", "deep"])
def test_an_exported_models_class_names_are_checked_as_model_jsons(made, tmp_path, names, message):
    import onnx
    from fashionlab import export
    folder = damaged(made, tmp_path, lambda f: None)
    api.Run(folder).export(dataset=DS, parity_images=20)
    proto = onnx.load(str(folder / "model.onnx"))
    next(p for p in proto.metadata_props if p.key == "class_names").value = names
    onnx.save(proto, str(folder / "model.onnx"))
    with pytest.raises(UserError, match=message):
        export.OnnxPredictor.from_run(folder)
