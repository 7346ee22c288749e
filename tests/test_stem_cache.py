"""The frozen stem cache: FastNet's whitening filters come in mirror pairs, the cache holds exactly
what the stem computes (mirror images included), and a cached run trains as an uncached one does."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import resumed_and_whole, rewrite_tensors, stopped_run, synthetic_dataset
from fashionlab import config, evaluate, models, run as run_mod, stem_cache
from fashionlab.augment import Augment
from fashionlab.device import resolve
from fashionlab.models.records import FastNet
from fashionlab.schema import RunError
from fashionlab.stem_cache import StemCache

FP32 = resolve("cpu", "fp32", conv_model=True)


def _whitened(images_u8: torch.Tensor, **kwargs) -> FastNet:
    torch.manual_seed(0)
    net = FastNet(**{"stem": 0, "widths": (16, 32), "whiten": True, **kwargs})
    net.init_from_data(evaluate.to_input(images_u8))
    return net


@pytest.mark.parametrize("fixed", [False, True])  # with a fixed norm the stem ends with the activation
def test_whitening_filters_come_in_mirror_pairs_and_the_stem_commutes_with_mirroring(real_data, fixed):
    images = torch.from_numpy(real_data.train_images[:2000]).unsqueeze(1)
    net = _whitened(images, fixed_stem_norm=fixed)
    stem, order = net.frozen_stem()
    assert len(stem) == (4 if fixed else 3) and isinstance(stem[2], torch.nn.MaxPool2d)
    w = net.net[1].weight
    assert torch.equal(order[order], torch.arange(16))  # swapping twice is the identity
    assert all(torch.equal(w[order[i]], w[i].flip(-1)) for i in range(16))  # exact, by construction
    if fixed:  # the fixed norm's bias too: a filter and its mirror image see the same statistics
        assert torch.equal(net.net[1].bias[order], net.net[1].bias)
    assert (order != torch.arange(16)).any()  # some filters are antisymmetric: their mirror is the negative
    x = evaluate.to_input(images[:500])
    with torch.no_grad():
        assert torch.allclose(stem(x.flip(-1)), stem(x).flip(-1)[:, order], atol=1e-5)
        assert torch.allclose(net.forward_from_stem(stem(x)), net(x), atol=1e-5)


def test_no_frozen_stem_where_mirroring_does_not_map_it_onto_itself():
    images = torch.from_numpy(synthetic_dataset(n_train=100, n_test=10).train_images).unsqueeze(1)
    assert FastNet(stem=0, widths=(16, 32), whiten=False).frozen_stem() is None
    # 32 channels: 18 whitening filters and 14 random ones without a mirror partner
    assert _whitened(images, widths=(32, 64)).frozen_stem() is None
    assert _whitened(images, stem=24).frozen_stem() is None  # the whitening conv feeds a BatchNorm, no pool
    assert _whitened(images).frozen_stem() is not None
    cache, why = StemCache.for_run(models.build_model("resnet8"), Augment(flip=0.5), images, FP32)
    assert cache is None and "no frozen stem" in why
    cache, why = StemCache.for_run(_whitened(images), Augment(flip=0.5, crop=2), images, FP32)
    assert cache is None and "crop changes the image before the stem" in why


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mirroring_a_cached_entry_is_the_flip_and_the_channel_swap_to_the_bit(layout, dtype):
    """mirror gathers the flipped positions and swapped channels in one pass; the values are the
    flip's and the swap's exactly, in the batch's own layout, odd widths and a batch of one included."""
    order = torch.arange(16)
    order[[0, 1, 5, 12]] = torch.tensor([1, 0, 12, 5])  # mirror pairs swap; symmetric filters stay
    for shape in [(5, 16, 14, 14), (3, 16, 7, 9), (1, 16, 4, 4)]:
        h = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
        cache = StemCache(torch.nn.Identity(), order, 10, True, h[:1])
        mirrored = cache.mirror(h)
        assert torch.equal(mirrored, h.flip(-1)[:, order])
        assert torch.equal(cache.mirror(mirrored), h)  # and back
        if layout == torch.channels_last:
            assert mirrored.is_contiguous(memory_format=torch.channels_last)


