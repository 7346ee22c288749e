"""Data load times: cold (decompress + SHA-256 verify the Debian .gz files) and warm (verified
decompressed cache), against the way notebooks read the files (gzip module, no verification).
It always reads /usr/share/datasets/fashion-mnist, whatever $FASHIONLAB_DATA says.

    python benchmarks/data_load.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, spread, table  # noqa: E402

from fashionlab import data  # noqa: E402


def notebook_style(folder: Path) -> None:
    for f in data.FASHION_MNIST.files.values():
        with gzip.open(folder / (f.name + ".gz"), "rb") as fh:
            np.frombuffer(fh.read(), np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    system = Path(data.FASHION_MNIST.system_dirs[0])
    if not system.is_dir():
        sys.exit(f"{system} is missing: apt-get install dataset-fashion-mnist")
    os.environ["FASHIONLAB_CACHE"] = tempfile.mkdtemp(prefix="fashionlab-bench-")
    # What is timed is Debian's .gz copy and the cache made from it: a $FASHIONLAB_DATA folder, which
    # comes first in the search, would be measured instead (and may hold decompressed files).
    os.environ.pop("FASHIONLAB_DATA", None)
    cold, warm, base = [], [], []
    for _ in range(args.repeats):
        data.clear_cache()
        t = time.perf_counter()
        ds = data.load(offline=True)
        cold.append(time.perf_counter() - t)
        assert ds.source == str(system)
        t = time.perf_counter()
        ds = data.load(offline=True)
        warm.append(time.perf_counter() - t)
        assert ds.source == str(data.cache_dir(data.FASHION_MNIST))
        t = time.perf_counter()
        notebook_style(system)
        base.append(time.perf_counter() - t)
    print(f"machine: {machine()}; {args.repeats} repeats, seconds as median (min..max); 70,000 images")
    print(table(["load", "what it does", "seconds"], [
        ["baseline: gzip module", "decompress with gzip.open, no verification", spread(base)],
        ["fashionlab cold", "zlib decompress + SHA-256 verify + parse + write cache", spread(cold)],
        ["fashionlab warm", "read decompressed cache + SHA-256 verify + parse", spread(warm)],
    ]))


if __name__ == "__main__":
    main()
