"""Predictor: the layout it predicts in, and its traced passes (bit-identical to the eager model or not used)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from fashionlab import evaluate
from fashionlab.device import resolve
from fashionlab.predict import Predictor
from fashionlab.run import RunFolder, evaluate_run, matches_record
from fashionlab.serve.service import probe_images

from serve_support import real_dataset, trained_run


def test_prediction_runs_nhwc_on_a_cpu_and_evaluation_in_the_layout_training_used(tmp_path):
    run = trained_run()
    folder = RunFolder(run)
    assert folder.record["environment"]["channels_last"]  # trained NHWC on a CPU, in fp32 too
    assert folder.runtime("cpu").channels_last
    assert matches_record(folder, evaluate_run(folder, real_dataset(), device="cpu"))
    # a run trained in fp32 on a CPU before NHWC was chosen there: evaluated as it was trained, NCHW
    old = tmp_path / "old"
    shutil.copytree(run, old)
    record = json.loads((old / "config.json").read_text())
    record["environment"]["channels_last"] = False
    (old / "config.json").write_text(json.dumps(record))
    assert not RunFolder(old).runtime("cpu").channels_last
    assert RunFolder(old).runtime("cpu", predicting=True).channels_last
    predictor = Predictor.from_run(old, device="cpu")
    assert predictor.runtime.channels_last  # prediction: the fastest layout
    model, _ = folder.load_model()
    x = real_dataset().test_images[:500]
    nchw = torch.softmax(evaluate.predict_logits(model, x, RunFolder(old).runtime("cpu")) / predictor.temperature,
                         1).numpy()
    probs = predictor.probabilities(x)
    assert np.abs(probs - nchw).max() < 1e-5  # the layouts differ in the last bits only
    assert (probs.argmax(1) == nchw.argmax(1)).all()


def test_traced_passes_are_bit_identical_to_the_eager_model_at_any_size():
    run = trained_run()
    eager, traced = Predictor.from_run(run, device="cpu"), Predictor.from_run(run, device="cpu")
    # with test-time augmentation, the most calls a pass makes
    for p in (eager, traced):
        p.tta_flip, p.tta_shift = True, 1
    assert "one TorchScript call" in traced.trace(probe_images())
    x = real_dataset().test_images[:300]
    for n, batch_size in ((1, 1000), (2, 1000), (7, 1000), (300, 1000), (300, 64)):
        for a, b in zip(eager.infer(x[:n], batch_size), traced.infer(x[:n], batch_size)):
            assert np.array_equal(a, b, equal_nan=True), (n, batch_size)
    assert traced.probabilities(x[:0]).shape == eager.probabilities(x[:0]).shape  # empty: as the eager path answers


class BatchMeanBranch(torch.nn.Module):
    """A model the tracer cannot capture: it branches on its whole batch's mean brightness."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(784, 10)

    def forward(self, x):
        x = x.flatten(1)
        if float(x.mean()) > 0.5:
            x = x * 2
        return self.head(x)


def test_a_model_whose_trace_would_answer_otherwise_stays_eager():
    info = {"class_names": [str(i) for i in range(10)]}
    predictor = Predictor(BatchMeanBranch(), info, resolve("cpu", "fp32", conv_model=False))
    white = np.full((1, 28, 28), 255, np.uint8)
    probes = np.concatenate([white, np.zeros((3, 28, 28), np.uint8)])  # dark as one batch, white alone
    note = predictor.trace(probes)  # traced on the whole batch: the dark branch only
    assert "run eagerly" in note and "differ" in note
    logits = BatchMeanBranch()(torch.ones(1, 1, 28, 28))
    assert np.array_equal(predictor.probabilities(white), torch.softmax(logits, 1).detach().numpy())
