"""Shared bits for the benchmark scripts: the machine description, a table printer and a synthetic
training step."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys

import torch
import torch.nn.functional as F


def hardware() -> dict:
    """What a benchmark ran on: CPU, cores, threads, versions, accelerator and load."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "bf16_cpu": torch.cpu._is_avx512_bf16_supported(),
            "cpu_kind": cpu_kind(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def cpu_kind() -> str:
    """The CPU's kind as far as training speed goes, in words: the widest instructions torch and oneDNN
    use here (AMX, AVX-512 BF16, AVX-512, AVX2), and any limit set on them by environment variable."""
    from fashionlab.device import cpu_has_bf16
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", ... (ATEN_CPU_CAPABILITY lowers it)
    if torch.cpu._is_amx_tile_supported():
        kind = "AMX"
    elif torch.cpu._is_avx512_bf16_supported():
        kind = "AVX-512 BF16"
    else:
        kind = capability.replace("AVX512", "AVX-512")
    limits = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    if limits:
        kind += f" limited to {capability.replace('AVX512', 'AVX-512')} ({', '.join(limits)})"
    return kind + (", bf16" if cpu_has_bf16() else ", fp32")


def machine() -> str:
    hw = hardware()
    return (f"{hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, {hw['threads']} threads, python {hw['python']}"
            + (f", {hw['cuda']}" if hw["cuda"] else "") + f", load average {hw['load_average'][0]}")


def spread(values: list[float]) -> str:
    """median (min..max) over repeats."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.median(values):.3f} ({min(values):.3f}..{max(values):.3f})"


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    out = [f"\n{title}\n" if title else "", line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in cells])


# Variables that hold the CPU's kernels below its best (oneDNN's, PyTorch's own, MKL's matrix products)
LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def command_line(script: str, argv: list[str] | None) -> str:
    """The command a benchmark ran as, for its JSON: any kernel limit set in the environment, then the
    script and its arguments (argv None: the process's own)."""
    limits = "".join(f"{k}={os.environ[k]} " for k in LIMITS if os.environ.get(k))
    return f"{limits}python benchmarks/{script} " + shlex.join(argv if argv is not None else sys.argv[1:])


def parse_overrides(items: list[str]) -> dict:
    """--set KEY=JSON items -> {KEY: value}: recipe settings a benchmark run overrides."""
    import json

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=JSON, e.g. epochs=8")
        out[key] = json.loads(value)
    return out


def synthetic_step(model, bf16: bool, batch: int, forward=None):
    """One SGD training step on a fixed random batch, as train() runs it (channels_last + bf16 autocast
    when bf16): what the speed benchmarks time in steady state. forward: e.g. torch.compile(model)."""
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    forward = model if forward is None else forward
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step

