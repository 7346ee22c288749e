"""The record recipes (fast, best) and their families: they resolve, train, reload, and behave the same
whatever the device, because every random draw comes from a CPU generator."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import synthetic_dataset
from fashionlab import config, evaluate, models, run as run_mod, training
from fashionlab.augment import Augment
from fashionlab.device import resolve
from fashionlab.recipes import get_recipe
from fashionlab.models.records import FIXED_STEM_SHIFT, FastNet, ResNet, wide_resnet_blocks


@pytest.mark.parametrize("recipe, model, precision", [
    ("fast", "fast_strided_valid_fixed", "bf16"), ("fast", "fast_strided_valid_fixed", "fp32"),
    ("fast-93", "fast_strided_valid_wide", "bf16"), ("fast-93", "fast_strided_valid_wide", "fp32"),
    ("fast-full", "fast", "auto"), ("best", "best", "bf16"), ("best", "best_slim", "fp32")])
def test_record_recipe_trains_one_epoch_and_reloads(recipe, model, precision, tmp_path):
    ds = synthetic_dataset(n_train=64, n_test=40)
    seen = []
    cfg = config.make_config(recipe, epochs=1, batch_size=32, eval_batch_size=20, precision=precision)
    assert cfg.model == get_recipe(recipe).settings_for("cpu", "fp32" if precision == "fp32" else None)["model"] == model
    hook = training.EpochHook(lambda row, model: seen.append((row["epoch"], model.training)))
    metrics = run_mod.train_run(cfg, tmp_path / "run", dataset=ds, quiet=True, callbacks=[hook]).metrics
    assert metrics["epochs_run"] == 1 and metrics["model"] == model
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["train_seconds"] > 0
    assert len(seen) == 1 and seen[0][0] == 1
    # The run folder rebuilds the same network from its recorded family and arguments.
    net, info = run_mod.RunFolder(tmp_path / "run").load_model()
    assert info["architecture"]["family"] == models.MODELS[model].family
    rt = resolve("cpu", "fp32", conv_model=True)
    logits = evaluate.predict_logits(net, ds.test_images, rt, tta_flip=cfg.tta_flip, tta_shift=cfg.tta_shift)
    assert logits.shape == (40, 10) and torch.isfinite(logits).all()


def test_fast_recipe_learns_a_learnable_task(tmp_path):
    ds = synthetic_dataset(n_train=300, n_test=100, seed=1)
    metrics = run_mod.train_run(config.make_config("fast", epochs=3, batch_size=50), tmp_path / "run", dataset=ds,
                                quiet=True).metrics
    assert metrics["test_accuracy"] >= 0.9  # bars at ten positions: trivially separable


def test_best_recipe_trains_a_bigger_net_longer_with_more_augmentation_than_fast():
    best, fast = get_recipe("best").settings, get_recipe("fast").settings
    assert best["epochs"] > fast["epochs"] and best["tta_flip"] and best["val_split"] == 0.0
    assert best["tta_shift"] == 2 and not fast.get("tta_shift")  # moves help a net trained on crops only
    assert models.count_params(models.build_model("best")) > 3 * models.count_params(models.build_model("fast"))
    aug = Augment.from_dict(best["augment"])
    assert aug.flip and aug.crop


def test_the_lean_net_runs_its_last_conv_after_the_pool():
    sizes = {}
    for name in ("fast", "fast_lean", "fast_narrow", "fast_mid", "fast_strided", "fast_strided_narrow",
                 "fast_strided_mid", "fast_strided_valid", "fast_strided_valid_fixed", "fast_strided_valid_wide"):
        net = models.build_model(name)
        net.init_from_data(torch.rand(64, 1, 28, 28))
        last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.register_forward_hook(lambda mod, inp, out, name=name: sizes.update({name: tuple(out.shape[2:])}))
        assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)
        assert net.frozen_stem() is not None  # the stem cache works the same for both
    # The lean nets' pool drops the 7x7 map's last row and column; fast_mid's rounds up and keeps them.
    assert sizes == {"fast": (7, 7), "fast_lean": (3, 3), "fast_narrow": (3, 3), "fast_mid": (4, 4),
                     "fast_strided": (7, 7), "fast_strided_narrow": (4, 4), "fast_strided_mid": (4, 4),
                     "fast_strided_valid": (2, 2), "fast_strided_valid_fixed": (2, 2), "fast_strided_valid_wide": (2, 2)}
    assert models.count_params(models.build_model("fast_lean")) == models.count_params(models.build_model("fast"))
    trained = [m.out_channels for m in models.build_model("fast_narrow").modules() if isinstance(m, torch.nn.Conv2d)]
    assert trained == [16, 48, 128]  # the frozen whitening layer, then the narrower first trained conv


def test_the_4x4_net_sees_the_images_last_row_where_the_lean_net_drops_it():
    """The lean net's floor pool of the 7x7 map drops its last row, the only one the image's last row of
    pixels reaches; fast_mid's pools round up and keep it (as the fast net's conv at 7x7 does)."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    y = x.clone()
    y[..., 27, :] = torch.rand(4, 1, 28)
    for name, sees in [("fast", True), ("fast_lean", False), ("fast_narrow", False), ("fast_mid", True),
                       ("fast_strided", True), ("fast_strided_narrow", True), ("fast_strided_mid", True),
                       ("fast_strided_valid", True), ("fast_strided_valid_fixed", True), ("fast_strided_valid_wide", True)]:
        net = models.build_model(name).eval()
        net.init_from_data(x)
        assert (not torch.equal(net(x), net(y))) == sees, name


