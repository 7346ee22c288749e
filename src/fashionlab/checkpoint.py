"""The file formats of a run: model weights and training state in safetensors, descriptions in JSON.
Which file is which lives in run.py; this module reads and writes whatever paths it is given.

Nothing here is a pickle: a checkpoint is tensors plus JSON, so loading one never runs code.
Every file is written to a temporary name and renamed, so a crash leaves the old file or the
new one, never half of one. Every file is checked by schema.py before anything is built from it or
any tensor is read: names, dtypes and shapes against the model the description builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from . import models, schema
from .atomic import write_bytes, write_text
from .schema import RunError, read_json


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    # safetensors wants contiguous, non-shared tensors; clone detaches from the live model. The file is
    # made in memory and written by Python, so a full disk is an OSError that names the file (atomic.py),
    # not a traceback from inside the writer's own file handling.
    blob = save({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, metadata)
    write_bytes(path, blob)


def write_model(weights: Path, description: Path, model: torch.nn.Module, info: dict[str, Any]) -> None:
    """The weights (with the description as metadata, so the file stands alone) and the description."""
    _save_tensors(Path(weights), model.state_dict(), {"fashionlab": json.dumps(info)})
    write_json(Path(description), info)


def read_model(description: Path, weights: Path, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from its description (model.json) and weights (safetensors).

    The description is checked and built on the meta device, and the weights' header compared with
    that model, before the model is built for real or any weight is read."""
    description, weights = Path(description), Path(weights)
    info = schema.model_info(read_json(description), str(description))
    schema.check_weights(weights, schema.meta_model(info, str(description)), description)
    arch = info["architecture"]
    model = models.build_from_spec(arch["family"], arch["kwargs"])
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise RunError(f"{weights}: not a readable safetensors file ({e})") from None
    model.load_state_dict(state)
    return model.to(device).eval(), info


# --------------------------------------------------------------------------- training state

def save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               extra_tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Everything needed to continue training, in one file: one rename makes it visible."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for pid, pstate in opt["state"].items():
        opt_meta["state"][str(pid)] = {}
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
                opt_meta["state"][str(pid)][name] = "tensor"
            else:
                opt_meta["state"][str(pid)][name] = value
    tensors.update({f"extra.{k}": v for k, v in extra_tensors.items()})
    _save_tensors(Path(path), tensors, {"state": json.dumps(state), "optimizer": json.dumps(opt_meta)})


def _laid_out_as(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """An optimiser state tensor (a momentum buffer, Adam's moments) in its parameter's memory layout.
    The file keeps every tensor contiguous, but a channels_last net's weights are not, and the fused
    optimiser kernels walk a weight, its gradient and its buffers in memory order: a buffer laid out
    otherwise would be added to the wrong elements (a resumed run then drifts from the uninterrupted
    one). Tensors of another shape (a step count) are returned as they are."""
    if value.shape != param.shape or value.stride() == param.stride():
        return value
    return torch.empty_like(param, dtype=value.dtype).copy_(value)


def load_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a checkpoint into model and optimizer; returns the extra tensors and the training state.
    Every metadata entry and tensor a resume reads is checked first (schema.check_checkpoint)."""
    path = Path(path)
    opt_meta, state = schema.check_checkpoint(path, model, optimizer)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise RunError(f"{path}: not a readable checkpoint ({e})") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state's ids index these
    opt_state: dict[int, dict[str, Any]] = {}
    for pid, pstate in opt_meta["state"].items():
        opt_state[int(pid)] = {
            name: (_laid_out_as(tensors[f"optim.{pid}.{name}"], params[int(pid)]) if value == "tensor" else value)
            for name, value in pstate.items()
        }
    # A parameter the file holds no state for keeps the fresh optimiser's (fused SGD starts every one with
    # a zero momentum buffer, training.start_momentum): an earlier version saved none for a layer not yet
    # trained, and the fused kernel refuses a step where some parameters have a buffer and others not.
    own = optimizer.state_dict()["state"]
    optimizer.load_state_dict({"state": {**own, **opt_state}, "param_groups": opt_meta["param_groups"]})
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return extra, state