# The stem ends with its pool, or with an activation after it: GELU writes a new tensor, the in-place
# ReLU the pool's own output (the cache's memory when the pool wrote there).
@pytest.mark.parametrize("kwargs", [{}, {"fixed_stem_norm": True}, {"fixed_stem_norm": True, "act": "relu"}])
@pytest.mark.parametrize("side", [28, 27])  # the pool as the maximum of four views, and as the layer (odd sides)
def test_the_cache_runs_the_stem_to_the_bit(side, kwargs):
    images = torch.randint(0, 256, (64, 1, side, side), dtype=torch.uint8)
    net = _whitened(images, **kwargs).to(memory_format=torch.channels_last)
    cache, _ = StemCache.for_run(net, Augment(flip=0.5), images, FP32)
    x = evaluate.to_input(images).contiguous(memory_format=torch.channels_last)
    x[0, 0, 3, 4] = float("nan")  # a NaN pixel stays NaN, as max_pool2d keeps it
    with torch.no_grad():
        expected, h = net.frozen_stem()[0](x), cache.run_stem(x)
    assert torch.equal(h.isnan(), expected.isnan()) and h[0].isnan().any()
    assert torch.equal(h.nan_to_num(), expected.nan_to_num()) and h.is_contiguous(memory_format=torch.channels_last)
    # Written straight into a range of the cache (fill's path for a run of indices), and through a copy for
    # scattered indices: the same bits as the stem on the same batch either way. The same batch, because an
    # elementwise kernel may round a batch's last values on another path: with AVX-512, GELU on these 3 images
    # at 13x13 gave 9 of its last 16 values (those after whole pairs of 16-float vectors) one bit apart from
    # the same values inside the batch of 64.
    with torch.no_grad():
        cache.run_stem(x[:40], out=cache.features[:40])
        cache.features[[40, 50, 63]] = cache.run_stem(x[[40, 50, 63]])
        stem = net.frozen_stem()[0]
        in_range, scattered = stem(x[:40]), stem(x[[40, 50, 63]])
    assert torch.equal(cache.features[:40].nan_to_num(), in_range.nan_to_num())
    assert torch.equal(cache.features[[40, 50, 63]], scattered)


def test_no_cache_beyond_its_memory_limit(monkeypatch):
    images = torch.from_numpy(synthetic_dataset(n_train=100, n_test=10).train_images).unsqueeze(1)
    cache, why = StemCache.for_run(_whitened(images), Augment(flip=0.5), images, FP32)
    assert cache is not None and len(cache.features) == 100 and "100 x (16, 14, 14) float32" in why
    assert "mirrored when drawn the other way round" in why
    monkeypatch.setattr(stem_cache, "MAX_BYTES", 100 * 16 * 14 * 14 * 4 - 1)
    cache, why = StemCache.for_run(_whitened(images), Augment(flip=0.5), images, FP32)
    assert cache is None and "limit" in why


