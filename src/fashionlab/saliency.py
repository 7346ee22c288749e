"""Vanilla-gradient saliency: which input pixels the predicted class is most sensitive to.

Kept apart from the service (no web dependencies) so that model-inspection code can reuse it.
"""

from __future__ import annotations

import numpy as np
import torch

from .evaluate import to_input


def saliency(model: torch.nn.Module, images: np.ndarray, target: np.ndarray | None = None) -> np.ndarray:
    """(N, 28, 28) uint8 images -> (N, 28, 28) float32 maps in [0, 1].

    Each map is |d logit[target] / d pixel|, scaled so its largest value is 1. The target is the
    model's top class unless given. Runs in fp32 on the model's device, in eval mode.
    """
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        x = to_input(torch.from_numpy(np.ascontiguousarray(images)).to(device)).requires_grad_(True)
        with torch.enable_grad():
            logits = model(x).float()
            cls = logits.argmax(1) if target is None else torch.as_tensor(target, device=device).long()
            # Summing the chosen logits gives each image's own gradient: images do not interact in eval mode.
            # autograd.grad (not backward) leaves parameter .grad alone, so concurrent callers do not interfere.
            (grad,) = torch.autograd.grad(logits.gather(1, cls[:, None]).sum(), x)
    finally:
        model.train(was_training)
    grad = grad.detach().abs().squeeze(1).float().cpu().numpy()
    peak = grad.reshape(len(grad), -1).max(1).reshape(-1, 1, 1)
    return np.divide(grad, peak, out=np.zeros_like(grad), where=peak > 0)
