"""A look inside a trained model: first-layer filters, feature maps after every conv layer,
Grad-CAM (or input-gradient saliency) overlays, and a 2-D embedding of penultimate features.

Every function takes a model in eval mode and uint8 images and returns a matplotlib Figure,
so the run report and `fashionlab explain RUN` draw the same pictures. Explanations run in
fp32: gradients of bf16 activations are too coarse to show anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from . import evaluate, pages, runlock
from .device import resolve
from .run import RunFolder


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def first_layer_filters(model: nn.Module, max_filters: int = 64):
    """Weights of the first layer as images: conv kernels, or a dense layer's 28x28 weight maps.

    Returns None for models whose first layer is not image-shaped (a recurrent model).
    """
    convs = conv_layers(model)
    if convs:
        name, conv = convs[0]
        w = conv.weight.detach().float().cpu().mean(1).numpy()  # (out, k, k): mean over input channels
        title = f"First conv layer ({name}): {conv.out_channels} filters of {conv.kernel_size[0]}x{conv.kernel_size[1]}"
    else:
        first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if first is None or int(np.sqrt(first.in_features)) ** 2 != first.in_features:
            return None
        side = int(np.sqrt(first.in_features))
        w = first.weight.detach().float().cpu().numpy().reshape(-1, side, side)
        title = f"First dense layer: weights of {min(len(w), max_filters)} of {len(w)} units as {side}x{side} images"
    w = w[:max_filters]
    rows, cols = pages.grid_shape(len(w), 16 if len(w) > 32 else 8)
    fig = pages.new_figure(cols * 0.75 + 0.4, rows * 0.75 + 0.6)
    fig.suptitle(title, fontsize=9)
    for i, k in enumerate(w):
        ax = fig.add_subplot(rows, cols, i + 1)
        lim = np.abs(k).max() or 1.0
        ax.imshow(k, cmap="RdBu_r", vmin=-lim, vmax=lim)  # red positive, blue negative; white zero
        pages.hide_axes(ax)
    return fig


@torch.no_grad()
def feature_maps(model: nn.Module, image_u8: np.ndarray, max_channels: int = 16, caption: str = ""):
    """One row per conv layer: the input, then the first channels of that layer's output."""
    convs = conv_layers(model)
    if not convs:
        return None
    captured: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, out, n=n: captured.__setitem__(n, out.detach().float().clone()))
             for n, m in convs]
    try:
        model(evaluate.to_input(torch.from_numpy(image_u8[None])).to(model_device(model)))
    finally:
        for h in hooks:
            h.remove()
    cols = max_channels + 1
    fig = pages.new_figure(cols * 0.62 + 0.8, len(convs) * 0.75 + 0.7)
    fig.suptitle(f"Feature maps after every conv layer{': ' + caption if caption else ''} "
                 f"(first {max_channels} channels)", fontsize=9)
    for r, (name, conv) in enumerate(convs):
        maps = captured[name][0].cpu().numpy()
        ax = fig.add_subplot(len(convs), cols, r * cols + 1)
        ax.imshow(image_u8, cmap="gray_r")
        ax.set_ylabel(f"{name}\n{maps.shape[1]}x{maps.shape[2]}", fontsize=6, rotation=0, ha="right", va="center")
        pages.hide_axes(ax)
        for c in range(min(max_channels, len(maps))):
            ax = fig.add_subplot(len(convs), cols, r * cols + c + 2)
            ax.imshow(maps[c], cmap="viridis")
            pages.hide_axes(ax)
    return fig