def test_a_strided_block_is_one_conv_of_stride_2_in_place_of_its_conv_and_pool():
    """fast_strided is fast_slim with its first trained conv strided: the same widths and parameter count,
    one max-pool fewer, and that conv computes its 7x7 output directly (a quarter of the 14x14 positions)."""
    slim, strided = models.build_model("fast_slim"), models.build_model("fast_strided")
    pools = [sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) for net in (slim, strided)]
    assert pools == [3, 2] and models.count_params(slim) == models.count_params(strided)
    outputs = {}
    conv = [m for m in strided.modules() if isinstance(m, torch.nn.Conv2d)][1]  # after the whitening conv
    conv.register_forward_hook(lambda mod, inp, out: outputs.update(shape=tuple(out.shape[1:]), stride=mod.stride))
    strided(torch.rand(2, 1, 28, 28))
    assert outputs == {"shape": (48, 7, 7), "stride": (2, 2)}
    lean = [m for m in models.build_model("fast_strided_narrow").modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride) for c in lean] == [((3, 3), (1, 1)), ((4, 4), (2, 2)), ((3, 3), (1, 1))]
    # On an odd map a 3x3 conv of stride 2 with padding 1 rounds up (7 -> 4 -> 2 -> 1), and the size check
    # counts it so: rounding down (7 -> 3 -> 1) would refuse the fifth block as too small.
    deep = FastNet(stem=0, widths=(8,) * 5, whiten=True, strided_blocks=(1, 2, 3, 4), strided_kernel=3)
    assert deep(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_a_valid_last_conv_computes_a_quarter_of_the_positions_from_the_same_weights():
    """last_padding=0: the last conv has no zero padding, so on the 4x4 map it computes 2x2 outputs, each from a
    whole window of real values; its weights and every other layer are those of the padded net."""
    kw = dict(stem=0, widths=(16, 48, 128), convs_per_block=1, whiten=True, act="relu", pool_before_last=True,
              ceil_pools=True, strided_blocks=(1,), strided_kernel=3)
    padded, valid = FastNet(**kw), FastNet(**kw, last_padding=0)
    assert [p.shape for p in padded.parameters()] == [p.shape for p in valid.parameters()]
    valid.load_state_dict(padded.state_dict())
    convs = [[m for m in net.modules() if isinstance(m, torch.nn.Conv2d)] for net in (padded, valid)]
    assert [c.padding for c in convs[1]] == [(1, 1), (1, 1), (0, 0)]
    maps = {}
    for name, last in (("padded", convs[0][-1]), ("valid", convs[1][-1])):
        last.register_forward_hook(lambda mod, inp, out, name=name: maps.update({name: (inp[0], out)}))
    x = torch.rand(3, 1, 28, 28)
    padded.eval()(x), valid.eval()(x)
    assert torch.equal(maps["padded"][0], maps["valid"][0]) and maps["valid"][0].shape[2:] == (4, 4)
    # The valid conv's outputs are the padded conv's inner 2x2, the positions whose window holds no padding.
    torch.testing.assert_close(maps["valid"][1], maps["padded"][1][..., 1:3, 1:3])


def test_last_padding_is_checked():
    for bad in (2, -1, True, 0.5):
        with pytest.raises(ValueError, match="last_padding must be 1"):
            FastNet(widths=(8, 8), last_padding=bad)
    with pytest.raises(ValueError, match="side 3 or more before the last conv; it gets 1"):
        FastNet(stem=0, widths=(16, 8, 8, 8), whiten=True, pool_before_last=True, last_padding=0)
    with pytest.raises(ValueError, match="a pool that rounds down empties"):
        FastNet(stem=0, widths=(16, 8, 8, 8), whiten=True, last_padding=0)
    assert FastNet(stem=0, widths=(16, 8, 8, 8), whiten=True, ceil_pools=True, last_padding=0)(
        torch.rand(2, 1, 28, 28)).shape == (2, 10)  # 28 -> 14 -> 7 -> 4, then 2 after the valid conv, 1 pooled


def test_a_fixed_stem_norm_normalises_the_pooled_whitening_output_and_nothing_before_its_activation_trains(
        real_data):
    """The BatchNorm after the whitening conv's pool, replaced by its statistics at the start: folded
    into the frozen conv, each channel over the images and their mirror images has mean FIXED_STEM_SHIFT
    and deviation 1 before the activation; nothing up to the activation trains, so the stem cache
    holds the activation's output and a step computes nothing at 14x14."""
    images = evaluate.to_input(torch.from_numpy(real_data.train_images[:2000]).unsqueeze(1))
    torch.manual_seed(0)
    net = models.build_model("fast_strided_valid_fixed")
    net.init_from_data(images)
    stem, _ = net.frozen_stem()
    assert len(stem) == net.stem_layers == 4 and isinstance(stem[-1], torch.nn.ReLU)
    assert not any(p.requires_grad for p in stem.parameters()) and len(list(stem.parameters())) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.net[:net.stem_layers + 1])
    with torch.no_grad():
        both = torch.cat([images, images.flip(-1)])
        h = stem[:3](both).double()  # before the activation
    assert torch.allclose(h.mean((0, 2, 3)), torch.full((16,), FIXED_STEM_SHIFT, dtype=torch.float64), atol=1e-3)
    assert torch.allclose(h.std((0, 2, 3)), torch.ones(16, dtype=torch.float64), atol=1e-3)
    unfixed = models.build_model("fast_strided_valid")  # the same net but that BatchNorm
    assert models.count_params(net) == models.count_params(unfixed) - 2 * 16 + 16  # its weight and bias; the conv's bias


