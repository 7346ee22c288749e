"""Running the app under uvicorn: one process, or a supervisor and worker processes; the connections'
rules (TCP_NODELAY, one write per response, a deadline for request heads); a clean SIGTERM.

Nothing here imports torch or the app at module level: with several workers, this module is all the
supervisor process loads (61 MiB at its peak; loading the model there as well held 295 MiB for the
life of the server). The model is checked in a short-lived child before any worker starts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import asdict

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors import Multiprocess

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: h11 serves
    HttpToolsProtocol = None

from ..errors import UserError
from .metrics import MULTIPROC_ENV
from .settings import Settings

log = logging.getLogger("fashionlab.serve")
SETTINGS_ENV = "FASHIONLAB_SERVE_SETTINGS"  # the supervisor's settings, for its workers (app.app_from_env)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C (what `fashionlab serve` calls). On SIGTERM the server stops
    accepting connections, answers the requests it holds (their passes included) for up to
    shutdown_timeout seconds, and the process exits with status 0."""
    configure_logging()
    _exit_cleanly_on_signals()
    log.info("loading %s with %s from %s", settings.model_name, settings.backend, settings.model_path)
    options = dict(host=settings.host, port=settings.port, access_log=False, log_level="info",
                   http=connection_protocol(), timeout_keep_alive=settings.keep_alive_timeout,
                   timeout_graceful_shutdown=settings.shutdown_timeout)
    if settings.workers == 1:
        from .app import create_app, prepared
        config = uvicorn.Config(prepared(create_app(settings)), **options)
        config.fashionlab_read_timeout = settings.read_timeout  # type: ignore[attr-defined]  # for Connection
        server = uvicorn.Server(config)
        server.run()
        if not server.started:
            raise SystemExit(1)  # uvicorn has logged why (the port is taken, ...)
        return
    check_model(settings)
    os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
    with _metrics_folder():
        config = uvicorn.Config("fashionlab.serve.app:app_from_env", factory=True, workers=settings.workers,
                                **options)
        config.fashionlab_read_timeout = settings.read_timeout  # type: ignore[attr-defined]
        Workers(config, sockets=[config.bind_socket()]).run()


def check_model(settings: Settings) -> None:
    """Build the app once in a spawned child process, which then exits: a bad model folder (or a model
    that fails its start-up check) raises here, with its own message, before any worker starts, and the
    supervisor never holds torch or the model."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        try:
            child.submit(_build_app, settings).result()
        except concurrent.futures.process.BrokenProcessPool:
            raise UserError(f"{settings.model_path}: loading the model killed the process that checks it "
                            "(out of memory?)") from None


def _build_app(settings: Settings) -> None:
    from .app import create_app
    create_app(settings).state.service.close()


class Workers(Multiprocess):
    """uvicorn's worker supervisor, which on SIGTERM also closes its own copy of the listening socket
    before the workers finish their requests: otherwise the kernel would still complete connections
    nobody will ever accept."""

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()


@contextlib.contextmanager
def _metrics_folder():
    """A fresh folder for prometheus_client's multiprocess mode, for the workers' lifetime (unless
    PROMETHEUS_MULTIPROC_DIR names one already)."""
    if os.environ.get(MULTIPROC_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="fashionlab-metrics-")
    os.environ[MULTIPROC_ENV] = folder
    try:
        yield
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(folder, ignore_errors=True)


def _exit_cleanly_on_signals() -> None:
    """uvicorn shuts down gracefully on SIGTERM and SIGINT, then raises the signal again with the handler it
    found: with these, that ends the process with status 0 (SIGTERM) or 130 (Ctrl-C), without a traceback.
    A signal during start-up ends it the same way."""
    def leave(signum, frame):
        raise SystemExit(0 if signum == signal.SIGTERM else 128 + signum)
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)


# --------------------------------------------------------------------------- connections

class ConnectionRules:
    """What fashionlab adds to uvicorn's HTTP protocol, for every connection:

    - TCP_NODELAY. asyncio sets it only on sockets whose protocol number is IPPROTO_TCP, and the listening
      socket uvicorn 0.54 binds for several workers has protocol 0 (0.55 names TCP), so every connection
      inherited Nagle's algorithm: a response written in two pieces waited for the client's delayed ACK,
      about 40 ms, on each request after the first of a kept-alive connection (`--workers 2`: 48 ms per
      request).
    - One write per response: uvicorn writes a response's head and its body separately; with TCP_NODELAY
      that is two packets, two wake-ups of the client and twice the loopback's work. The writes of one
      turn of the event loop are joined into one (CoalescedWrites).
    - A deadline for request heads: a new connection must send a whole request head within read_timeout
      seconds, and so must a kept-alive one from the first byte of its next request (uvicorn itself waits
      for a half-sent head, or for a first byte, forever). Between requests, uvicorn's keep-alive timeout
      closes idle connections. Stalled bodies are the request guard's (408).
    """

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(CoalescedWrites(transport, self.loop))  # type: ignore[misc,attr-defined]
        self._head_timer = None
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self._between_requests():  # the first bytes of a new request head
            self._await_head()
        super().data_received(data)  # type: ignore[misc]

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._stop_waiting()  # idle until the next request's first byte: uvicorn's keep-alive timeout

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)  # type: ignore[misc]

    def _between_requests(self) -> bool:
        cycle = self.cycle  # type: ignore[attr-defined]
        return cycle is None or cycle.response_complete

    def _await_head(self) -> None:
        timeout = getattr(self.config, "fashionlab_read_timeout", None)  # type: ignore[attr-defined]
        if timeout and not self.transport.is_closing():  # type: ignore[attr-defined]
            self._head_cycle = self.cycle  # type: ignore[attr-defined]
            self._head_timer = self.loop.call_later(timeout, self._head_overdue)  # type: ignore[attr-defined]

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        no_request_began = self.cycle is self._head_cycle and self._between_requests()  # type: ignore[attr-defined]
        if no_request_began and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]


class CoalescedWrites:
    """A transport whose writes within one turn of the event loop go out as one write, at the end of the
    turn (or before a close). Everything else is the wrapped transport's."""

    def __init__(self, transport, loop):
        self._transport, self._loop, self._pending = transport, loop, []

    def write(self, data) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, lines) -> None:
        for data in lines:
            self.write(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name):
        return getattr(self._transport, name)


class H11Connection(ConnectionRules, H11Protocol):
    """uvicorn's pure-Python HTTP/1.1 protocol with ConnectionRules."""


if HttpToolsProtocol is not None:
    class HttpToolsConnection(ConnectionRules, HttpToolsProtocol):
        """uvicorn's httptools (C parser) HTTP/1.1 protocol with ConnectionRules."""


def connection_protocol() -> type:
    """The HTTP protocol class uvicorn would pick ("auto": httptools where installed), with ConnectionRules.
    Module-level classes: worker processes receive the configuration pickled, by reference."""
    return HttpToolsConnection if HttpToolsProtocol is not None else H11Connection
