"""`fashionlab sweep`: N local workers (this process, or child worker processes) and the progress line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from .. import tracking
from .progress import ProgressLine, Tally
from .spec import Spec
from .storage import full_disk_is_one_line, open_storage, open_study
from .worker import Worker
from ..errors import ArgumentError


def run_sweep(spec: Spec, storage_url: str | None = None, workers: int = 1, heartbeat_interval: int = 10,
              grace_period: int = 30, max_retry: int = 2, threads: int | None = None, worker_only: bool = False,
              quiet: bool = False, stream=None, track=None) -> Tally:
    """`fashionlab sweep`: run N local workers against the storage and show progress; returns the final tally.
    `track` names experiment trackers (tracking.parse_track): every trial's run is logged, grouped by sweep.
    A storage whose disk is full ends the sweep with one line (atomic.OutputError)."""
    stream = stream or sys.stderr
    spec.folder.mkdir(parents=True, exist_ok=True)
    url = storage_url or spec.default_storage()
    if workers < 1:
        raise ArgumentError(f"--workers {workers}: expected an integer >= 1")
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise ArgumentError(f"--grace-period {grace_period} must exceed --heartbeat-interval {heartbeat_interval} (>= 1 s)")
    with full_disk_is_one_line(url):
        return _run(spec, url, workers, heartbeat_interval, grace_period, max_retry, threads, worker_only, quiet,
                    stream, track)


def _run(spec: Spec, url: str, workers: int, heartbeat_interval: int, grace_period: int, max_retry: int,
         threads: int | None, worker_only: bool, quiet: bool, stream, track) -> Tally:
    storage = open_storage(url, heartbeat_interval, grace_period, max_retry)
    tracks = tracking.open_tracking(track, tracking.Group.sweep(spec.name, spec.folder))  # before any worker starts
    if threads:
        import torch
        torch.set_num_threads(threads)
    if worker_only:
        return Worker(spec, storage, tracking=tracks).run()
    open_study(spec, storage)  # create and enqueue before the workers start
    progress = ProgressLine(spec, storage, stream=stream)
    if not quiet:
        stream.write(f"sweep {spec.name}: {spec.n_points} points x {len(spec.seeds)} seeds = {spec.total_trials} "
                     f"trainings, {workers} worker(s), storage {tracking.redact(url)}\n")
    if workers == 1:
        worker = Worker(spec, storage, tracking=tracks)
        if quiet:
            worker.run()
        else:
            with progress:
                worker.run()
    else:
        _run_child_workers(spec, url, workers, heartbeat_interval, grace_period, max_retry, threads, progress, quiet,
                           tracks.specs)
    return progress.show(final=True) if not quiet else progress.current()


def _run_child_workers(spec, url, workers, heartbeat_interval, grace_period, max_retry, threads, progress, quiet,
                       track: list[str]):
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    cmd = [sys.executable, "-m", "fashionlab", "sweep", str(spec.path), "--storage", url, "--out", str(spec.folder),
           "--heartbeat-interval", str(heartbeat_interval), "--grace-period", str(grace_period),
           "--max-retry", str(max_retry), "--threads", str(threads), "--worker-only",
           *(arg for spec_text in track for arg in ("--track", spec_text))]
    children = [subprocess.Popen(cmd, preexec_fn=_die_with_parent) for _ in range(workers)]

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)
    old = signal.signal(signal.SIGTERM, forward)
    try:
        if quiet:
            for c in children:
                c.wait()
        else:
            with progress:
                for c in children:
                    c.wait()
    except KeyboardInterrupt:  # the children got the same SIGINT from the terminal: let them checkpoint
        for c in children:
            c.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _die_with_parent() -> None:
    # Linux: a worker whose parent `fashionlab sweep` dies gets SIGTERM (it checkpoints and re-queues).
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