def test_fixed_stem_norm_is_checked():
    for kwargs in (dict(whiten=False), dict(stem=24, whiten=True), dict(whiten=True, resize=32)):
        with pytest.raises(ValueError, match="fixed_stem_norm needs whiten=True, stem=0 and no resize"):
            FastNet(**{"stem": 0, "widths": (16, 8), **kwargs, "fixed_stem_norm": True})


def test_strided_blocks_are_checked():
    with pytest.raises(ValueError, match="block indices 0 to 2"):
        FastNet(widths=(8, 8, 8), strided_blocks=(3,))
    with pytest.raises(ValueError, match="block 0 with whiten"):
        FastNet(stem=0, widths=(16, 8), whiten=True, strided_blocks=(0,))
    with pytest.raises(ValueError, match="strided_kernel must be at least 2"):
        FastNet(widths=(8, 8), strided_blocks=(1,), strided_kernel=1)
    assert FastNet(widths=(8, 8), strided_blocks=(0,))(torch.rand(1, 1, 28, 28)).shape == (1, 10)  # no whitening


def test_wide_resnet_depth_is_data():
    assert wide_resnet_blocks(28) == (4, 4, 4)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        wide_resnet_blocks(27)
    net = ResNet(blocks=wide_resnet_blocks(10), widths=(8, 16, 32), stem=8)
    assert net(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_family_arguments_are_checked():
    with pytest.raises(ValueError, match="equal length"):
        ResNet(blocks=(1, 1), widths=(8, 16, 32))
    with pytest.raises(ValueError, match="too small"):
        FastNet(widths=(8, 8, 8, 8, 8, 8))
    with pytest.raises(ValueError, match="bad arguments"):
        models.build_model("fast", depth=3)
    with pytest.raises(ValueError, match="act must be one of gelu, relu; got 'swish'"):
        FastNet(act="swish")


def test_in_place_relu_gives_the_gradients_of_an_out_of_place_one():
    # fast's ReLU overwrites its BatchNorm's output; the BatchNorm's backward pass must not need it.
    torch.manual_seed(0)
    net = models.build_model("fast")
    twin = copy.deepcopy(net)
    for i, m in enumerate(twin.net):
        if isinstance(m, torch.nn.ReLU):
            twin.net[i] = torch.nn.ReLU(inplace=False)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    for m in (net, twin):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    assert any(isinstance(m, torch.nn.ReLU) and m.inplace for m in net.net)
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, atol=1e-6), name


