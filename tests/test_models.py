"""The registry: every registered model is tested here for free, by parametrizing over it."""

from __future__ import annotations

import pytest
import torch

from fashionlab import models
from fashionlab.device import resolve


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_forward_backward(name):
    torch.manual_seed(0)
    model = models.build_model(name)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]  # frozen layers (whitening) have none
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0  # saliency needs input gradients


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_rebuild_from_recorded_spec(name):
    """What a checkpoint records (family + full arguments) rebuilds the same architecture."""
    spec = models.model_spec(name)
    a, b = models.build_model(name), models.build_from_spec(spec["family"], spec["kwargs"])
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 1, 28, 28)
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_bf16_channels_last_matches_fp32(name):
    entry = models.MODELS[name]
    rt = resolve("cpu", "bf16", conv_model=entry.channels_last)
    torch.manual_seed(0)
    model = models.build_model(name).eval()
    x = torch.rand(8, 1, 28, 28)
    ref = torch.softmax(model(x), 1)
    fast = model.to(memory_format=torch.channels_last) if rt.channels_last else model
    xin = x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
    with rt.autocast():
        out = torch.softmax(fast(xin).float(), 1)
    assert (out - ref).abs().max() < 0.05


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_summary_adds_up(name):
    model = models.build_model(name)
    rows = models.summary(model)
    assert sum(r["params"] for r in rows) == models.count_params(model)
    assert sum(r["trainable"] for r in rows) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows[-1]["output_shape"] == [10]


def test_reference_parameter_counts():
    assert models.count_params(models.build_model("mlp")) == 235_146
    assert models.count_params(models.build_model("cnn")) == 421_642


def test_typo_lists_valid_names():
    with pytest.raises(KeyError, match=r"unknown model 'cnnn'; registered models: .*cnn, cnn_dropout"):
        models.build_model("cnnn")


def test_family_arguments_are_checked():
    with pytest.raises(ValueError, match="pool must be one of max, avg, stride, none; got 'median'"):
        models.build_model("cnn", pool="median")
    with pytest.raises(ValueError, match="bad arguments for model family 'convnet'"):
        models.build_model("cnn", filters=3)


def test_pool_first_is_identical_to_relu_first():
    """The ConvNet runs max-pool before ReLU where nothing sits between them: same numbers."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 4, 3, padding=1)
    x = torch.randn(2, 1, 28, 28)
    a = torch.nn.functional.max_pool2d(torch.relu(conv(x)), 2)
    b = torch.relu(torch.nn.functional.max_pool2d(conv(x), 2))
    assert torch.equal(a, b)


def test_factor_variants_build():
    for kw in (dict(kernel=5), dict(kernel=7, channels=(16, 32, 64)), dict(pool="avg"), dict(pool="stride"),
               dict(batchnorm=True), dict(resize=32)):
        assert models.build_model("cnn", **kw)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
