"""Training keeps the memory a step frees for the next step (device.keep_freed_memory): a block of
an activation's size comes from malloc's heap, and freeing it leaves it with the process, so the
next step writes it without a page fault on every 4 KiB (benchmarks/malloc_reuse.py measures the
faults and the time of whole runs). Each case is a fresh process, since the setting is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from fashionlab.device import glibc_malloc

# A 40 MiB activation, written and freed: prints whether the setting took, whether the block lay in
# malloc's heap (not a mapping of its own) and how much resident memory its freeing gave back.
PROBE = """
import torch
from fashionlab import device
kept = device.keep_freed_memory()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
x = torch.empty(40 << 20, dtype=torch.uint8)
x.fill_(1)
heap = next(line for line in open("/proc/self/maps") if "[heap]" in line).split()[0]
low, high = (int(bound, 16) for bound in heap.split("-"))
in_heap = low <= x.data_ptr() < high
before = resident()
del x
print(kept, in_heap, before - resident())
"""
BLOCK = 40 << 20


def probe(**env) -> tuple[bool, bool, int]:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, in_heap, released = proc.stdout.split()
    return kept == "True", in_heap == "True", int(released)


@pytest.mark.skipif(not glibc_malloc(), reason="malloc's thresholds are glibc's")
def test_a_freed_activation_stays_with_the_process():
    kept, in_heap, released = probe()
    assert kept and in_heap and released < BLOCK // 10


@pytest.mark.skipif(not glibc_malloc(), reason="malloc's thresholds are glibc's")
def test_the_setting_can_be_turned_off():
    kept, in_heap, released = probe(FASHIONLAB_KEEP_FREED_MEMORY="0")
    assert not kept and not in_heap and released > BLOCK * 9 // 10  # glibc as it comes: its own mapping, unmapped