@pytest.mark.parametrize("name", ["fast", "best", "resnet8"])
def test_record_models_run_under_bf16_channels_last(name):
    # The CUDA and CPU fast path: channels_last memory and bf16 autocast, as train() sets them up.
    torch.manual_seed(0)
    model = models.build_model(name).to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = torch.nn.functional.cross_entropy(out.float(), torch.arange(4))
    loss.backward()
    assert out.shape == (4, 10) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_random_stream_is_the_same_whatever_the_device():
    """Shuffling and augmentation draw on a CPU generator, then move the draws to the batch's device.
    The meta device stands in for CUDA/MPS here: it runs the same code path, keeps no values, and
    must consume exactly the same draws, so the next epoch's batches are identical on any device."""
    aug = Augment(flip=0.5, crop=2, rotate=10.0, scale=0.1, erase=0.5)  # every transform draws
    x_cpu = torch.rand(16, 1, 28, 28)
    states = []
    for dev in ("cpu", "meta"):
        g = training.epoch_generator(seed=3, epoch=2)
        perm = torch.randperm(100, generator=g).to(dev)
        out = aug(x_cpu.to(dev), g)
        assert out.shape == x_cpu.shape and out.device.type == dev and perm.device.type == dev
        states.append(g.get_state())
    assert torch.equal(states[0], states[1])
    # And the CPU stream itself is repeatable: same seed and epoch, same permutation and images.
    g1, g2 = training.epoch_generator(3, 2), training.epoch_generator(3, 2)
    assert torch.equal(torch.randperm(100, generator=g1), torch.randperm(100, generator=g2))
    assert torch.equal(aug(x_cpu, g1), aug(x_cpu, g2))


def test_cuda_request_fails_clearly_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        config.make_config("fast", device="cuda")


def test_whitening_layer_decorrelates_patches_and_stays_frozen(tmp_path):
    """FastNet(whiten=True): after init_from_data, the first 9 filters' responses to 3x3 patches have
    (nearly) identity covariance, their negatives follow, and training leaves the layer unchanged."""
    ds = synthetic_dataset(n_train=200, n_test=20, seed=3)
    torch.manual_seed(0)
    net = FastNet(stem=0, widths=(32, 64), whiten=True)
    images = evaluate.to_input(torch.from_numpy(ds.train_images))
    net.init_from_data(images, eps=1e-6)  # a negligible eps: the responses should be exactly white
    first = net.net[1]
    assert not first.weight.requires_grad
    with torch.no_grad():  # white over the images and their mirror images, what a run with flips sees
        both = torch.cat([images, images.flip(-1)])
        responses = first(net.net[0](both))[:, :9].permute(1, 0, 2, 3).reshape(9, -1)
    cov = torch.cov(responses.double())
    assert torch.allclose(cov, torch.eye(9, dtype=torch.float64), atol=0.01)
    assert torch.equal(first.weight[9:18], -first.weight[:9])

    cfg = config.make_config("fast", model="fast", epochs=1, batch_size=50, model_args={"widths": [32, 64]})
    run_mod.train_run(cfg, tmp_path / "run", dataset=ds, quiet=True)
    trained, _ = run_mod.RunFolder(tmp_path / "run").load_model()
    torch.manual_seed(cfg.seed)  # the same random filters beside the whitening ones, as train() draws them
    fresh = models.build_model("fast", widths=[32, 64])
    fresh.init_from_data(evaluate.to_input(torch.from_numpy(ds.train_images[:training.INIT_IMAGES])))
    # train() whitens with its first INIT_IMAGES training images: here all 200, in another order, and
    # the patch covariance does not depend on the order.
    assert torch.allclose(trained.net[1].weight, fresh.net[1].weight, atol=1e-6)


