"""Sweeps: spec validation, the design, duplicate-free sharing, fault tolerance on real storage, the report."""

from __future__ import annotations

import functools
import json
import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from conftest import run_cli, synthetic_dataset
from fashionlab import sweeps
from sweep_support import CLASSES, postgres_cluster, start_sweep, tiny_spec, wait_for, write_idx_dataset, write_spec



@pytest.fixture(autouse=True)
def _one_torch_thread():
    """In-process trainings on one thread, as the worker processes here run (--threads 1): on a
    shared 2-core machine two intra-op threads mostly wait for each other."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- spec validation

BASE = """
[experiment]
name = "x"
model = "cnn"
[factors]
kernel = [3, 5]
"""


@pytest.mark.parametrize("body, field, expected", [
    ("[experiment\nname = 1", "not valid TOML", ""),
    (BASE + "[extra]\na = 1\n", "[extra]", "unknown section"),
    (BASE.replace('model = "cnn"', 'model = "cnn"\nsampler = "gird"'), "[experiment] sampler", "one of grid, random, tpe"),
    (BASE.replace('model = "cnn"', 'model = "cnnn"'), "[experiment] model", "unknown model 'cnnn'"),
    (BASE.replace('model = "cnn"', 'model = "cnn"\nseeds = 0'), "[experiment] seeds", ">= 1"),
    (BASE.replace('model = "cnn"', 'model = "cnn"\nsampler = "tpe"'), "[experiment] points", "number of design points"),
    (BASE.replace('name = "x"', 'name = "a b"'), "[experiment] name", "letters, digits"),
    (BASE + "colour = [1]\n", "[factors] colour", "not a training setting or an argument of model 'cnn'"),
    (BASE + "lr = ['fast']\n", "[factors] lr", "expected a number"),
    (BASE + "pool = []\n", "[factors] pool", "non-empty list"),
    (BASE + "pool = ['max', 'max']\n", "[factors] pool", "distinct levels"),
    (BASE + "[train]\nkernel = 3\n", "[train] kernel", "unknown training setting"),
    (BASE + "[train]\nepochs = 'ten'\n", "[train] epochs", "expected an integer"),
    (BASE + "[train]\nseed = 3\n", "[train] seed", "set this in [experiment]"),
    (BASE + "[model_args]\nkernel = 3\n", "[factors] kernel", "also set in [model_args]"),
    (BASE + "[model_args]\nwings = 2\n", "[model_args] wings", "not an argument of model 'cnn'"),
    (BASE + "pool = ['max', 'triangle']\n", "design point kernel=3, pool=triangle", "pool must be one of"),
    (BASE + "depth = [9]\n", "design point kernel=3, depth=9", "too small"),
    (BASE + "[report]\nheatmap = ['kernel', 'nope']\n", "[report] heatmap", "two different factor names"),
    (BASE.replace('model = "cnn"', 'model = "cnn"\nmetric = "test_accuracy"'), "[experiment] metric",
     "test_accuracy is a test score, and the metric is what the sweep chooses settings by"),
    (BASE.replace('model = "cnn"', 'model = "cnn"\nmetric = "test_loss"'), "[experiment] metric", "Use val_loss"),
    (BASE + "[train]\nval_split = 0.0\n", "[train] val_split", "measured on a validation split"),
])
def test_spec_errors_name_file_field_and_expectation(tmp_path, body, field, expected):
    path = write_spec(tmp_path, body)
    with pytest.raises(sweeps.SpecError) as e:
        sweeps.load_spec(path)
    message = str(e.value)
    assert str(path) in message and field in message and expected in message, message


def test_cli_prints_spec_errors_without_traceback(tmp_path):
    path = write_spec(tmp_path, BASE.replace('model = "cnn"', 'model = "cnn"\nsampler = "gird"'))
    proc = run_cli("sweep", str(path), timeout=120)
    assert proc.returncode == 2
    assert f"{path}: [experiment] sampler" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("sweep-report", str(tmp_path / "missing.toml"), timeout=120)
    assert proc.returncode == 2 and "experiment spec not found" in proc.stderr


# --------------------------------------------------------------------------- design

def test_factors_map_onto_the_convnet_family_and_training_settings(tmp_path):
    path = write_spec(tmp_path, BASE.replace("kernel = [3, 5]", "filters = [8, 16]\ndepth = [1, 3]\nlr = [0.01, 0.001]\n"
                                                                "pool = ['avg', 'stride']")
                      .replace('model = "cnn"', 'model = "cnn"\nseeds = [7, 11]'))
    spec = sweeps.load_spec(path)
    points = sweeps.design_points(spec)
    assert len(points) == 16 and spec.total_trials == 32 and spec.seeds == (7, 11)
    keys = {sweeps.trial_key(p, s) for p in points for s in spec.seeds}
    assert len(keys) == 32  # every (point, seed) has its own key and run folder
    cfg = sweeps.trial_config(spec, {"filters": "16", "depth": "3", "lr": "0.01", "pool": "stride"}, 11)
    assert cfg.model_args["channels"] == [16, 32, 64] and cfg.model_args["pool"] == "stride"
    assert cfg.lr == 0.01 and cfg.seed == 11 and cfg.model == "cnn"
    from fashionlab import models
    net = models.build_model(cfg.model, **cfg.model_args)
    convs = [m for m in net.modules() if m.__class__.__name__ == "Conv2d"]
    assert [c.out_channels for c in convs] == [16, 32, 64] and all(c.stride == (2, 2) for c in convs)


def test_random_design_draws_distinct_points_reproducibly(tmp_path):
    body = BASE.replace('model = "cnn"', 'model = "cnn"\nsampler = "random"\npoints = 5') + "pool = ['max', 'avg', 'stride']\n"
    spec = sweeps.load_spec(write_spec(tmp_path, body))
    first, again = sweeps.design_points(spec), sweeps.design_points(spec)
    assert first == again and len(first) == 5
    assert len({sweeps.point_id(p) for p in first}) == 5


# --------------------------------------------------------------------------- workers in-process

def test_a_changed_design_is_refused_against_the_existing_study(tmp_path):
    first = sweeps.load_spec(write_spec(tmp_path, BASE, "a.toml"))
    storage = sweeps.open_storage(f"sqlite:///{tmp_path / 'shared.db'}")
    study = sweeps.open_study(first, storage)
    assert len(study.get_trials()) == 2 * 3  # 2 points x 3 seeds, queued once
    assert len(sweeps.open_study(first, storage).get_trials()) == 6  # joining again queues nothing more
    changed = sweeps.load_spec(write_spec(tmp_path, BASE.replace("[3, 5]", "[3, 7]"), "b.toml"))
    with pytest.raises(sweeps.SpecError, match=r"b.toml: the study 'x' .* different design \(differs in: factors\)"):
        sweeps.open_study(changed, storage)


def test_duplicate_enqueue_is_pruned_and_finished_runs_are_reused(tmp_path):
    spec = sweeps.load_spec(tiny_spec(tmp_path, seeds=1, epochs=1, filters="[4]"))
    spec.folder.mkdir(parents=True)
    storage = sweeps.open_storage(spec.default_storage(), 1, 3)
    study = sweeps.open_study(spec, storage)
    first = sweeps.design_points(spec)[0]
    # A second starter that enqueued the design again (the race the guard exists for).
    study.enqueue_trial(first, user_attrs=sweeps.trial_attrs(first, 0))
    worker = sweeps.Worker(spec, storage)
    final = worker.run()
    assert final.finished and final.done == 2 and worker.trained == 2
    trials = study.get_trials()
    complete = [t.user_attrs["key"] for t in trials if t.state.name == "COMPLETE"]
    assert sorted(complete) == sorted(sweeps.trial_key(p, 0) for p in sweeps.design_points(spec))
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert len(pruned) == 1 and pruned[0].user_attrs["key"] == sweeps.trial_key(first, 0)
    assert "duplicate_of" in pruned[0].user_attrs

    # The database is lost: a new sweep over the same folder reuses every finished run folder.
    (spec.folder / "sweep.db").unlink()
    again = sweeps.Worker(spec, sweeps.open_storage(spec.default_storage(), 1, 3))
    assert again.run().done == 2
    assert again.trained == 0 and again.reused == 2


def test_tpe_runs_each_point_with_every_seed(tmp_path):
    spec = sweeps.load_spec(tiny_spec(tmp_path, seeds=2, epochs=1, extra='sampler = "tpe"\npoints = 2'))
    spec.folder.mkdir(parents=True)
    worker = sweeps.Worker(spec, sweeps.open_storage(spec.default_storage(), 1, 3))
    final = worker.run()
    assert final.finished and final.done == 4 and final.points_tried == 2
    res = sweeps.analyse(spec, sweeps.collect(spec, worker.storage))
    assert len(res.points) == 2 and all(r.seeds == 2 for r in res.points)


# --------------------------------------------------------------------------- real processes, real storage

@functools.lru_cache(maxsize=None)
def _storage(url: str):
    return sweeps.open_storage(url)


def _trials(url: str, name: str):
    import optuna
    try:
        return optuna.load_study(study_name=name, storage=_storage(url)).get_trials(deepcopy=False)
    except KeyError:  # the workers have not created the study yet
        return []


def _running_trial_of(url: str, name: str, pids: set[int]):
    for t in _trials(url, name):
        worker = t.user_attrs.get("worker", "")
        if t.state.name == "RUNNING" and worker and int(worker.rsplit(":", 1)[1]) in pids:
            return t
    return None


def _assert_every_point_complete_once(spec, url: str):
    trials = _trials(url, spec.name)
    expected = sorted(sweeps.trial_key(p, s) for p in sweeps.design_points(spec) for s in spec.seeds)
    complete = sorted(t.user_attrs["key"] for t in trials if t.state.name == "COMPLETE")
    assert complete == expected, f"complete keys {complete} != design {expected}"
    for t in trials:
        if t.state.name == "COMPLETE":
            assert Path(t.user_attrs["run_dir"], "metrics.json").exists()
    return trials


def _killed_and_redone(trials, killed):
    failed = [t for t in trials if t.number == killed.number]
    assert failed and failed[0].state.name == "FAIL", "the killed worker's trial must end FAIL (stale heartbeat)"
    redo = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs["key"] == killed.user_attrs["key"]]
    assert len(redo) == 1 and redo[0].number > killed.number
    assert redo[0].system_attrs.get("failed_trial") == killed.number


def test_sqlite_sweep_survives_a_killed_worker(tmp_path):
    spec_path = tiny_spec(tmp_path, name="tiny-sqlite")
    spec = sweeps.load_spec(spec_path)
    url = spec.default_storage()
    log = tmp_path / "sweep.log"
    args = [str(spec_path), "--workers", "2", "--heartbeat-interval", "1", "--grace-period", "3", "--threads", "1"]
    parent = start_sweep(*args, log=log)
    try:
        def child_pids():
            import subprocess
            out = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout
            return {int(p) for p in out.split()}
        wait_for(lambda: (spec.folder / "sweep.db").exists(), 60, "the SQLite storage")
        victim = wait_for(lambda: _running_trial_of(url, spec.name, child_pids()), 90, "a worker's running trial")
        os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
        assert parent.wait(timeout=120) == 0, log.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
    trials = _assert_every_point_complete_once(spec, url)
    _killed_and_redone(trials, victim)
    assert "8/8 done" in log.read_text() and (spec.folder / "report.html").exists()

    # Restarted when everything is finished: nothing is trained again.
    before = len(trials)
    proc = run_cli("sweep", str(spec_path), "--heartbeat-interval", "1", "--grace-period", "3", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(_trials(url, spec.name)) == before


def test_opening_a_new_sqlite_storage_waits_for_another_opening(tmp_path):
    """Two processes creating the schema of one new SQLite file at once would collide ('table
    already exists'); the second waits on the lock file beside the database until the first is done."""
    import fcntl
    import subprocess
    import sys
    db = tmp_path / "sweep.db"
    code = ("import sys; from fashionlab import sweeps; print('opening', flush=True); "
            "sweeps.open_storage(sys.argv[1]); print('opened', flush=True)")
    with open(f"{db}.open-lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a process in the middle of creating the schema holds it
        proc = subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(sweeps.__file__).parents[2])})
        try:
            assert proc.stdout.readline().strip() == "opening"
            time.sleep(2)
            assert proc.poll() is None and not db.exists()  # still waiting: nothing created under the lock
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "opened"
    import sqlite3
    tables = {row[0] for row in sqlite3.connect(db).execute("select name from sqlite_master where type='table'")}
    assert {"studies", "trials", "study_directions"} <= tables


