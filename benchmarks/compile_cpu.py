"""Does torch.compile pay for the fast model on this CPU? Steady-state CPU s per step and first-step cost.

    PYTHONPATH=src python benchmarks/compile_cpu.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import synthetic_step  # noqa: E402

from fashionlab import models  # noqa: E402

BATCH = 256


def main() -> int:
    torch.set_num_threads(1)
    for compiled in (False, True):
        torch.manual_seed(0)
        model = models.build_model("fast").to(memory_format=torch.channels_last)
        step = synthetic_step(model, True, BATCH, torch.compile(model) if compiled else None)
        start = time.process_time()
        step()
        first = time.process_time() - start
        step()
        n = 20
        start = time.process_time()
        for _ in range(n):
            step()
        per = (time.process_time() - start) / n
        print(f"compile={compiled}: first step {first:.1f} CPU s, then {per * 1000:.0f} CPU ms/step "
              f"({60000 / BATCH * per:.1f} CPU s per 60k epoch)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