def test_narrow_whitening_layer_keeps_the_most_varying_patch_directions():
    """With 16 channels for 9 patch dimensions (the `fast` model), the filters whiten the 8 directions
    of largest variance over the images and their mirror images: their responses are white, and the
    least varying direction is the one left out."""
    ds = synthetic_dataset(n_train=200, n_test=20, seed=4)
    net = FastNet(stem=0, widths=(16, 32), whiten=True)
    images = evaluate.to_input(torch.from_numpy(ds.train_images))
    net.init_from_data(images, eps=1e-6)
    images = torch.cat([images, images.flip(-1)])
    w = net.net[1].weight.reshape(16, 9).double()
    assert torch.equal(w[8:], -w[:8])
    with torch.no_grad():
        x = net.net[0](images)
        responses = net.net[1](x)[:, :8].permute(1, 0, 2, 3).reshape(8, -1)
    assert torch.allclose(torch.cov(responses.double()), torch.eye(8, dtype=torch.float64), atol=0.01)
    patches = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    least = torch.linalg.eigh(torch.cov(patches.T)).eigenvectors[:, 0]  # eigenvalues come in ascending order
    directions = w[:8] / w[:8].norm(dim=1, keepdim=True)
    assert (directions @ least).abs().max() < 1e-4


def test_whitening_needs_a_filter_and_its_negative():
    with pytest.raises(ValueError, match="whiten needs at least 2 channels"):
        FastNet(stem=0, widths=(1, 32), whiten=True)


def test_precise_batchnorm_replaces_stale_statistics_with_exact_ones():
    """recompute_batchnorm: each BatchNorm layer's running statistics become the statistics of its
    input over the given images (one batch here, so exactly that batch's mean and unbiased variance),
    whatever they were before; momentum and train/eval mode are left as they were."""
    torch.manual_seed(0)
    model = models.build_model("resnet8", blocks=(1, 1), widths=(32, 64)).eval()
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in layers:  # stale statistics, as after many steps with moving weights
        m.running_mean.fill_(5.0)
        m.running_var.fill_(0.01)
    images = torch.from_numpy(synthetic_dataset(n_train=50, n_test=10, seed=4).train_images).unsqueeze(1)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: inputs.__setitem__(mod, inp[0].detach().clone()))
             for m in layers]
    model.train()
    with torch.no_grad():
        model(evaluate.to_input(images))
    for h in hooks:
        h.remove()
    model.eval()
    training.recompute_batchnorm(model, images, resolve("cpu", "fp32", conv_model=True), batch_size=64)
    assert not model.training and all(m.momentum == 0.1 for m in layers)
    for m in layers:
        x = inputs[m].transpose(0, 1).reshape(m.num_features, -1)
        assert torch.allclose(m.running_mean, x.mean(1), atol=1e-5)
        assert torch.allclose(m.running_var, x.var(1, unbiased=True), rtol=1e-4, atol=1e-5)


def test_precise_batchnorm_setting_is_checked():
    with pytest.raises(ValueError, match="precise_bn=-1: expected an integer >= 0"):
        config.make_config("best", precise_bn=-1)


def test_shifted_moves_images_and_fills_the_border_with_background():
    x = torch.rand(3, 1, 28, 28) + 1  # no zeros of its own
    down = evaluate.shifted(x, 1, 0)
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and (down[..., 0, :] == 0).all()
    left = evaluate.shifted(x, 0, -2)
    assert torch.equal(left[..., :, :-2], x[..., :, 2:]) and (left[..., :, -2:] == 0).all()
    assert torch.equal(evaluate.shifted(x, 0, 0), x)


def test_test_time_augmentation_averages_the_views_it_names():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))  # sees every pixel's position
    x = torch.rand(4, 1, 28, 28)
    plain, mirror = model(x), model(x.flip(-1))
    with torch.no_grad():
        assert torch.allclose(evaluate.tta_logits(model, x), plain)
        assert torch.allclose(evaluate.tta_logits(model, x, flip=True), (plain + mirror) / 2)
        # shift=2: the image and its eight copies moved 1 or 2 pixels up, down, left or right, each
        # with its mirror, all weighted equally.
        steps = [(s, d) for s in (-1, 1, -2, 2) for d in (2, 3)]  # (pixels, dim): dim 2 rows, 3 columns
        moved = [torch.roll(x, s, d) for s, d in steps]
        for m, (s, d) in zip(moved, steps):
            edge = slice(s, None) if s < 0 else slice(0, s)  # the rows or columns roll wrapped round
            (m[:, :, edge] if d == 2 else m[..., edge]).zero_()
        expected = sum((model(v) + model(v.flip(-1))) / 2 for v in [x] + moved) / 9
        assert torch.allclose(evaluate.tta_logits(model, x, flip=True, shift=2), expected, atol=1e-6)
        assert not torch.allclose(evaluate.tta_logits(model, x, flip=True, shift=1), expected, atol=1e-3)