def test_postgres_two_workers_one_killed_and_restarted(tmp_path):
    spec_path = tiny_spec(tmp_path, name="tiny-pg")
    spec = sweeps.load_spec(spec_path)
    with postgres_cluster() as url:
        args = [str(spec_path), "--storage", url, "--heartbeat-interval", "1", "--grace-period", "3", "--threads", "1"]
        a = start_sweep(*args, log=tmp_path / "a.log")
        b = start_sweep(*args, log=tmp_path / "b.log")
        procs = [a, b]
        try:
            victim = wait_for(lambda: _running_trial_of(url, spec.name, {a.pid}), 120, "worker A's running trial",
                              interval=0.1)
            a.send_signal(signal.SIGKILL)
            a.wait(timeout=30)
            # The same command started again on "machine A" joins the sweep where it stands.
            a2 = start_sweep(*args, log=tmp_path / "a2.log")
            procs.append(a2)
            assert b.wait(timeout=150) == 0, (tmp_path / "b.log").read_text()
            assert a2.wait(timeout=150) == 0, (tmp_path / "a2.log").read_text()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        trials = _assert_every_point_complete_once(spec, url)
        _killed_and_redone(trials, victim)
        # The design really was shared between processes: the killed worker had claimed a trial and
        # another finished the rest (on a fast machine the survivor may finish everything before the
        # restarted worker has even started, so completions alone need not span two processes).
        workers = {t.user_attrs.get("worker") for t in trials if t.state.name in ("COMPLETE", "FAIL")}
        assert len(workers - {None}) >= 2

        report = run_cli("sweep-report", str(spec_path), "--storage", url, timeout=120)
        assert report.returncode == 0, report.stderr
        assert "kernel" in report.stdout and "best" in report.stdout


