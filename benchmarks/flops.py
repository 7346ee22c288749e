"""Floating-point work of a model and the bf16 matrix-multiply rate of this machine: the speed floor."""

from __future__ import annotations

import time

import torch
import torch.nn as nn


def forward_flops(model: nn.Module, side: int = 28) -> int:
    """Multiply-add FLOPs (2 per MAC) of convolutions and linear layers for one image."""
    total = 0
    hooks = []

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += 2 * out[0].numel() * k

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 1, side, side))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return total


def host_matmul_rate(seconds: float = 1.0, n: int = 1024) -> tuple[str, float, float]:
    """The host CPU's matmul rate in the precision it trains at (bf16 where it has AVX-512 BF16 or AMX,
    else fp32), measured briefly: (precision, FLOP/s wall-clock, FLOP per CPU second). bf16 on a CPU
    without it is emulated at a small fraction of fp32's rate: timing it took minutes there. The rule is
    training's own (device.cpu_has_bf16), so a CPU held to AVX2 by ONEDNN_MAX_CPU_ISA times fp32."""
    from fashionlab.device import cpu_has_bf16
    bf16 = cpu_has_bf16()
    wall, cpu = matmul_rate(torch.bfloat16 if bf16 else torch.float32, n, seconds)
    return ("bf16" if bf16 else "fp32"), wall, cpu


def matmul_rate(dtype=torch.bfloat16, n: int = 2048, seconds: float = 3.0) -> tuple[float, float]:
    """Sustained FLOP/s of a square matmul loop (the best this machine does on dense work), per
    wall-clock second and per CPU second of this process (the latter barely moves with others' load)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    k, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        a @ b
        k += 1
    work = 2 * n ** 3 * k
    return work / (time.perf_counter() - t0), work / (time.process_time() - c0)