def test_shift_tta_views_are_the_image_and_its_moves_of_1_to_shift_pixels():
    assert evaluate.moves(0) == [(0, 0)]
    assert sorted(evaluate.moves(1)) == [(-1, 0), (0, -1), (0, 0), (0, 1), (1, 0)]
    two = evaluate.moves(2)
    assert len(two) == len(set(two)) == 9 and {(2, 0), (-2, 0), (0, 2), (0, -2)} < set(two)


def test_a_run_with_shift_tta_records_it_and_its_onnx_export_computes_it(tmp_path):
    ds = synthetic_dataset(n_train=200, n_test=50, seed=5)
    cfg = config.make_config("fast", epochs=1, batch_size=50, tta_shift=1)
    metrics = run_mod.train_run(cfg, tmp_path / "run", dataset=ds, quiet=True).metrics
    from fashionlab import export
    from fashionlab.predict import Predictor
    p = Predictor.from_run(tmp_path / "run", device="cpu", precision="fp32")
    assert (p.tta_flip, p.tta_shift) == (True, 1)
    # The run's reported accuracy is the shifted TTA's: the Predictor (bf16 as trained) agrees.
    trained = Predictor.from_run(tmp_path / "run")
    acc = (trained.probabilities(ds.test_images).argmax(1) == ds.test_labels).mean()
    assert acc == pytest.approx(metrics["test_accuracy"])
    result = export.export_onnx(tmp_path / "run", ds.test_images)
    assert result["top1_mismatches"] == 0 and result["max_abs_prob_diff"] <= 1e-4
    onnx = export.OnnxPredictor.from_run(tmp_path / "run")
    unshifted = Predictor(p.model, {**p.info, "tta_shift": 0}, p.runtime).probabilities(ds.test_images)
    assert np.abs(onnx.probabilities(ds.test_images) - unshifted).max() > 1e-3  # the moves are in the graph


def test_tta_shift_setting_is_checked():
    with pytest.raises(ValueError, match="tta_shift=5: expected an integer from 0 to 4"):
        config.make_config("best", tta_shift=5)