def attribution(model: nn.Module, images_u8: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, str]:
    """Heatmaps in [0, 1] at 28x28, one per image, for the target classes.

    Grad-CAM on the last conv layer when the model has one (where the model looks, at the
    resolution of its deepest features); otherwise the absolute input gradient (saliency).
    """
    dev = model_device(model)
    x = evaluate.to_input(torch.from_numpy(np.ascontiguousarray(images_u8))).to(dev)
    t = torch.as_tensor(targets, dtype=torch.long, device=dev)
    convs = conv_layers(model)
    # cuDNN's RNN backward refuses eval mode; the plain kernels give the same gradients.
    with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
        if convs:
            store: dict[str, torch.Tensor] = {}

            def hook(mod, inp, out):
                store["act"] = out
                return out.clone()  # later in-place ReLUs change the clone, never the activation we keep
            h = convs[-1][1].register_forward_hook(hook)
            try:
                logits = model(x).float()
            finally:
                h.remove()
            act = store["act"]
            grads, = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), act)
            weights = grads.mean((2, 3), keepdim=True)
            cam = torch.relu((weights * act).sum(1, keepdim=True))
            cam = torch.nn.functional.interpolate(cam, size=images_u8.shape[-2:], mode="bilinear", align_corners=False)
            maps, method = cam[:, 0].detach(), f"Grad-CAM on {convs[-1][0]}"
        else:
            x = x.clone().requires_grad_(True)
            logits = model(x).float()
            grads, = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
            maps, method = grads.abs()[:, 0], "input-gradient saliency"
    maps = maps.cpu().numpy()
    peak = maps.reshape(len(maps), -1).max(1)[:, None, None]
    return maps / np.maximum(peak, 1e-12), method


def pick_per_class(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """The first `per_class` indices of every class (deterministic, so reports are repeatable)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)])


def saliency_figure(model: nn.Module, images_u8: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                    per_class: int = 3):
    """Overlays for `per_class` test images of every class, for the predicted class."""
    idx = pick_per_class(labels, per_class, len(class_names))
    imgs = images_u8[idx]
    with torch.no_grad():
        pred = model(evaluate.to_input(torch.from_numpy(np.ascontiguousarray(imgs))).to(model_device(model))
                     ).argmax(1).cpu().numpy()
    maps, method = attribution(model, imgs, pred)
    rows, cols = len(class_names), per_class
    fig = pages.new_figure(cols * 1.25 + 1.3, rows * 1.15 + 0.5)
    fig.suptitle(f"{method}, for the predicted class (title: predicted; red: wrong)", fontsize=9)
    for i, (img, m, y, p) in enumerate(zip(imgs, maps, labels[idx], pred)):
        r, c = divmod(i, per_class)
        ax = fig.add_subplot(rows, cols, r * cols + c + 1)
        ax.imshow(img, cmap="gray_r")
        ax.imshow(m, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        ax.set_title(class_names[p], fontsize=6, color="black" if p == y else "red", pad=2)
        if c == 0:
            ax.set_ylabel(class_names[y], fontsize=7)
        pages.hide_axes(ax)
    return fig, method


@torch.no_grad()
def penultimate_features(model: nn.Module, images_u8: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The input of the last dense layer (what the classifier separates), for every image."""
    head = last_linear(model)
    if head is None:
        raise ValueError("the model has no final dense layer to read penultimate features from")
    feats: list[torch.Tensor] = []
    h = head.register_forward_pre_hook(lambda mod, inp: feats.append(inp[0].detach().float().flatten(1).cpu()))
    try:
        dev = model_device(model)
        for i in range(0, len(images_u8), batch_size):
            model(evaluate.to_input(torch.from_numpy(np.ascontiguousarray(images_u8[i:i + batch_size]))).to(dev))
    finally:
        h.remove()
    return torch.cat(feats).numpy()


def _sklearn():
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        return PCA, TSNE
    except ImportError:
        return None, None


def embed(features: np.ndarray, labels: np.ndarray, max_tsne: int = 1000, seed: int = 0,
          tsne: bool = True) -> dict:
    """{'pca': (N, 2), 'tsne': (M, 2) or None, 'tsne_idx': indices of the M points, 'note': str}."""
    PCA, TSNE = _sklearn()
    if PCA is not None:
        pca = PCA(2, random_state=seed).fit_transform(features)
    else:  # numpy's SVD gives the same projection (up to sign)
        centred = features - features.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        pca = centred @ vt[:2].T
    out = {"pca": pca, "tsne": None, "tsne_idx": None, "note": ""}
    if not tsne:
        out["note"] = "t-SNE not requested."
    elif TSNE is None:
        out["note"] = ("t-SNE skipped: scikit-learn is not installed (pip install 'fashionlab[report]'); "
                       "PCA only, computed with numpy.")
    else:
        # t-SNE is quadratic-ish in the points: a fixed, class-balanced sample keeps it to seconds.
        per_class = max(1, max_tsne // max(1, len(np.unique(labels))))
        idx = pick_per_class(labels, per_class, int(labels.max()) + 1)
        out["tsne"] = TSNE(2, init="pca", perplexity=min(30.0, max(2.0, (len(idx) - 1) / 3)),
                           random_state=seed).fit_transform(features[idx])
        out["tsne_idx"] = idx
        out["note"] = f"t-SNE on {len(idx)} test images ({per_class} per class); PCA on {len(features)}."
    return out


def embedding_figure(emb: dict, labels: np.ndarray, class_names: Sequence[str]):
    panels = [("PCA", emb["pca"], labels)]
    if emb["tsne"] is not None:
        panels.append(("t-SNE", emb["tsne"], labels[emb["tsne_idx"]]))
    fig = pages.new_figure(5.2 * len(panels) + 1.8, 4.6)
    for i, (name, xy, y) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for c, cname in enumerate(class_names):
            sel = y == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=3, alpha=.6, color=f"C{c % 10}", label=cname, rasterized=True)
        ax.set_title(f"{name} of penultimate features", fontsize=9)
        pages.hide_axes(ax)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=7, markerscale=3)
    return fig