@pytest.mark.parametrize("precision, fixed", [("fp32", False), ("bf16", False), ("fp32", True)])
def test_cache_holds_what_the_stem_computes_for_images_and_their_mirrors(real_data, precision, fixed):
    rt = resolve("cpu", precision, conv_model=True)
    images = torch.from_numpy(real_data.train_images[:1000]).unsqueeze(1)
    net = _whitened(images, fixed_stem_norm=fixed)
    net = net.to(memory_format=torch.channels_last) if rt.channels_last else net
    aug = Augment(flip=0.5)
    cache, _ = StemCache.for_run(net, aug, images, rt)
    stem, order = net.frozen_stem()
    mirrored = torch.rand(len(images), generator=torch.Generator().manual_seed(1)) < 0.5
    with rt.autocast():
        with pytest.raises(RuntimeError, match="read before it was filled"):
            cache.batch(torch.arange(8), aug, torch.Generator())
        # 900 of the 1,000 images, in two pieces that are not ranges: not complete yet
        assert cache.fill(images, mirrored, 128, rt, which=torch.arange(0, 900, 2)) == 450
        assert cache.fill(images, mirrored, 128, rt, which=torch.arange(1, 900, 2)) == 450
        assert not cache.complete
        assert cache.fill(images, mirrored, 128, rt) == 100 and cache.complete  # the rest, a range
        x = evaluate.to_input(images).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            direct, direct_mirrored = stem(x), stem(x.flip(-1))
        # Each entry is the stem's output for the orientation it was computed from, to the bit.
        assert torch.equal(cache.computed_mirrored, mirrored)
        assert torch.equal(cache.features, torch.where(mirrored[:, None, None, None], direct_mirrored, direct))
        # Read back: the same flips as random_flip would draw, mirrored where drawn the other way round.
        idx = torch.arange(len(images))
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        served = cache.batch(idx, aug, g1)
        flipped = torch.rand(len(images), generator=g2) < 0.5
    tol = dict(atol=1e-5) if precision == "fp32" else dict(atol=0.05, rtol=0.02)  # bf16 rounds to 8 bits
    expected = torch.where(flipped[:, None, None, None], direct_mirrored, direct)
    assert torch.allclose(served.float(), expected.float(), **tol)
    drawn_as_computed = flipped == mirrored
    assert torch.equal(served[drawn_as_computed], expected[drawn_as_computed])  # read as stored, not mirrored
    other_way = ~drawn_as_computed  # the stored entry mirrored, exactly (mirroring moves values, no arithmetic)
    assert torch.equal(served[other_way], cache.mirror(cache.features[other_way]))
    if rt.channels_last:  # the layout the convolutions after the stem run fastest on
        assert served.is_contiguous(memory_format=torch.channels_last)
    assert 300 < int(flipped.sum()) < 700 and 300 < int(drawn_as_computed.sum()) < 700


@pytest.mark.parametrize("start", [0, 3])  # an epoch from its start, and resumed after its third step
def test_the_first_epochs_flips_are_replayed_without_moving_the_generator(start):
    aug, n, batch = Augment(flip=0.5), 1000, 64
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(n, generator=g)
    for step in range(start):  # the steps a resumed epoch has behind it
        stem_cache.flip_mask(batch, 0.5, g, "cpu")
    before = g.get_state()
    mirrored = StemCache.first_epoch_mirrors(n, perm[start * batch:], batch, aug, g)
    assert torch.equal(g.get_state(), before)
    for idx in perm[start * batch:].split(batch):  # as the epoch's steps then draw them
        assert torch.equal(stem_cache.flip_mask(len(idx), 0.5, g, "cpu"), mirrored[idx])
    assert not mirrored[perm[:start * batch]].any()  # images already trained on are not drawn again
    assert StemCache.first_epoch_mirrors(n, perm, batch, Augment(), g) is None  # no flips: nothing to mirror


def test_the_first_epoch_reads_every_image_as_it_was_computed(tmp_path, monkeypatch):
    """The replayed orientations are the ones the first epoch's steps draw: it mirrors no entry."""
    mirrored_batches = []
    mirror = StemCache.mirror
    monkeypatch.setattr(StemCache, "mirror", lambda self, h: mirrored_batches.append(len(h)) or mirror(self, h))
    ds = synthetic_dataset(n_train=256, n_test=50, seed=5)
    cfg = config.make_config("fast-full", epochs=1, batch_size=32)
    assert run_mod.train_run(cfg, tmp_path / "one", dataset=ds, quiet=True).metrics["stem_cached"]
    assert mirrored_batches == []
    cfg = config.make_config("fast-full", epochs=2, batch_size=32)
    run_mod.train_run(cfg, tmp_path / "two", dataset=ds, quiet=True)
    assert len(mirrored_batches) == 256 // 32  # each of the second epoch's steps mirrors some


@pytest.mark.parametrize("model", ["fast_lean", "fast_strided_valid_fixed"])  # a BatchNorm after the stem, or none
def test_a_cached_run_trains_as_an_uncached_one(tmp_path, model):
    """Same flips, same batches, same arithmetic up to summation order: in float32 the weights after
    three epochs (the last two read from the cache) agree to rounding."""
    ds = synthetic_dataset(n_train=256, n_test=50, seed=5)
    runs = {}
    for cached in (True, False):
        cfg = config.make_config("fast", epochs=3, batch_size=64, precision="fp32", cache_stem=cached, model=model)
        metrics = run_mod.train_run(cfg, tmp_path / str(cached), dataset=ds, quiet=True).metrics
        assert metrics["stem_cached"] is cached
        runs[cached] = metrics

    a, _ = run_mod.RunFolder(tmp_path / "True").load_model()
    b, _ = run_mod.RunFolder(tmp_path / "False").load_model()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p.float(), q.float(), atol=1e-4, rtol=1e-3), name
    assert runs[True]["test_accuracy"] == runs[False]["test_accuracy"]


