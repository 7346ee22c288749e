"""The registry: every registered model is tested here for free, by parametrizing over it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import fashionlab
from fashionlab import models
from fashionlab.device import resolve

PACKAGE_DIR = Path(fashionlab.__file__).parent


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
    with pytest.raises(KeyError, match=r"unknown model 'cnnn'; registered models: .*cnn, cnn_dropout") as err:
        models.build_model("cnnn")
    assert all(name in str(err.value) for name in models.MODELS)


def test_misspelt_argument_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"bad arguments for model family 'convnet': unknown argument\(s\) chanels; "
                                         r"valid arguments: channels, kernel, .*in_channels"):
        models.build_model("cnn", chanels=[16])
    with pytest.raises(ValueError, match=r"unknown argument\(s\) dpeth, widht; valid arguments: stem, widths"):
        models.build_from_spec("fastnet", {"widht": 3, "dpeth": 2})


def test_unknown_family_is_a_key_error():
    with pytest.raises(KeyError, match="unknown model family 'transformer'; known families: convnet, fastnet"):
        models.build_from_spec("transformer", {})


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


# --------------------------------------------------------------------------- list_models and the package's imports

@pytest.fixture(scope="module")
def listed() -> dict[str, dict]:
    return {row["name"]: row for row in models.list_models()}


def test_list_models_rows_in_registration_order(listed):
    assert list(listed) == ["mlp", "cnn", "cnn_dropout", "cnn_small", "lstm", "vgg",
                            "fast", "fast_lean", "fast_narrow", "fast_mid", "fast_wide", "fast_slim",
                            "fast_strided", "fast_strided_narrow", "fast_strided_mid", "fast_strided_valid",
                            "fast_strided_valid_fixed", "fast_strided_valid_wide", "best", "best_slim", "resnet8", "wrn16_4"]
    for name, row in listed.items():
        entry = models.MODELS[name]
        assert row == {"name": name, "family": entry.family, "params": row["params"], "trainable": row["trainable"],
                       "origin": entry.origin}
        # Only the whitening layer is frozen, so only the whitened nets have fewer trainable parameters.
        assert (row["trainable"] < row["params"]) == bool(entry.kwargs.get("whiten"))


def test_list_models_leaves_the_random_state_alone():
    torch.manual_seed(0)
    expected = models.build_model("cnn_small").state_dict()
    torch.manual_seed(0)
    models.list_models()
    got = models.build_model("cnn_small").state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("name", list(models.MODELS))
def test_every_registered_model(name, listed):
    """Forward shape, the parameter count list_models reports, and a rebuild from the recorded spec."""
    model = models.build_model(name).eval()
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert models.count_params(model) == listed[name]["params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == listed[name]["trainable"]
    spec = models.model_spec(name)
    rebuilt = models.build_from_spec(spec["family"], spec["kwargs"])
    assert type(rebuilt) is models.FAMILIES[models.MODELS[name].family]
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_imports(tree: ast.Module):
    """Import statements that run when the module is imported: not those in function bodies
    (they run later, once every module is loaded) nor under `if TYPE_CHECKING:`."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """fashionlab module -> the fashionlab modules it imports at import time. `from . import x` counts as
    importing x where x is a module. A submodule's implicit import of its parent package is not an edge:
    the parent is already being initialised then, so it is no cycle."""
    paths = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _import_time_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + [node.module] * bool(node.module))
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per cycle found by depth-first search: [a, b, ..., a]."""
    found, done = [], set()

    def visit(node, path):
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, path + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_registry_imports_no_family_module():
    graph = _import_graph()
    assert graph["fashionlab.models._registry"].isdisjoint(
        {"fashionlab.models", "fashionlab.models.classic", "fashionlab.models.records"})
    # and the families register through it, so it is the registry every family writes to
    assert {"fashionlab.models._registry", "fashionlab.models.layers"} <= graph["fashionlab.models.classic"]
    assert {"fashionlab.models._registry", "fashionlab.models.layers"} <= graph["fashionlab.models.records"]


def test_package_has_no_import_cycle():
    assert "fashionlab.models._registry" in _import_graph()  # the graph sees the models package
    assert _cycles(_import_graph()) == []
