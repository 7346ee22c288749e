"""Service latency and throughput on loopback, and batch throughput of PyTorch against ONNX Runtime.

1. Starts `fashionlab serve RUN` as a real process (PyTorch backend, then ONNX Runtime) on
   127.0.0.1 and sends single-image requests (a 28x28 PNG test image, POST /v1/predict) from 1,
   8 and 32 concurrent clients: latency p50/p99 and requests/s per level.
2. Batch throughput, images/s, of the same model in this process: predict.Predictor (PyTorch,
   fp32 on CPU) against export.OnnxPredictor, on the same test images, in the same run.

The load generator runs on the same machine as the server: on a small machine it competes with
the server for cores, so the figures are a floor, and comparable only within one run.

    PYTHONPATH=src python benchmarks/serve_latency.py RUN [--requests 300]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from fashionlab import data, export  # noqa: E402
from fashionlab.predict import Predictor  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, run: str, backend: str, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "fashionlab", "serve", run, "--port", str(self.port),
                                      "--backend", backend, "--samples", "0", "--device", "cpu",
                                      "--threads", str(threads)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited:\n{self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(self.url + "/ping", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not start within 180 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def load_test(url: str, bodies: list[bytes], clients: int, total: int) -> dict:
    """`clients` concurrent clients send `total` single-image requests between them."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        for body in bodies[:10]:  # warm-up: connections, first-call allocations
            await client.post("/v1/predict", content=body, headers={"content-type": "image/png"})
        counter = iter(range(total))

        async def worker():
            nonlocal errors
            for i in counter:
                start = time.perf_counter()
                r = await client.post("/v1/predict", content=bodies[i % len(bodies)],
                                      headers={"content-type": "image/png"})
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": total, "errors": errors, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": total / wall}


def batch_throughput(predict_fns: dict, x: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
    """Median images/s over `repeats` passes over x in batches of `batch`, per predictor.

    The predictors take turns pass by pass, so a change in machine load hits them alike.
    """
    rates: dict[str, list[float]] = {name: [] for name in predict_fns}
    for fn in predict_fns.values():
        fn(x[:batch])  # warm-up
    for _ in range(repeats):
        for name, fn in predict_fns.items():
            start = time.perf_counter()
            for i in range(0, len(x), batch):
                fn(x[i: i + batch])
            rates[name].append(len(x) / (time.perf_counter() - start))
    return {name: float(np.median(r)) for name, r in rates.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--requests", type=int, default=300, help="single-image requests per concurrency level")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--batches", default="1,64,1000", help="batch sizes for the in-process throughput")
    ap.add_argument("--images", type=int, default=5000, help="test images per throughput pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default="torch,onnx", help="server backends to load-test")
    ap.add_argument("--threads", default="0,1", help="server --threads settings to load-test (0: all cores)")
    args = ap.parse_args(argv)

    ds = data.load(data.FASHION_MNIST, offline=True)
    run = Path(args.run)
    if not (run / export.ONNX_FILE).is_file():
        r = export.export_onnx(run, ds.test_images[:1000])
        print(f"exported {r['path']} (parity: max |dp| {r['max_abs_prob_diff']:.1e}, {r['top1_mismatches']} top-1 differ)")

    print(f"model {run}; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}; one run\n")

    bodies = []
    for img in ds.test_images[:100]:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        bodies.append(buf.getvalue())
    print("single-image requests (28x28 PNG, POST /v1/predict) on loopback, client on the same machine")
    print(f"{'backend':<8} {'threads':>7} {'clients':>7} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'req/s':>8}")
    for backend in args.backends.split(","):
        for threads in map(int, args.threads.split(",")):
            with ServerProcess(str(run), backend, threads) as server:
                for clients in map(int, args.clients.split(",")):
                    r = asyncio.run(load_test(server.url, bodies, clients, args.requests))
                    print(f"{backend:<8} {threads or 'all':>7} {r['clients']:>7} {r['requests']:>8} {r['errors']:>6} "
                          f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['req_per_s']:>8.1f}", flush=True)

    x = ds.test_images[: args.images]
    torch_model = Predictor.from_run(run, device="cpu", precision="fp32")
    default_threads = torch.get_num_threads()
    print(f"\nbatch throughput in this process, {len(x)} test images per pass (500 at batch 1), "
          f"median of {args.repeats} alternating passes")
    print(f"{'threads':>7} {'batch':>6} {'PyTorch img/s':>14} {'ONNX Runtime img/s':>19} {'ONNX / PyTorch':>15}")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads or default_threads)
        onnx_model = export.OnnxPredictor.from_run(run, threads=threads or None)
        for batch in map(int, args.batches.split(",")):
            n = x if batch >= 64 else x[:500]  # batch 1 is slow: fewer images keep the run short
            r = batch_throughput({"torch": lambda b: torch_model.probabilities(b, batch),
                                  "onnx": lambda b: onnx_model.probabilities(b, batch)}, n, batch, args.repeats)
            t, o = r["torch"], r["onnx"]
            print(f"{threads or 'all':>7} {batch:>6} {t:>14.0f} {o:>19.0f} {o / t:>15.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