def test_recipes_use_the_cache_only_where_it_is_exact(tmp_path):
    ds = synthetic_dataset(n_train=64, n_test=20)
    fast = run_mod.train_run(config.make_config("fast", epochs=1, batch_size=32), tmp_path / "fast", dataset=ds,
                             quiet=True).metrics
    best = run_mod.train_run(config.make_config("best", epochs=1, batch_size=32), tmp_path / "best", dataset=ds,
                             quiet=True).metrics
    assert fast["stem_cached"] and not best["stem_cached"]  # best crops its images


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stop", [5, 11])  # with the cache half filled (first epoch of 8 steps), and once full
def test_a_cached_run_resumes_into_the_uninterrupted_one(stop, precision, tmp_path):
    """The resumed run recomputes the cache's entries from the orientations the stopped run computed
    them from (a mirror image's stem equals the mirrored stem only up to rounding), so it ends with
    the uninterrupted run's weights, bit for bit."""
    ds = synthetic_dataset(n_train=256, n_test=50, seed=5)
    cfg = config.make_config("fast-full", epochs=2, batch_size=32, precision=precision)
    resumed, whole = resumed_and_whole(cfg, tmp_path, ds, at_step=stop)
    assert resumed["stem_cached"] and whole["stem_cached"]
    a, _ = run_mod.RunFolder(tmp_path / "cut").load_model()
    b, _ = run_mod.RunFolder(tmp_path / "whole").load_model()
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert resumed["test_loss"] == whole["test_loss"]


def test_the_checkpointed_cache_state_must_fit_the_run(tmp_path):
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    net = _whitened(images).to(memory_format=torch.channels_last)
    cache, _ = StemCache.for_run(net, Augment(flip=0.5), images, FP32)
    state = cache.state()
    assert set(state) == {"stem.filled", "stem.mirrored"} and not state["stem.filled"].any()
    with pytest.raises(RuntimeError, match="read before it was filled"):
        cache.batch(torch.arange(4), Augment(flip=0.5), torch.Generator())
    with pytest.raises(RunError, match="extra.stem.filled holds 39 entries; this run trains on 40 images"):
        cache.load({"stem.filled": torch.ones(39, dtype=torch.bool), "stem.mirrored": torch.ones(39, dtype=torch.bool)},
                   images, 16, FP32)
    with pytest.raises(RunError, match="extra.stem.mirrored is missing, but this run flips its images"):
        cache.load({"stem.filled": torch.ones(40, dtype=torch.bool)}, images, 16, FP32)
    assert cache.load({"stem.filled": torch.ones(40, dtype=torch.bool), "stem.mirrored": torch.zeros(40, dtype=torch.bool)},
                      images, 16, FP32) == 40
    assert cache.complete


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"extra.stem.filled": t["extra.stem.filled"].float()}),
     "extra.stem.filled is float32 [256]; expected bool of one dimension"),
    (lambda t: t.update({"extra.stem.mirrored": t["extra.stem.mirrored"][:-1]}),
     "extra.stem.mirrored is bool [255]; expected bool of the shape of extra.stem.filled"),
    (lambda t: t.update({k: t[k][:-1] for k in ("extra.stem.filled", "extra.stem.mirrored")}),
     "extra.stem.filled holds 255 entries; this run trains on 256 images"),
])
def test_a_checkpoint_with_another_cache_state_is_refused_by_name(change, message, tmp_path):
    ds = synthetic_dataset(n_train=256, n_test=50, seed=5)
    cfg = config.make_config("fast-full", epochs=2, batch_size=32)
    stopped_run(cfg, tmp_path / "cut", ds, at_step=5)
    rewrite_tensors(tmp_path / "cut" / run_mod.CHECKPOINT, lambda tensors, meta: change(tensors))
    with pytest.raises(RunError, match=re.escape(message)):
        run_mod.resume_run(tmp_path / "cut", dataset=ds, quiet=True)
