"""How far each version of a model is from its speed floor.

    PYTHONPATH=src python benchmarks/floor.py [--threads 1]

The floor of one 60,000-image training epoch is 3 x forward FLOPs x 60,000 over the matrix-multiply
rate this machine measures in the same run (bf16 for bf16 versions, fp32 otherwise): the backward pass
does about twice the forward's multiply-adds, and nothing can go faster than the matmul units.
Measured is the process CPU time of steady-state training steps on synthetic batches (the real loop's
data handling costs little next to it), so one thread approximates an idle core and the figure
barely moves with other people's load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, synthetic_step, table  # noqa: E402
from flops import forward_flops, matmul_rate  # noqa: E402

from fashionlab import models  # noqa: E402

# The registry's widths of `best`, so its row's label follows the entry it times.
BEST_WIDTHS = "-".join(str(w) for w in models.MODELS["best"].kwargs["widths"])

# (label, model, model arguments, bf16 + channels_last, batch size); STEM_CACHED: versions timed from
# the frozen stem's output, as train() runs them once its stem cache is filled
VERSIONS = [
    ("cnn, plain reference", "cnn", {}, False, 128),
    ("cnn, bf16", "cnn", {}, True, 256),
    ("fast v1: widths 32-64-128, trained first conv, batch 256", "fast",
     {"whiten": False, "widths": (32, 64, 128), "act": "gelu"}, True, 256),
    ("fast v2: widths 32-64-128, frozen whitening conv, batch 128", "fast",
     {"widths": (32, 64, 128), "act": "gelu"}, True, 128),
    ("fast v3: widths 16-64-128, 16 whitening filters, GELU, batch 256", "fast", {"act": "gelu"}, True, 256),
    ("fast: the same with ReLU", "fast", {}, True, 256),
    ("fast: the same, frozen stem cached (the recipe after its first epoch)", "fast", {}, True, 256),
    ("resnet8 (best until the wider fastnet), batch 128", "resnet8", {}, True, 128),
    (f"best: fastnet {BEST_WIDTHS}, two convs per block, batch 256", "best", {}, True, 256),
]
STEM_CACHED = {"fast: the same, frozen stem cached (the recipe after its first epoch)"}


def from_cached_stem(model: torch.nn.Module, bf16: bool, batch: int):
    """A forward for synthetic_step that starts from the stem's output for a random batch, computed
    once, as the cached training loop does (its one gather per batch is left out: 0.25 ms)."""
    model.init_from_data(torch.rand(500, 1, 28, 28))  # whitening filters, so the stem comes in mirror pairs
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    stem, _ = model.frozen_stem()
    x = torch.rand(batch, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = stem(x.contiguous(memory_format=torch.channels_last) if bf16 else x)
    return lambda _: model.forward_from_stem(h)


def cpu_seconds_per_epoch(model: torch.nn.Module, bf16: bool, batch: int, flops: float, forward=None) -> float:
    step = synthetic_step(model, bf16, batch, forward)
    for _ in range(2):
        step()
    steps = max(3, int(6000 / batch / (flops / 15e6)))  # about the same work per version
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / (steps * batch) * 60000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, bf16_rate = matmul_rate(torch.bfloat16)
    _, fp32_rate = matmul_rate(torch.float32)
    hw = hardware()
    print(f"# {hw['cpu']} | torch {hw['torch']} | {args.threads} thread(s) | matmul per CPU second: "
          f"bf16 {bf16_rate / 1e9:.0f} GFLOP, fp32 {fp32_rate / 1e9:.0f} GFLOP")
    rows = []
    for label, name, kw, bf16, batch in VERSIONS:
        torch.manual_seed(0)
        model = models.build_model(name, **kw)
        flops = forward_flops(model)
        forward = from_cached_stem(model, bf16, batch) if label in STEM_CACHED else None
        measured = cpu_seconds_per_epoch(model, bf16, batch, flops, forward)
        floor = 3 * flops * 60000 / (bf16_rate if bf16 else fp32_rate)
        rows.append([label, f"{flops / 1e6:.1f}", "bf16" if bf16 else "fp32", f"{measured:.1f}", f"{floor:.1f}",
                     f"{measured / floor:.1f}x", f"{3 * flops * 60000 / measured / 1e9:.0f}"])
    print(table(["version", "MFLOP/image", "precision", "CPU s/epoch", "floor s", "vs floor", "GFLOP/CPU s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
