"""Service throughput and latency under wrk, and in-process batch throughput of PyTorch against ONNX Runtime.

One run prints, on this machine (its description first):

1. `fashionlab serve RUN` as a real process on 127.0.0.1, loaded by wrk (a compiled load generator: one
   thread, so it takes one core's share at most, not a Python client's), every request a 28x28 PNG test
   image to POST /v1/predict (benchmarks/serve_post.lua): requests/s, p50, p99, errors and the server's
   peak RSS, for batching off (--max-batch 1) and on, PyTorch and ONNX Runtime, at 1/8/32/64 connections;
   GET /ping at the most connections, the HTTP stack's own ceiling.
2. --workers 2 against one worker, side by side, in rounds: one worker with batching off, then batching
   on: one worker with its inference thread, two workers with passes on their event loops (the default
   where workers have no core to spare), and two workers with inference threads; then each batching-on
   server's req/s as a multiple of the unbatched one's.
3. Batch throughput, images/s, of the same model in this process at batch 1, 64 and 1000, on the same test
   images: PyTorch in the NCHW layout fp32 training uses (the baseline), predict.Predictor (NHWC on a CPU),
   the same traced as the service runs it (Predictor.trace), and export.OnnxPredictor.

Each server is a fresh process, warmed up before it is measured; every cell runs --duration seconds. The
load generator shares the machine with the server: on a small machine it takes CPU the server could use,
so the figures are a floor, comparable within one run. Run it on a quiet machine:

    sudo apt-get install wrk      # or: bash scripts/setup --all
    PYTHONPATH=src python benchmarks/serve_latency.py RUN --duration 10
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common import machine, table  # noqa: E402
from fashionlab import data, export  # noqa: E402
from fashionlab.predict import Predictor  # noqa: E402

LUA = ROOT / "benchmarks" / "serve_post.lua"


# --------------------------------------------------------------------------- a server process

WORKER_STARTED = "Application startup complete."  # uvicorn's line, once per worker that accepts connections


class ServerProcess:
    """`fashionlab serve RUN ARGS` on a free port of 127.0.0.1, until the `with` block ends."""

    def __init__(self, run: str, args: list[str]):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.command = [sys.executable, "-m", "fashionlab", "serve", run, "--port", str(self.port), "--samples", "0",
                        "--device", "cpu", *args]
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1

    def __enter__(self) -> "ServerProcess":
        """Returns once every worker serves. The first worker up answers /ping while the others still load
        their model, and the connections opened then stay with it: a measurement started at the first
        /ping ran 8 connections on one of two workers, one time in six, at 1,168 against some 1,700
        req/s."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.output()}")
            if self.output().count(WORKER_STARTED) >= self.workers and self._pings():
                return self
            time.sleep(0.2)
        raise SystemExit("server did not start within 300 s")

    def _pings(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def peak_rss_mib(self) -> float:
        """The peak resident memory (VmHWM) of the server and its worker processes, summed."""
        pids = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            pids += [int(p) for p in children.read_text().split()]
        total = 0
        for pid in pids:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            match = re.search(r"VmHWM:\s+(\d+) kB", status)
            total += int(match.group(1)) if match else 0
        return total / 1024


# --------------------------------------------------------------------------- wrk

def wrk(url: str, connections: int, seconds: float, body: Path | None) -> dict:
    """One wrk run: requests/s, p50 and p99 in ms, errors (socket errors, timeouts and non-2xx answers)."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(LUA), url]
    if body is not None:
        cmd += ["--", str(body), "image/png"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("SUMMARY "))
    r = json.loads(line[len("SUMMARY "):])
    errors = r["connect_errors"] + r["read_errors"] + r["write_errors"] + r["timeouts"] + r["non_2xx"]
    return {"req_per_s": r["requests"] / (r["duration_us"] / 1e6), "p50_ms": r["p50_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "errors": errors, "requests": r["requests"]}


def measure(run: str, args: list[str], connections: list[int], seconds: float, body: Path, ping: bool) -> list[dict]:
    """One fresh server: wrk's figures for each connection count, then GET /ping at the most (with the
    server's peak RSS in each)."""
    results = []
    with ServerProcess(run, args) as server:
        wrk(server.url + "/v1/predict", 8, min(3.0, seconds), body)  # warm-up: connections, first passes
        cells = [("POST /v1/predict", c, server.url + "/v1/predict", body) for c in connections]
        if ping:
            cells.append(("GET /ping", max(connections), server.url + "/ping", None))
        for route, c, url, payload in cells:
            r = wrk(url, c, seconds, payload)
            results.append({**r, "route": route, "connections": c})
            print(f"  {' '.join(args)} {route} c={c}: {r['req_per_s']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                  f"p99 {r['p99_ms']:.2f} ms, {r['errors']} errors", flush=True)
        rss = server.peak_rss_mib()
    return [{**r, "rss_mib": rss} for r in results]


def rows_of(label: dict, rounds: list[list[dict]]) -> list[list]:
    """Table rows for one configuration measured in one or more rounds: the median of each figure, the
    errors summed, the largest peak RSS, and with several rounds the range of req/s."""
    rows = []
    for cell in zip(*rounds):
        rate = [r["req_per_s"] for r in cell]
        median = lambda key: float(np.median([r[key] for r in cell]))  # noqa: E731
        spread = [f"{min(rate):,.0f}-{max(rate):,.0f}"] if len(cell) > 1 else []
        rows.append([*label.values(), cell[0]["route"], cell[0]["connections"], f"{float(np.median(rate)):,.0f}",
                     *spread, f"{median('p50_ms'):.2f}", f"{median('p99_ms'):.2f}", sum(r["errors"] for r in cell),
                     f"{max(r['rss_mib'] for r in cell):,.0f}"])
    return rows


def batching_rows(run: str, backends: list[str], waits: list[str], connections: list[int], seconds: float,
                  body: Path) -> list[list]:
    """Table 1: one worker (its passes on its inference thread), batching off, then on with each wait."""
    rows = []
    for backend in backends:
        one = ["--backend", backend, "--passes-on", "thread"]
        label = {"backend": backend, "batching": "off", "workers": 1, "passes": "thread"}
        rows += rows_of(label, [measure(run, [*one, "--max-batch", "1"], connections, seconds, body, False)])
        for wait in waits:
            label = {**label, "batching": f"on, wait {wait} ms"}
            rows += rows_of(label, [measure(run, [*one, "--max-wait-ms", wait], connections, seconds, body, True)])
    return rows


def worker_rows(run: str, backends: list[str], connections: list[int], seconds: float, body: Path,
                rounds: int) -> list[list]:
    """Table 2: one worker with batching off (--max-batch 1), then batching on: one worker with its
    inference thread, two workers with passes on their event loops, two with threads; every round
    measures each configuration once, in turn, so that the machine's drift reaches them alike."""
    servers = (("off", 1, "thread"), ("on", 1, "thread"), ("on", 2, "loop"), ("on", 2, "thread"))
    configs = [{"backend": b, "batching": batching, "workers": w, "passes": p}
               for b in backends for batching, w, p in servers]
    measured: list[list[list[dict]]] = [[] for _ in configs]
    for _ in range(rounds):
        for config, results in zip(configs, measured):
            server = ["--backend", config["backend"], "--workers", str(config["workers"]), "--passes-on",
                      config["passes"], *(["--max-batch", "1"] if config["batching"] == "off" else [])]
            results.append(measure(run, server, connections, seconds, body, True))
    return [row for config, results in zip(configs, measured) for row in rows_of(config, results)]


def against_unbatched(rows: list[list]) -> list[list]:
    """Table 2's batching-on rows as multiples of the unbatched server's median req/s (same backend, same
    connection count, same rounds)."""
    req_s = lambda row: float(str(row[6]).replace(",", ""))  # noqa: E731
    unbatched = {(row[0], row[4], row[5]): req_s(row) for row in rows if row[1] == "off"}
    return [[row[0], row[2], row[3], row[5], f"{req_s(row) / unbatched[row[0], row[4], row[5]]:.2f}"]
            for row in rows if row[1] == "on" and row[4].startswith("POST")]


# --------------------------------------------------------------------------- in-process batch throughput

def batch_throughput(predict_fns: dict, x: np.ndarray, batch: int, repeats: int) -> dict[str, float]:
    """Median images/s over `repeats` passes over x in batches of `batch`, per predictor. The predictors
    take turns pass by pass, so a change in machine load hits them alike."""
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


def predictors(run: Path, threads: int | None = None) -> dict:
    """The run's model four ways: PyTorch in the NCHW layout training uses in fp32 (the baseline), as
    Predictor runs it (NHWC on a CPU), as the service runs it (traced), and ONNX Runtime."""
    from fashionlab.device import Runtime
    from fashionlab.serve.service import probe_images
    loaded = Predictor.from_run(run, device="cpu", precision="fp32")
    nchw = Predictor(loaded.model.to(memory_format=torch.contiguous_format), loaded.info,
                     Runtime(loaded.runtime.device, "fp32", channels_last=False), loaded.ood)
    traced = Predictor.from_run(run, device="cpu", precision="fp32")
    print(f"traced: {traced.trace(probe_images())}")
    return {"nchw": nchw, "torch": Predictor.from_run(run, device="cpu", precision="fp32"), "traced": traced,
            "onnx": export.OnnxPredictor.from_run(run, threads=threads)}


# --------------------------------------------------------------------------- the run

def describe_machine() -> str:
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    try:
        import uvloop  # noqa: F401
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    try:
        import httptools  # noqa: F401
        http = "httptools"
    except ImportError:
        http = "h11"
    import onnxruntime
    return (f"{machine()}; onnxruntime {onnxruntime.__version__}; server event loop {loop}, HTTP parser {http}; "
            f"load generator {wrk_version.split(' [')[0]}, 1 thread")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder (exported to ONNX first if it has no model.onnx)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured cell (default 10)")
    ap.add_argument("--connections", default="1,8,32,64")
    ap.add_argument("--backends", default="torch,onnx")
    ap.add_argument("--max-wait-ms", default="0", help="--max-wait-ms values for the batching-on servers")
    ap.add_argument("--tables", default="1,2,3", help="which tables to measure (default 1,2,3)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of table 2 (default 1; 3 or more for medians "
                                                          "and ranges)")
    ap.add_argument("--batches", default="1,64,1000", help="batch sizes for the in-process throughput")
    ap.add_argument("--images", type=int, default=5000, help="test images per throughput pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="threads for the in-process throughput (default: PyTorch's, the "
                                                "cores; 1 is what each of two workers on 2 cores has)")
    args = ap.parse_args(argv)
    if subprocess.run(["which", "wrk"], capture_output=True).returncode:
        raise SystemExit("wrk is not installed: sudo apt-get install wrk (or bash scripts/setup --all)")

    ds = data.load(data.FASHION_MNIST, offline=True)
    run = Path(args.run)
    if not (run / export.ONNX_FILE).is_file():
        r = export.export_onnx(run, ds.test_images[:1000])
        print(f"exported {r['path']} (parity: max |dp| {r['max_abs_prob_diff']:.1e}, "
              f"{r['top1_mismatches']} top-1 differ)")
    print("reproduce: PYTHONPATH=src python benchmarks/serve_latency.py " + shlex.join(sys.argv[1:] or [str(run)]))
    print(f"machine: {describe_machine()}\nmodel: {run}\n", flush=True)

    body = Path(tempfile.mkdtemp(prefix="fashionlab-bench-")) / "image.png"
    buf = io.BytesIO()
    Image.fromarray(ds.test_images[0]).save(buf, format="PNG")
    body.write_bytes(buf.getvalue())
    connections = [int(c) for c in args.connections.split(",")]
    tables = {int(t) for t in args.tables.split(",")}
    backends = args.backends.split(",")
    headers = ["backend", "batching", "workers", "passes on", "request", "connections", "req/s", "p50 ms", "p99 ms",
               "errors", "server peak RSS MiB"]

    if 1 in tables:
        print(f"1. batching off (--max-batch 1) and on: one worker, {body.stat().st_size}-byte 28x28 PNG per "
              f"request, {args.duration:g} s per cell")
        rows = batching_rows(str(run), backends, args.max_wait_ms.split(","), connections, args.duration, body)
        print(table(headers, rows, title=f"load average {os.getloadavg()[0]:.2f} after this table"), flush=True)

    if 2 in tables:
        medians = "; figures are medians over the rounds" if args.rounds > 1 else ""
        print(f"\n2. --workers 2 against one worker, and batching off, {args.rounds} round(s): each round "
              f"measures every configuration in turn{medians}")
        rows = worker_rows(str(run), backends, connections, args.duration, body, args.rounds)
        heads = headers if args.rounds == 1 else [*headers[:7], "req/s range", *headers[7:]]
        print(table(heads, rows, title=f"load average {os.getloadavg()[0]:.2f} after this table"), flush=True)
        print("\nbatching on against the unbatched server (one worker, --max-batch 1), same rounds:")
        print(table(["backend", "workers", "passes on", "connections", "req/s / unbatched req/s"],
                    against_unbatched(rows)), flush=True)

    if 3 in tables:
        print_throughput(run, ds.test_images[: args.images], map(int, args.batches.split(",")), args.repeats,
                         args.threads)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    return 0


def print_throughput(run: Path, x: np.ndarray, batches, repeats: int, threads: int | None) -> None:
    """Table 3: in-process images/s of the four predictors at each batch size."""
    if threads:
        torch.set_num_threads(threads)
    models = predictors(run, threads)
    print(f"\n3. batch throughput in this process, images/s, {len(x)} test images per pass (500 at batch 1), "
          f"median of {repeats} alternating passes, {torch.get_num_threads()} threads")
    rows = []
    for batch in batches:
        n = x if batch >= 64 else x[:500]  # batch 1 is slow: fewer images keep the run short
        r = batch_throughput({name: (lambda b, m=m: m.probabilities(b, batch)) for name, m in models.items()},
                             n, batch, repeats)
        rows.append([batch, *(f"{r[name]:,.0f}" for name in models), f"{r['onnx'] / r['torch']:.2f}"])
    print(table(["batch", "PyTorch NCHW img/s", "PyTorch img/s", "PyTorch traced img/s", "ONNX Runtime img/s",
                 "ONNX / PyTorch"], rows))


if __name__ == "__main__":
    raise SystemExit(main())