def explain_sections(model: nn.Module, test_images: np.ndarray, test_labels: np.ndarray,
                     class_names: Sequence[str], figs: pages.FigureWriter, embed_points: int = 2000,
                     max_tsne: int = 1000) -> list[pages.Section]:
    """The 'inside the model' sections, shared by the run report and the explain page."""
    sec = pages.Section("Inside the model")
    fig = first_layer_filters(model)
    if fig is not None:
        sec.add(figs.add("explain_filters", fig, "First-layer weights as images (red positive, blue negative)"))
    else:
        sec.add(pages.note("This model's first layer is not image-shaped (it reads rows as a sequence): no filters to show."))
    fig = feature_maps(model, test_images[0], caption=f"test image 0 ({class_names[test_labels[0]]})")
    if fig is not None:
        sec.add(figs.add("explain_feature_maps", fig, "Feature maps of one test image after every conv layer"))
    else:
        sec.add(pages.note("This model has no conv layers: no feature maps to show."))
    fig, method = saliency_figure(model, test_images, test_labels, class_names)
    sec.add(figs.add("explain_saliency", fig, f"{method}: three test images per class (rows: true class)"))

    n = min(embed_points, len(test_labels))
    sample = np.sort(np.random.default_rng(0).choice(len(test_labels), n, replace=False)) if n < len(test_labels) \
        else np.arange(n)
    feats = penultimate_features(model, test_images[sample])
    emb = embed(feats, test_labels[sample], max_tsne=max_tsne)
    sec.add(figs.add("explain_embedding", embedding_figure(emb, test_labels[sample], class_names),
                     f"2-D embedding of the penultimate features ({feats.shape[1]} dimensions), coloured by class"))
    if emb["note"]:
        sec.add(pages.note(emb["note"], "warn" if "skipped" in emb["note"] else ""))
    return [sec]


def load_for_explanation(run_dir: str | Path, device: str = "auto") -> tuple[nn.Module, dict]:
    rt = resolve(device, "fp32")
    model, info = RunFolder(run_dir).load_model(device=rt.device)
    return model.float().eval(), info


def write_explanation(run_dir: str | Path, dataset, out: str | Path | None = None, device: str = "auto") -> Path:
    """`fashionlab explain RUN`: explain.html (and its PNGs) in the run folder."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "explain.html"
    with runlock.writing_into(run_dir, out):  # no other process writes the run folder meanwhile
        model, info = load_for_explanation(run_dir, device)
        figs = pages.FigureWriter(out.parent)
        sections = explain_sections(model, dataset.test_images, dataset.test_labels, dataset.class_names, figs)
        name = info["architecture"].get("name", "model")
        return pages.write_page(out, f"Inside {name}", sections, subtitle=f"Run {run_dir}")
