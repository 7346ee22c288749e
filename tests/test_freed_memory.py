"""Training keeps the memory a step frees for the next step (device.keep_freed_memory): the second
step's activations are written without a page fault on every 4 KiB. Each case is a fresh process,
since the setting is process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# A 40 MiB activation written and freed twice; prints whether the setting took and the second's faults.
PROBE = """
import resource, torch
from fashionlab import device
kept = device.keep_freed_memory()
def faults_of_one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(40 << 20, dtype=torch.uint8)
    x.fill_(1)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_step()
print(kept, faults_of_one_step())
"""
PAGES = (40 << 20) // 4096
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def probe(**env) -> tuple[bool, int]:
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept, faults = proc.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="malloc's thresholds are glibc's")
def test_a_freed_activation_is_reused_without_page_faults():
    kept, faults = probe()
    assert kept and faults < PAGES // 10


@pytest.mark.skipif(not GLIBC, reason="malloc's thresholds are glibc's")
def test_the_setting_can_be_turned_off():
    kept, faults = probe(FASHIONLAB_KEEP_FREED_MEMORY="0")
    assert not kept and faults > PAGES // 2  # glibc as it comes: a fresh mmap, every page faulted again
