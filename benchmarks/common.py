"""Shared bits for the benchmark scripts: the machine description and a table printer."""

from __future__ import annotations

import os
import platform
import statistics

import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"python {platform.python_version()}")


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
