"""The training step's GPU branches, checked on a CPU: recipes resolved per device, CUDA-graph steps
marked, the random stream on the device, a compiled step, CPU threads, and the GPU check script end
to end in its quick mode."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, synthetic_dataset
from fashionlab import config, device as device_mod, models, run as run_mod, training
from fashionlab.recipes import get_recipe

CPU_HAS_AMX = device_mod.cpu_has_amx  # the real test, before conftest turns the rule off in every test


def pretend_cuda(monkeypatch) -> None:
    """make_config sees a CUDA device (the recipe rule asks only for its type)."""
    real = device_mod.resolve_device
    monkeypatch.setattr(device_mod, "resolve_device",
                        lambda name="auto": torch.device("cuda") if name in ("auto", "cuda") else real(name))


def test_record_recipes_resolve_per_device(monkeypatch):
    cpu = config.make_config("fast", precision="bf16")
    assert (cpu.model, cpu.batch_size, cpu.lr, cpu.epochs, cpu.hard_fraction) == ("fast_strided_valid_fixed", 256, 1.15, 5, 0.25)
    f93 = config.make_config("fast-93", device="cpu", precision="bf16")  # fast's settings, a wider last conv
    fast = config.make_config("fast", device="cpu", precision="bf16").to_dict()
    assert (f93.model, f93.epochs, f93.hard_fraction) == ("fast_strided_valid_wide", 8, 0.3)
    assert {**f93.to_dict(), "recipe": "fast", "model": "fast_strided_valid_fixed", "epochs": 5, "hard_fraction": 0.25} == fast
    assert {**cpu.to_dict(), "device": "cpu"} == fast
    pretend_cuda(monkeypatch)
    gpu = config.make_config("fast")
    assert (gpu.batch_size, gpu.lr, gpu.epochs) == (1024, 2.3, 4)
    assert (gpu.model, gpu.hard_fraction) == ("fast", 1.0) and gpu.augment == cpu.augment  # only the named settings change
    # Its one-cycle schedule over 4 epochs of 59 steps (60,000 images in batches of 1,024): a quarter
    # warming up from lr / 25 to the peak, then a cosine down to nothing.
    steps = -(-60000 // gpu.batch_size)
    lrs = [training.lr_at(s, 4 * steps, gpu, steps) for s in range(4 * steps)]
    assert steps == 59 and lrs[0] == pytest.approx(2.3 / 25 + (2.3 - 2.3 / 25) / 59)
    assert max(lrs) == pytest.approx(2.3) and lrs.index(max(lrs)) == 58 and lrs[-1] < 1e-3
    assert config.make_config("fast", device="cpu").batch_size == 256  # the device asked for decides
    assert config.make_config("fast", epochs=10).epochs == 10  # explicit settings still win
    best = config.make_config("best")
    assert (best.model, best.epochs, best.hard_fraction) == ("wrn16_4", 64, 1.0)  # every image, as measured
    f93 = config.make_config("fast-93")  # the 93% settings: fast's large-batch epochs, 10 of them
    assert (f93.model, f93.batch_size, f93.lr, f93.epochs, f93.hard_fraction) == ("fast", 1024, 2.3, 10, 1.0)
    assert config.make_config("dense-vs-conv").batch_size == 128  # a recipe without a rule: as it was


def test_fast_trains_the_strided_valid_fixed_net_for_5_epochs_on_a_cpu_in_either_precision(monkeypatch):
    recipe = get_recipe("fast")
    on_cpu = {**recipe.settings, "model": "fast_strided_valid_fixed"}
    assert recipe.settings_for("cpu", "fp32") == recipe.settings_for("cpu", "bf16") == on_cpu  # only the net changes
    assert recipe.settings_for("mps")["model"] == "fast_lean"  # a device without a rule: the recipe's own net
    for precision in ("fp32", "bf16"):
        assert config.make_config("fast", precision=precision).model == "fast_strided_valid_fixed"
    for native_bf16 in (False, True):  # "auto": as training resolves it
        monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: native_bf16)
        cfg = config.make_config("fast", device="cpu")
        assert (cfg.model, cfg.precision, cfg.epochs, cfg.hard_fraction) == ("fast_strided_valid_fixed", "auto", 5, 0.25)
    assert config.make_config("fast", precision="fp32", model="fast").model == "fast"  # explicit settings win
    assert config.make_config("fast-full", precision="fp32").model == "fast"  # a recipe without the rule
    pretend_cuda(monkeypatch)
    assert config.make_config("fast", precision="fp32").model == "fast"  # on CUDA the CUDA rule alone


def test_fast_93_trains_the_strided_valid_wide_net_for_two_more_epochs_on_a_cpu_in_either_precision(monkeypatch):
    recipe = get_recipe("fast-93")
    on_cpu = {**recipe.settings, "model": "fast_strided_valid_wide", "epochs": 8}
    assert recipe.settings_for("cpu", "fp32") == recipe.settings_for("cpu", "bf16") == on_cpu  # the net and its epochs
    assert (recipe.settings["model"], recipe.settings["epochs"]) == ("fast", 6)
    assert recipe.settings_for("mps") == recipe.settings  # a device without a rule: the recipe's own net
    for native_bf16 in (False, True):  # "auto": as training resolves it
        monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: native_bf16)
        assert config.make_config("fast-93", device="cpu").model == "fast_strided_valid_wide"
    assert config.make_config("fast-93", device="cpu", precision="fp32", epochs=7).epochs == 7  # explicit wins
    pretend_cuda(monkeypatch)
    assert config.make_config("fast-93", precision="fp32").model == "fast"  # on CUDA the CUDA rule alone


@pytest.mark.parametrize("recipe, without, with_amx, fp32", [
    ("fast", dict(model="fast_strided_valid_fixed", epochs=5, hard_fraction=0.25),
     dict(model="fast_strided", epochs=4, hard_fraction=0.2),
     dict(model="fast_strided_valid_fixed", epochs=5, hard_fraction=0.25)),
    ("fast-93", dict(model="fast_strided_valid_wide", epochs=8), dict(model="fast_wide", epochs=5),
     dict(model="fast_strided_valid_wide", epochs=8)),
    ("best", dict(model="best", epochs=72, resize_from=20, augment={"flip": 0.5, "crop": 2, "erase": 0.5}),
     dict(model="best", epochs=80, resize_from=0, augment={"flip": 0.5, "crop": 2}),
     dict(model="best_slim", epochs=48, resize_from=20, augment={"flip": 0.5, "crop": 2})),
])
def test_amx_rule_changes_only_the_settings_it_names_in_a_bf16_run(recipe, without, with_amx, fp32, monkeypatch):
    bf16 = config.make_config(recipe, device="cpu", precision="bf16").to_dict()
    assert {k: bf16[k] for k in without} == without  # no AMX (conftest): as on AVX-512 BF16
    monkeypatch.setattr(device_mod, "cpu_has_amx", lambda: True)
    amx = config.make_config(recipe, device="cpu", precision="bf16").to_dict()
    assert {k: amx[k] for k in with_amx} == with_amx
    assert {**amx, **without} == bf16  # only the settings the AMX rule names change (net, schedule, augmentation)
    in_fp32 = config.make_config(recipe, device="cpu", precision="fp32").to_dict()
    assert {k: in_fp32[k] for k in fp32} == fp32  # AMX runs bf16 only: the fp32 rule, if any, alone


def test_amx_rule_yields_to_explicit_settings_auto_precision_and_cuda(monkeypatch):
    monkeypatch.setattr(device_mod, "cpu_has_amx", lambda: True)
    explicit = config.make_config("fast", device="cpu", precision="bf16", epochs=3, hard_fraction=0.3)
    assert (explicit.model, explicit.epochs, explicit.hard_fraction) == ("fast_strided", 3, 0.3)  # explicit settings win
    assert config.make_config("fast-full", device="cpu", precision="bf16").epochs == 2  # a recipe without the rule
    monkeypatch.setattr(device_mod, "cpu_has_bf16", lambda: True)
    assert config.make_config("fast", device="cpu").model == "fast_strided"  # "auto" resolved as training does
    pretend_cuda(monkeypatch)
    gpu = config.make_config("fast")
    assert (gpu.model, gpu.epochs, gpu.batch_size) == ("fast", 4, 1024)  # on CUDA the CUDA rule alone


def test_the_wide_fast_net_is_the_fast_net_at_16_96_192():
    wide, fast = models.build_model("fast_wide"), models.build_model("fast")
    assert [m.out_channels for m in wide.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 96, 192]
    assert models.count_params(wide) > 2 * models.count_params(fast)


def test_the_slim_fast_net_is_the_fast_net_with_its_first_trained_conv_48_wide():
    slim, fast = models.build_model("fast_slim"), models.build_model("fast")
    assert [m.out_channels for m in slim.modules() if isinstance(m, torch.nn.Conv2d)] == [16, 48, 128]
    assert [type(m) for m in slim.net] == [type(m) for m in fast.net]  # the same layers, in the same order
    slim.init_from_data(torch.rand(64, 1, 28, 28))
    assert slim.frozen_stem() is not None  # its stem is cached as the fast net's is


def test_the_slim_best_net_is_the_best_net_at_16_96_192():
    slim, best = models.build_model("best_slim"), models.build_model("best")
    widths = lambda net: [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths(slim) == [16, 16, 16, 96, 96, 192, 192] and widths(best) == [16, 16, 16, 128, 128, 256, 256]
    assert [type(m) for m in slim.net] == [type(m) for m in best.net]  # the same layers, in the same order


def test_amx_counts_only_where_onednn_may_use_it(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    for cap, allowed in [(None, True), ("AVX512_CORE_AMX", True), ("avx512_core_amx_fp16", True),
                         ("AVX512_CORE_BF16", False), ("AVX2", False)]:
        if cap is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert CPU_HAS_AMX() is allowed, cap
        assert device_mod.onednn_allows_bf16() is (allowed or cap == "AVX512_CORE_BF16"), cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert CPU_HAS_AMX() is False


def test_recipe_rule_reads_the_device_only_where_a_recipe_has_one(monkeypatch):
    monkeypatch.setattr(device_mod, "resolve_device", lambda name="auto": pytest.fail("resolved a device"))
    assert config.recipe_device_type(get_recipe("dense-vs-conv"), None) == "cpu"
    with monkeypatch.context() as m:
        m.setattr(device_mod, "auto_precision", lambda *a: pytest.fail("resolved a precision"))
        assert config.recipe_precision(get_recipe("dense-vs-conv"), "cpu", None) is None
        assert config.recipe_precision(get_recipe("fast"), "cpu", "fp16") is None  # named by validation
    with pytest.raises(config.ConfigError, match="device='tpu': expected one of"):
        config.make_config("fast", device="tpu")  # named by validation, not by the rule


@dataclasses.dataclass(frozen=True)
class CudaGraphsOnCpu(device_mod.Runtime):
    """A CPU runtime that takes the CUDA-graph branches (a fake GPU for the step's bookkeeping)."""

    @property
    def cuda_graphs(self) -> bool:
        return True


@pytest.mark.parametrize("sam", [False, True])
def test_compiled_cuda_steps_are_marked_before_every_forward(sam, monkeypatch, tmp_path):
    """With CUDA graphs, each forward begins a new graph step (else a replay overwrites outputs still in
    use: the warm-up's, SAM's first pass), and the warm-up runs each batch size three times so that
    capture happens before the clock starts."""
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(training.device_mod, "resolve",
                        lambda *a, **k: CudaGraphsOnCpu(torch.device("cpu"), "fp32", True))
    cfg = config.make_config("fast", epochs=1, batch_size=32, eval_batch_size=50, compile=True,
                             sam_rho=0.05 if sam else 0.0, sam_start=0.0)
    ds = synthetic_dataset(n_train=64, n_test=20)
    metrics = run_mod.train_run(cfg, tmp_path / "run", dataset=ds, quiet=True, calibrate=False).metrics
    steps = 64 // 32
    assert len(marks) == 3 + steps * (2 if sam else 1)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0


def test_the_random_stream_is_drawn_where_the_step_runs():
    cuda = device_mod.Runtime(torch.device("cuda"), "bf16", True)
    assert cuda.random_device == torch.device("cuda") and cuda.cuda_graphs
    cpu = device_mod.resolve("cpu", "fp32")
    assert cpu.random_device == torch.device("cpu") and not cpu.cuda_graphs
    # On a CPU the stream is the one every run had: a CPU generator seeded by (seed, epoch).
    g, before = training.epoch_generator(3, 1, cpu.random_device), torch.Generator().manual_seed(3 * 1_000_003 + 1)
    assert torch.equal(torch.randperm(50, generator=g), torch.randperm(50, generator=before))


def test_compiled_step_trains_on_a_cpu(tmp_path):
    """--compile on a CPU: the compiled forward trains (the stem cache's forward too) and learns."""
    import torch._dynamo
    torch._dynamo.reset()
    cfg = config.make_config("fast", epochs=2, batch_size=50, compile=True, eval_batch_size=100)
    ds = synthetic_dataset(n_train=300, n_test=100, seed=1)
    metrics = run_mod.train_run(cfg, tmp_path / "run", dataset=ds, quiet=True, calibrate=False).metrics
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert metrics["stem_cached"] and metrics["test_accuracy"] > 0.5


def test_threads_are_the_free_cores_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(device_mod, "usable_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setattr(device_mod, "busy_cores", lambda: 1)
        assert device_mod.training_threads(None) == 1  # one core left by another process
        assert device_mod.training_threads(2) == 2  # asked for: as asked
        monkeypatch.setattr(device_mod, "busy_cores", lambda: 5)
        assert device_mod.training_threads(None) == 1  # never below one
        monkeypatch.setattr(device_mod, "busy_cores", lambda: 0)
        torch.set_num_threads(1)
        assert device_mod.training_threads(None) == 1  # a process's own setting (a sweep worker's) is a ceiling
        # A run sets its threads while it trains, records them, and puts the process's setting back.
        cfg = config.make_config("fast", epochs=1, batch_size=32, threads=2, eval_batch_size=50)
        folder = run_mod.train_run(cfg, tmp_path / "run", dataset=synthetic_dataset(64, 20), quiet=True,
                                   calibrate=False)
        assert json.loads((folder.path / "config.json").read_text())["environment"]["threads"] == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_a_run_pinned_to_more_threads_than_the_free_cores_says_so(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(device_mod, "usable_cores", lambda: 2)
    monkeypatch.setattr(device_mod, "busy_cores", lambda: 1)
    assert device_mod.oversubscribed(1) is None  # fits the free core
    crowded = device_mod.oversubscribed(2)
    assert "--threads 2" in crowded and "keep 1 of this machine's 2 cores busy (1 free)" in crowded
    assert "leave --threads unset" in crowded
    monkeypatch.setattr(device_mod, "busy_cores", lambda: 3)
    assert device_mod.oversubscribed(1) is None  # one thread is the least a run can have
    assert "(0 free)" in device_mod.oversubscribed(2)
    monkeypatch.setattr(device_mod, "busy_cores", lambda: None)  # no /proc: nothing to say
    assert device_mod.oversubscribed(8) is None
    # A run says it once, on stderr's logger, naming its folder; one that fits, or chooses its threads, does not.
    monkeypatch.setattr(device_mod, "busy_cores", lambda: 1)
    before = torch.get_num_threads()
    try:
        for name, threads in [("pinned", 2), ("fits", 1), ("chosen", None)]:
            caplog.clear()
            cfg = config.make_config("fast", epochs=1, batch_size=32, threads=threads, eval_batch_size=50)
            with caplog.at_level("WARNING", logger="fashionlab.threads"):
                run_mod.train_run(cfg, tmp_path / name, dataset=synthetic_dataset(64, 20), quiet=True, calibrate=False)
            warned = [r.getMessage() for r in caplog.records if r.name == "fashionlab.threads"]
            assert len(warned) == (name == "pinned") and all(str(tmp_path / name) in w for w in warned)
    finally:
        torch.set_num_threads(before)


def test_busy_cores_reads_this_machine():
    busy = device_mod.busy_cores()
    if sys.platform.startswith("linux"):
        assert busy is not None and 0 <= busy
    with pytest.raises(config.ConfigError, match="threads=0: expected an integer >= 1"):
        config.make_config("fast", threads=0)


def test_gpu_check_runs_end_to_end_in_quick_mode(real_data, tmp_path):
    """benchmarks/gpu_check.sh, as a GPU machine runs it, in its quick mode on this CPU: every stage
    trains, prints its table and writes its JSON."""
    env = {**os.environ, "GPU_CHECK_QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped" not in proc.stdout, proc.stdout
    for stage in ("fast", "before", "compiled"):
        saved = json.loads((tmp_path / f"{stage}.json").read_text())
        assert all(run["curve"] for runs in saved["results"].values() for run in runs), stage
    assert "cnn (plain fp32 Adam)" in json.loads((tmp_path / "fast.json").read_text())["results"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert [run["seed"] for run in best["results"]] == [0] and best["overrides"]["subset"] == 1024
    assert len(best["plain_epoch_seconds"]) == 2  # a plain epoch of the same subset before the run and after it
    assert "time to test accuracy" in (tmp_path / "fast.txt").read_text()
    assert Path(tmp_path / "device.txt").read_text().startswith("torch ")
