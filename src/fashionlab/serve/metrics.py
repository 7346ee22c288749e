"""GET /metrics: the service's Prometheus metrics, in the text exposition format (prometheus_client).

    fashionlab_requests_total{route, method, status}      requests answered (route: the path template)
    fashionlab_request_duration_seconds{route}            latency histogram, from request to last byte
    fashionlab_requests_in_flight                         requests being answered now
    fashionlab_batch_images                               histogram of images per forward pass
    fashionlab_batch_duration_seconds                     histogram of forward-pass durations
    fashionlab_queue_images                               images waiting for the model now
    fashionlab_model_info{name, version, backend, platform, threads, max_batch}    1 per served model

With several worker processes (`--workers N`), prometheus_client's multiprocess mode is on: `run`
points PROMETHEUS_MULTIPROC_DIR at a fresh folder before the workers start, every worker writes its
values there, and whichever worker answers a scrape sums them (the gauges over live workers only).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PASS_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
UNMATCHED = "unmatched"  # the route label of requests no route answered (404s), so unknown paths add no series


def multiprocess() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """One app's metrics in a registry of their own (several apps may live in one process, as in tests)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fashionlab_requests", "HTTP requests answered, by route template, method and "
                                "status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("fashionlab_request_duration_seconds", "Time from a request's arrival to its "
                                 "last byte sent, by route template", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("fashionlab_requests_in_flight", "Requests being answered now", registry=r,
                               multiprocess_mode="livesum")
        self.batch_images = Histogram("fashionlab_batch_images", "Images per forward pass", buckets=BATCH_BUCKETS,
                                      registry=r)
        self.batch_seconds = Histogram("fashionlab_batch_duration_seconds", "Duration of one forward pass",
                                       buckets=PASS_BUCKETS, registry=r)
        self.queue = Gauge("fashionlab_queue_images", "Images waiting for the model now", registry=r,
                           multiprocess_mode="livesum")
        self.model = Gauge("fashionlab_model_info", "The served model (value 1); version: the first 12 hex "
                           "digits of the served file's SHA-256", ["name", "version", "backend", "platform", "threads",
                                                                   "max_batch"],
                           registry=r, multiprocess_mode="livemax")
        self._answered: dict[tuple[str, str, int], tuple[Any, Any]] = {}  # labelled children, looked up once

    def served(self, name: str, version: str, backend: str, platform: str, threads: int, max_batch: int) -> None:
        self.model.labels(name, version, backend, platform, str(threads), str(max_batch)).set(1)

    def answered(self, route: str, method: str, status: int, seconds: float) -> None:
        """One request answered."""
        key = (route, method, status)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (self.requests.labels(route, method, str(status)),
                                              self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    # the Batcher's observer
    def queued(self, images: int) -> None:
        self.queue.set(images)

    def ran(self, images: int, seconds: float) -> None:
        self.batch_images.observe(images)
        self.batch_seconds.observe(seconds)

    def exposition(self) -> bytes:
        """The text format: this process's metrics, or every worker's in multiprocess mode."""
        from prometheus_client import CollectorRegistry, generate_latest
        if not multiprocess():
            return generate_latest(self.registry)
        from prometheus_client import multiprocess as mp
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        return generate_latest(registry)

    def worker_exited(self) -> None:
        """At shutdown: this worker's live gauges leave the sums (multiprocess mode)."""
        if multiprocess():
            from prometheus_client import multiprocess as mp
            mp.mark_process_dead(os.getpid())


def router(metrics: Metrics) -> APIRouter:
    from prometheus_client import CONTENT_TYPE_LATEST

    async def prometheus_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    r = APIRouter()
    r.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
    return r
