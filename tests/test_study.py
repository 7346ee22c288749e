"""Studies: seeds, progress, resume (finished runs are reused, never retrained) and comparison."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli, synthetic_dataset
from fashionlab import studies as study
from fashionlab.errors import UserError
from report_support import img_sources

DS = synthetic_dataset(n_train=200, n_test=100)
QUICK = {"epochs": 1, "batch_size": 64}


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.rglob("model.safetensors"))}


def test_study_trains_every_model_and_seed_then_resumes_without_training(tmp_path):
    lines = []
    first = study.run_study("dense-vs-conv", tmp_path, seeds=2, dataset=DS, overrides=QUICK,
                            log=lines.append, run_reports=False)
    assert len(first["trained"]) == 4 and first["reused"] == []
    for model in ("cnn", "mlp"):
        for seed in (0, 1):  # the recipe's seed (0) and the next
            cfg = json.loads((tmp_path / model / f"seed-{seed}" / "config.json").read_text())
            assert cfg["model"] == model and cfg["seed"] == seed and cfg["recipe"] == "dense-vs-conv"
    # progress names the model, the seed and the epoch
    assert any(line.startswith("[1/4] cnn seed 0 epoch 1/1:") for line in lines)
    assert any(line.startswith("[4/4] mlp seed 1 epoch 1/1:") for line in lines)
    before = _mtimes(tmp_path)

    lines.clear()
    second = study.run_study("dense-vs-conv", tmp_path, seeds=2, dataset=DS, overrides=QUICK,
                             log=lines.append, run_reports=False)
    assert second["trained"] == [] and len(second["reused"]) == 4
    assert _mtimes(tmp_path) == before  # nothing retrained, nothing rewritten
    assert not any("epoch" in line for line in lines)
    assert second["summary"] == first["summary"]

    # asking for a third seed trains only that seed's runs
    third = study.run_study("dense-vs-conv", tmp_path, seeds=3, dataset=DS, overrides=QUICK,
                            log=lines.append, run_reports=False)
    assert sorted(p.parent.name + "/" + p.name for p in third["trained"]) == ["cnn/seed-2", "mlp/seed-2"]


def test_study_refuses_runs_trained_with_other_settings(tmp_path):
    study.run_study("cnn-vs-rnn", tmp_path, seeds=1, dataset=DS, overrides=QUICK, log=lambda m: None,
                    run_reports=False)
    with pytest.raises(UserError, match="epochs: saved 1, asked 2"):
        study.run_study("cnn-vs-rnn", tmp_path, seeds=1, dataset=DS, overrides={**QUICK, "epochs": 2},
                        log=lambda m: None, run_reports=False)


def test_cnn_vs_rnn_seeds_start_at_the_recipe_seed():
    assert study.study_seeds(study.get_study("cnn-vs-rnn"), 3) == [4, 5, 6]
    assert study.study_seeds(study.get_study("dense-vs-conv"), 2) == [0, 1]
    assert set(study.get_study("zoo").model_names()) >= {"mlp", "cnn", "cnn_small", "lstm", "vgg"}
    with pytest.raises(study.StudyError, match="unknown study 'nope'; known studies: audit-exclude, cnn-vs-rnn, dense-vs-conv, zoo"):
        study.get_study("nope")


def test_comparison_reports_mean_and_std_over_seeds(tmp_path):
    res = study.run_study("dense-vs-conv", tmp_path, seeds=2, dataset=DS, overrides=QUICK, log=lambda m: None,
                          run_reports=False)
    html = res["report"].read_text()
    assert set(img_sources(html)) == {"compare_accuracy", "compare_per_class", "compare_confusion", "compare_curves"}
    for name in ("compare_accuracy", "compare_per_class", "compare_confusion", "compare_curves"):
        assert (tmp_path / f"{name}.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    for model in ("cnn", "mlp"):
        accs = [json.loads((tmp_path / model / f"seed-{s}" / "metrics.json").read_text())["test_accuracy"]
                for s in (0, 1)]
        assert summary[model]["test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert summary[model]["test_accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
        assert f"{np.mean(accs) * 100:.2f} ± {np.std(accs, ddof=1) * 100:.2f}" in html
    assert "gain of cnn over mlp" in html

    # `compare` builds the same page from existing runs
    out = tmp_path / "cmp" / "compare.html"
    page, summary2 = study.write_comparison(sorted(tmp_path.glob("*/seed-*")), out)
    assert summary2["cnn"]["test_accuracy"] == summary["cnn"]["test_accuracy"]
    assert set(img_sources(page.read_text())) == set(img_sources(html))


def test_every_run_of_a_study_gets_its_report_linked_from_the_comparison(tmp_path):
    res = study.run_study("cnn-vs-rnn", tmp_path, seeds=1, dataset=DS, overrides=QUICK, log=lambda m: None)
    html = res["report"].read_text()
    for model in ("cnn_small", "lstm"):
        assert (tmp_path / model / "seed-4" / "report.html").exists()
        assert f'href="{model}/seed-4/report.html"' in html


def _summary(accs, shirt):
    per = {n: {"mean": .9, "std": 0.0, "values": [.9]} for n in ("T-shirt/top", "Coat")}
    per["Shirt"] = {"mean": shirt, "std": 0.0, "values": [shirt]}
    return {"test_accuracy": {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                              "values": list(accs)},
            "per_class_accuracy": per, "hardest_class": "Shirt"}


def test_claims_are_welch_tests_with_n_and_p_and_say_when_runs_are_too_few():
    from scipy import stats
    cnn, lstm = [.881, .879, .883], [.862, .860, .861]
    lines = study.claims({"cnn_small": _summary(cnn, .6), "lstm": _summary(lstm, .55)}, {"cnn_small": .88, "lstm": .862})
    p = stats.ttest_ind(cnn, lstm, equal_var=False).pvalue
    assert lines[0].startswith("cnn_small beats lstm: 88.10% against 86.10% mean test accuracy (+2.00 points; "
                               "n = 3 and 3; Welch's t-test p = ")
    assert f"p = {p:.2g})" in lines[0]
    assert "Hardest class for lstm: Shirt (55.00% mean accuracy)." in lines
    assert any(line.startswith("cnn_small: 88.10% here (n = 3) against 88.00% reported (+0.10 points): the reported "
                               "figure lies within our spread") for line in lines)
    assert any("The reference study's winner, cnn_small, wins here too" in line for line in lines)

    close = study.claims({"a": _summary([.90, .91, .89], .6), "b": _summary([.905, .895, .90], .6)}, {})
    assert close[0].startswith("a and b are not significantly different")
    few = study.claims({"a": _summary([.95], .6), "b": _summary([.10], .6)}, {})
    assert "not enough runs to say which is better (3 seeds per model are needed for a test)" in few[0]


def test_a_study_on_a_cut_budget_is_not_compared_with_the_reference(tmp_path):
    res = study.run_study("cnn-vs-rnn", tmp_path, seeds=1, dataset=DS, overrides=QUICK, log=lambda m: None,
                          run_reports=False)
    html = res["report"].read_text()
    assert "are for the full cnn-vs-rnn recipe; these runs changed it (epochs 1, batch_size 64)" in html
    assert "reported (" not in html and "within our spread" not in html


def test_runs_trained_differently_are_flagged_before_any_claim(tmp_path):
    import fashionlab as fl
    a = fl.train(model="mlp", out=tmp_path / "a", dataset=DS, quiet=True, epochs=1)
    b = fl.train(model="cnn_small", out=tmp_path / "b", dataset=DS, quiet=True, epochs=2, subset=100)
    page = fl.compare([a.path, b.path], out=tmp_path / "cmp.html").report.read_text()
    assert "These runs were not trained alike (epochs 1 / 2; subset 100 / null)" in page


def test_compare_cli_rejects_unfinished_runs(tmp_path):
    proc = run_cli("compare", str(tmp_path), "--out", str(tmp_path / "c.html"))
    assert proc.returncode == 2 and "metrics.json is missing" in proc.stderr and "Traceback" not in proc.stderr


def test_study_cli_on_real_data_shows_progress_and_resumes(real_data, tmp_path):
    args = ("study", "cnn-vs-rnn", "--seeds", "1", "--epochs", "1", "--subset", "200", "--no-run-reports",
            "--out", str(tmp_path), "--device", "cpu")
    first = run_cli(*args, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "[1/2] cnn_small seed 4 epoch 1/1" in first.stderr and "[2/2] lstm seed 4 epoch 1/1" in first.stderr
    assert "trained 2 run(s), reused 0" in first.stdout and "Shirt" in (tmp_path / "report.html").read_text()
    second = run_cli(*args, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "trained 0 run(s), reused 2" in second.stdout and "epoch" not in second.stderr


def test_interrupted_study_continues_where_it_stopped(real_data, tmp_path):
    """SIGINT mid-study: the run in progress is checkpointed; the same command finishes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    args = [sys.executable, "-m", "fashionlab", "study", "dense-vs-conv", "--seeds", "1", "--epochs", "2",
            "--subset", "1000", "--no-run-reports", "--out", str(tmp_path), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # wait for the first epoch of the first run, then interrupt
        if "cnn seed 0 epoch 1/2" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "run `fashionlab study dense-vs-conv" in err and (tmp_path / "cnn" / "seed-0" / "checkpoint.safetensors").exists()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[1/2] cnn seed 0: resuming" in done.stderr and "trained 2 run(s), reused 0" in done.stdout
    assert not (tmp_path / "cnn" / "seed-0" / "checkpoint.safetensors").exists()


# --------------------------------------------------------------------------- timings without the warm-up

def _run_files(run_dir):
    from safetensors.torch import load_file
    m = json.loads((run_dir / "metrics.json").read_text())
    hist = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
            for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return load_file(run_dir / "model.safetensors"), m, hist


@pytest.mark.parametrize("settings", [
    # dropout draws from the global random stream; EMA; every augmentation; a last batch of another size
    dict(model="cnn_dropout", augment={"flip": 0.5, "crop": 2, "rotate": 10, "erase": 0.5}, ema=0.9, batch_size=48),
    # BatchNorm statistics, the data-dependent whitening and the frozen stem cache
    dict(recipe="fast", epochs=2, batch_size=64),
])
def test_the_warm_up_changes_nothing_in_the_run(tmp_path, monkeypatch, settings):
    import fashionlab as fl
    from fashionlab.training import Trainer
    opts = {"epochs": 2, "seed": 3, **settings}
    fl.train(out=tmp_path / "warm", dataset=DS, quiet=True, **opts)
    monkeypatch.setattr(Trainer, "warm_up", lambda self: None)
    fl.train(out=tmp_path / "cold", dataset=DS, quiet=True, **opts)
    w_weights, w_metrics, w_hist = _run_files(tmp_path / "warm")
    c_weights, c_metrics, c_hist = _run_files(tmp_path / "cold")
    assert w_weights.keys() == c_weights.keys()
    assert all(w_weights[k].equal(c_weights[k]) for k in w_weights)  # bit for bit
    assert w_hist == c_hist
    for key in ("test_accuracy", "test_loss", "confusion_matrix", "per_class", "ece"):
        assert w_metrics[key] == c_metrics[key]
    assert w_metrics["warmup_seconds"] > 0 and c_metrics["warmup_seconds"] == 0


def test_the_warm_up_is_timed_apart_before_the_first_epoch(tmp_path, monkeypatch):
    """A one-time cost paid in the warm-up (here a 1 s sleep per warm-up step) stays out of the epochs' time."""
    import time
    import fashionlab as fl
    from fashionlab.training import Callback, Trainer
    events = []
    original = Trainer._warm_up_step

    def slow_first_call(self, idx, side):
        time.sleep(1.0)
        original(self, idx, side)
        events.append(("warm-up step", len(idx)))

    class Events(Callback):
        def on_train_start(self, trainer):
            events.append(("train start", None))

        def on_epoch_start(self, trainer, epoch, first_step):
            events.append(("epoch start", epoch))

    monkeypatch.setattr(Trainer, "_warm_up_step", slow_first_call)
    run = fl.train(model="mlp", out=tmp_path / "run", dataset=DS, quiet=True, epochs=1, batch_size=64,
                   val_split=0.2, callbacks=[Events()])
    # 160 training images: one warm-up step at the batch size and one at the last batch's size, both first
    assert events == [("warm-up step", 64), ("warm-up step", 32), ("train start", None), ("epoch start", 0)]
    m = run.metrics
    assert m["warmup_seconds"] >= 2.0
    assert m["train_seconds"] == pytest.approx(sum(r["seconds"] for r in run.history))
    assert m["train_seconds"] + m["warmup_seconds"] <= m["wall_seconds"]  # disjoint: never counted twice


def test_comparisons_show_the_warm_up_and_flag_runs_timed_with_it(tmp_path):
    import fashionlab as fl
    for model in ("mlp", "cnn_small"):
        fl.train(model=model, out=tmp_path / model, dataset=DS, quiet=True, epochs=1)
    page = fl.compare([tmp_path / "mlp", tmp_path / "cnn_small"], out=tmp_path / "cmp.html").report.read_text()
    assert "warm-up, untimed (s)" in page and "Training time and images/s are the timed epochs only" in page
    assert "were trained before the warm-up was timed apart" not in page
    # a run made before the warm-up was timed apart has no warmup_seconds: said, never mixed in silently
    metrics = json.loads((tmp_path / "mlp" / "metrics.json").read_text())
    del metrics["warmup_seconds"]
    (tmp_path / "mlp" / "metrics.json").write_text(json.dumps(metrics))
    page = fl.compare([tmp_path / "mlp", tmp_path / "cnn_small"], out=tmp_path / "cmp.html").report.read_text()
    assert "1 of 2 runs were trained before the warm-up was timed apart" in page and "in epoch 1" in page