def test_per_cpu_tables_are_generated_from_the_benchmark_results():
    """The README's and docs/records.md's per-CPU tables are what benchmarks/cpu_records.py makes of
    the committed time_to_accuracy.py and best_accuracy.py results (one file per CPU kind)."""
    import subprocess
    import sys
    from conftest import ROOT
    assert sorted((ROOT / "benchmarks" / "results").glob("time-to-accuracy-*.json"))
    assert sorted((ROOT / "benchmarks" / "results").glob("best-accuracy-*.json"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_records.py"), "--check"],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_per_cpu_table_gives_fast_s_whole_runs_only_where_they_trained_to_the_end():
    """A run stops early once it reaches every target, so only runs that did not are whole runs."""
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_records
    # (training wall-clock s, CPU s, test accuracy) at the end of each epoch
    plain = [{"curve": [[10.0, 20.0, 0.88]]}, {"curve": [[10.0, 20.0, 0.87]]}]
    whole = [{"curve": [[5.0, 10.0, 0.91], [6.0, 12.0, 0.9210]]}, {"curve": [[5.0, 10.0, 0.90], [7.0, 14.0, 0.9190]]}]
    results = {"cnn (plain fp32 Adam)": plain, "fast": whole}
    assert cpu_records.whole_runs(results, [0.9173, 0.93], 10.0) == "0.65 ± 0.07 (6.5 ± 0.7 s), 91.90 to 92.10%"
    stopped = [whole[0], {"curve": [[5.0, 10.0, 0.90], [7.0, 14.0, 0.9301]]}]
    assert cpu_records.whole_runs({**results, "fast": stopped}, [0.9173, 0.93], 10.0) == "stopped at the targets"
    assert cpu_records.whole_runs({"cnn (plain fp32 Adam)": plain}, [0.9173], 10.0) == "not run"
    # The benchmark prints the same whole runs under its tables.
    import contextlib
    import io
    import time_to_accuracy
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        time_to_accuracy.print_tables(results, [0.9173, 0.93], [2.0, 2.0, 2.0])
    assert "# fast: a whole run 6.5 ± 0.7 s, 0.65 ± 0.07 plain epochs" in printed.getvalue()
    assert "cnn (plain fp32 Adam): a whole run" not in printed.getvalue()


def test_the_per_cpu_table_names_the_net_each_row_trained_where_its_file_says():
    """A recipe's rule per CPU picks the net, and rules change: a row measured before a change says
    which net it timed. time_to_accuracy.py saves them; every committed file names them."""
    import json
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_records
    plain = [{"curve": [[10.0, 20.0, 0.88]]}]
    results = {"cnn (plain fp32 Adam)": plain, "fast": [{"curve": [[5.0, 10.0, 0.92]]}]}
    named = cpu_records.schedules(results, 0.9173, 10.0, {"fast": "fast_lean"})
    assert named == "fast (`fast_lean`): **0.50 ± 0.00** (5.0 ± 0.0 s)"
    assert cpu_records.schedules(results, 0.9173, 10.0, {}) == "fast: **0.50 ± 0.00** (5.0 ± 0.0 s)"
    for path in (ROOT / "benchmarks" / "results").glob("time-to-accuracy-*.json"):
        saved = json.loads(path.read_text())
        assert set(saved["models"]) == set(saved["results"]), path.name


def _best_results(tmp_path, plain, **more):
    import json
    saved = {"hardware": {"cpu": "Some CPU", "cores": 2, "threads": 2, "cpu_kind": "AVX2, fp32"},
             "recipe": "best", "model": "best_slim", "epochs": 44, "hard_fraction": 0.5, "overrides": {},
             "load_average_end": [2.0, 2.0, 2.0], "command": "python benchmarks/best_accuracy.py --seeds 2",
             "plain_epoch_seconds": plain,
             "results": [{"seed": 0, "test_accuracy": 0.9520, "train_seconds": 1800.0},
                         {"seed": 1, "test_accuracy": 0.9540, "train_seconds": 2200.0}], **more}
    path = tmp_path / "best-accuracy-avx2.json"
    path.write_text(json.dumps(saved))
    return path


def test_the_best_table_states_each_run_in_plain_epochs_timed_between_the_runs(tmp_path):
    """`best`'s budget is 100 plain epochs: each run's training over the mean plain epoch of its file,
    the runs over it counted; the net and schedule are those the recipe resolved to on that CPU."""
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_records
    row = cpu_records.best_row(_best_results(tmp_path, [19.0, 21.0]))
    assert row[:4] == ["Some CPU, 2 cores: AVX2, fp32", "2", "20.0 s (19.0 to 21.0, 2 timed)",
                       "`best_slim`, 44 epochs, the last 43 on the hardest 50%"]
    assert row[4] == "95.30 ± 0.14% (95.20, 95.40)"
    assert row[5] == "100.0 ± 14.1 (2000 ± 283 s)"  # 90 and 110 plain epochs
    assert row[6] == "1 of 2"
    with pytest.raises(SystemExit, match="best-accuracy-avx2.json: no plain reference"):
        cpu_records.best_row(_best_results(tmp_path, []))
    resized = _best_results(tmp_path, [20.0], resize_from=20)
    assert cpu_records.best_row(resized)[3] == ("`best_slim`, 44 epochs, the last 43 on the hardest 50%, "
                                                "training images from 20 pixels a side")
    erasing = _best_results(tmp_path, [20.0], augment={"flip": 0.5, "crop": 2, "erase": 0.5})
    assert cpu_records.best_row(erasing)[3].endswith("50%, random erasing on 50% of the images")
    # a file written before the augmentation was saved: erasing shows where its command set it
    older = _best_results(tmp_path, [20.0], overrides={"augment": {"flip": 0.5, "erase": 0.25}})
    assert cpu_records.best_row(older)[3].endswith("50%, random erasing on 25% of the images")
    # runs that set their precision: the row names it, not the CPU's own, which the file's cpu_kind holds
    forced = _best_results(tmp_path, [20.0], overrides={"precision": "fp32"},
                           hardware={"cpu": "Some CPU", "cores": 2, "threads": 2, "cpu_kind": "AVX-512 BF16, bf16"})
    assert cpu_records.best_row(forced)[0] == "Some CPU, 2 cores: AVX-512 BF16, fp32 (set by the command)"
    assert cpu_records.best_row(_best_results(tmp_path, [20.0], overrides={"precision": "auto"}))[0] == row[0]
    # time_to_accuracy.py's files go through the same label, with or without the overrides they now save
    bf16_cpu = {"cpu": "Some CPU", "cores": 2, "cpu_kind": "AVX-512 BF16, bf16"}
    assert cpu_records.cpu_label({"hardware": bf16_cpu}) == "Some CPU, 2 cores: AVX-512 BF16, bf16"
    assert cpu_records.cpu_label({"hardware": bf16_cpu, "overrides": {"precision": "fp32"}}).endswith(
        "AVX-512 BF16, fp32 (set by the command)")


def test_the_tables_go_between_their_own_markers_and_a_page_without_them_is_named(tmp_path):
    import sys
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_records
    page = "intro\n<!-- best-records:begin -->\nold\n<!-- best-records:end -->\nafter\n"
    new = cpu_records.rewrite(tmp_path / "page.md", page, "| new |", cpu_records.BEST_MARKERS)
    assert new == "intro\n<!-- best-records:begin -->\n| new |\n<!-- best-records:end -->\nafter\n"
    with pytest.raises(SystemExit, match="page.md: no <!-- cpu-records:begin -->"):
        cpu_records.rewrite(tmp_path / "page.md", page, "| new |", cpu_records.FAST_MARKERS)


def test_best_accuracy_appends_seeds_to_its_file_and_refuses_other_runs(tmp_path):
    """A long benchmark run in parts: --append adds seeds to the file's, each command naming its own seeds;
    a file of other settings, or one holding a seed again, is refused by name."""
    import json
    import sys
    from argparse import Namespace
    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import best_accuracy
    cfg0 = config.make_config("best", epochs=2)
    hw = {"cpu": "Some CPU", "cpu_kind": "AVX2, fp32", "threads": 2, "load_average": [1.0, 1.0, 1.0]}
    path, threads = tmp_path / "best.json", {"threads": 2}

    def run(seed):
        return {"seed": seed, "test_accuracy": 0.95, "train_seconds": 100.0 + seed}

    best_accuracy.write_json(path, Namespace(recipe="best"), ["--seeds", "1"], hw, cfg0, threads, [20.0], [run(0)])
    earlier = best_accuracy.earlier_runs(path, "best", cfg0, threads, hw, range(1, 3))
    best_accuracy.write_json(path, Namespace(recipe="best"), ["--seeds", "2", "--first-seed", "1", "--append"], hw,
                             cfg0, threads, [21.0, 22.0], [run(1), run(2)], earlier)
    saved = json.loads(path.read_text())
    assert [r["seed"] for r in saved["results"]] == [0, 1, 2] and saved["plain_epoch_seconds"] == [20.0, 21.0, 22.0]
    assert saved["augment"] == cfg0.augment  # the table names the augmentation the runs trained with
    assert saved["command"] == ("python benchmarks/best_accuracy.py --seeds 1 (seed 0), then python "
                                "benchmarks/best_accuracy.py --seeds 2 --first-seed 1 --append (seeds 1, 2)")
    with pytest.raises(SystemExit, match=r"already holds seed\(s\) \[2\]"):
        best_accuracy.earlier_runs(path, "best", cfg0, threads, hw, range(2, 4))
    with pytest.raises(SystemExit, match="differ from these in .*'epochs': \\(2, 3\\)"):
        best_accuracy.earlier_runs(path, "best", config.make_config("best", epochs=3), threads, hw, range(3, 4))
    flips = config.make_config("best", epochs=2, augment={"flip": 0.5})  # a CPU rule may set it, too
    with pytest.raises(SystemExit, match="differ from these in .*'augment'"):
        best_accuracy.earlier_runs(path, "best", flips, threads, hw, range(3, 4))
    with pytest.raises(SystemExit, match="missing.json: no earlier results to append to"):
        best_accuracy.earlier_runs(tmp_path / "missing.json", "best", cfg0, threads, hw, range(3, 4))