# --------------------------------------------------------------------------- report

def _runs(values_by_level: dict[str, list[float]]):
    # The test score of each run is 0.1 below its validation score: reported beside it, never choosing.
    return [sweeps.RunResult({"kernel": level, "filters": "8"}, seed, v, {"test_accuracy": v - 0.1})
            for level, values in values_by_level.items() for seed, v in enumerate(values)]


def test_report_finds_real_differences_and_not_noise(tmp_path):
    spec = sweeps.load_spec(write_spec(tmp_path, BASE.replace("kernel = [3, 5]", "kernel = [3, 5, 7]\nfilters = [8]")))
    runs = _runs({"3": [0.900, 0.902, 0.901, 0.899], "5": [0.880, 0.881, 0.879, 0.882], "7": [0.901, 0.899, 0.903, 0.898]})
    res = sweeps.analyse(spec, runs)
    rows = {r.label: r for r in res.levels["kernel"]}
    assert rows["3"].verdict == "best" and rows["3"].n == 4 and rows["3"].seeds == 4
    assert rows["5"].verdict == "worse, significant" and rows["5"].p_adj < 0.05
    assert rows["7"].verdict == "not significantly different"
    from scipy import stats
    assert rows["5"].p == pytest.approx(stats.ttest_ind(rows["5"].values, rows["3"].values, equal_var=False).pvalue)
    assert rows["5"].p_adj == pytest.approx(min(1.0, 2 * rows["5"].p))  # Holm: the smaller p times 2
    assert rows["3"].std == pytest.approx(stats.tstd(rows["3"].values))
    table = sweeps.text_table(res)
    assert "worse, significant" in table and "not significantly different" in table
    assert spec.metric == "val_accuracy" and "chosen by val_accuracy" in table and "test_accuracy of the same runs" in table
    assert rows["3"].test_mean == pytest.approx(rows["3"].mean - 0.1)
    assert "test_accuracy mean (reported, not used to choose)" in sweeps.markdown_table(res)

    html = sweeps.render_html(res)
    assert html.count("data:image/png;base64,") == 2  # main effects and the kernel x filters heatmap
    assert "http://" not in html and "https://" not in html  # self-contained


def test_holm_adjustment_is_monotone_and_capped():
    assert sweeps.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert sweeps.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


@pytest.mark.parametrize("name", ["a{b}", "a?b", "a#b", "a%20b", "a b"])
def test_sqlite_storage_lives_in_any_folder_name(tmp_path, name):
    import optuna
    from fashionlab.sweeps.storage import sqlite_url
    folder = tmp_path / name
    folder.mkdir()
    url = sqlite_url(folder / "sweep.db")
    optuna.create_study(storage=sweeps.open_storage(url), study_name="s").enqueue_trial({"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == [name]  # the database is in the folder, not beside it
    assert (folder / "sweep.db").is_file()
    assert len(optuna.load_study(storage=sweeps.open_storage(url), study_name="s").trials) == 1
