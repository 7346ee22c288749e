"""The FastAPI app: the contracts' routers over one ModelService, the shared error handlers and the
request guard (body size limit and read timeout, metrics, one log line per request); prepared (the
interpreter set up to serve it) and app_from_env, the workers' factory. server.py runs it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
import time

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, images
from ..errors import UserError
from . import json_api, metrics as metrics_module, openinference, sagemaker, web
from .decoding import ClientError, image_error_status
from .metrics import UNMATCHED, Metrics
from .service import ModelService, ModelUnavailable
from .server import SETTINGS_ENV, configure_logging
from .settings import Settings

log = logging.getLogger("fashionlab.serve")


def create_app(settings: Settings | None = None, service: ModelService | None = None) -> FastAPI:
    """The FastAPI app. Loads the model now (once), unless a loaded service is handed in."""
    settings = settings or Settings.from_env()
    service = service or ModelService(settings)
    metrics = Metrics()
    metrics.served(settings.model_name, service.version, settings.backend, service.platform, service.threads,
                   settings.max_batch)
    service.batcher.observer = metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn calls this after the in-flight requests have been answered (or shutdown_timeout passed)
        await anyio.to_thread.run_sync(service.close, settings.shutdown_timeout)
        metrics.worker_exited()

    app = FastAPI(title="fashionlab", version=__version__, lifespan=lifespan,
                  description="Fashion-MNIST garment classifier: JSON API, SageMaker and Open Inference contracts.")
    app.state.settings, app.state.service, app.state.metrics = settings, service, metrics
    for exc_class, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    # in this order, the OpenAPI schema lists the paths as it always has
    app.include_router(json_api.router(service, settings))
    app.include_router(web.router(service))
    app.include_router(sagemaker.router(service, settings))
    app.include_router(openinference.router(service, settings))
    app.include_router(metrics_module.router(metrics))
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes, read_timeout=settings.read_timeout,
                       metrics=metrics)
    return app


# --------------------------------------------------------------------------- errors: {"error": message}

def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def client_error(request: Request, e: ClientError) -> JSONResponse:
    return error(e.status, e.message)


async def user_error(request: Request, e: UserError) -> JSONResponse:
    return error(400, str(e))  # bad input found by library code (a malformed inference request, ...)


async def image_error(request: Request, e: images.ImageError) -> JSONResponse:
    return error(image_error_status(e), str(e))


async def model_unavailable(request: Request, e: ModelUnavailable) -> JSONResponse:
    log.error("model unavailable on %s %s: %s", request.method, request.url.path, e)
    return error(503, str(e))


async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
    return error(422, f"invalid request: {problems}")


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error(e.status_code, str(e.detail))


async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error(500, f"internal error ({type(e).__name__}); the request was not processed")


ERROR_HANDLERS = ((ClientError, client_error), (UserError, user_error), (images.ImageError, image_error),
                  (ModelUnavailable, model_unavailable), (RequestValidationError, validation_error),
                  (StarletteHTTPException, http_error), (Exception, unexpected_error))


# --------------------------------------------------------------------------- the request guard

class RequestGuard:
    """Pure ASGI middleware: refuses bodies over the limit (413) and bodies that stall (408), counts and
    times every request (metrics) and logs one line per request."""

    def __init__(self, app, max_body_bytes: int, read_timeout: float, metrics: Metrics):
        self.app, self.limit, self.read_timeout, self.metrics = app, max_body_bytes, read_timeout, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, exchange = time.perf_counter(), _Exchange(receive, send, self.limit, self.read_timeout)
        self.metrics.in_flight.inc()
        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                await send_json_error(exchange.send, 413, f"request body of {int(declared):,} bytes is over the "
                                                          f"limit of {self.limit:,} bytes")
                return
            await self.app(scope, exchange.receive, exchange.send)
        except Exception:
            exchange.status = exchange.status or 500
            raise
        finally:
            seconds = time.perf_counter() - start
            self.metrics.in_flight.dec()
            self.metrics.answered(route_label(scope), scope.get("method", ""), exchange.status, seconds)
            log.info("%s %s %d %.1fms", scope.get("method"), scope.get("path"), exchange.status, seconds * 1000)


def route_label(scope) -> str:
    """The metrics' route label of an answered request: the path template of the route that answered
    (/v2/models/{name}/infer); for a mounted app, which Starlette routes without a route object (the
    page's files under /static), the mount's path and {path}; `unmatched` when nothing answered."""
    route = scope.get("route")
    if route is not None:
        return route.path
    if scope.get("endpoint") is not None and scope.get("root_path"):  # set by the Mount that matched
        return f"{scope['root_path']}/{{path}}"
    return UNMATCHED


class _Exchange:
    """One request's receive and send, counting the body's bytes in and noting the status out."""

    def __init__(self, receive, send, limit: int, read_timeout: float):
        self._receive, self._send, self.limit, self.read_timeout = receive, send, limit, read_timeout
        self.received, self.status, self.body_done = 0, 0, False

    async def receive(self):
        if self.body_done:  # waiting for a disconnect, not for the client's data: no deadline
            return await self._receive()
        try:
            message = await _within(self.read_timeout, self._receive())
        except asyncio.TimeoutError:
            raise ClientError(408, f"request body stalled: nothing received for {self.read_timeout:g} s "
                                   "(--read-timeout)") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:  # chunked bodies have no Content-Length to check up front
                raise ClientError(413, f"request body is over the limit of {self.limit:,} bytes")
            self.body_done = not message.get("more_body", False)
        return message

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            if self.status == 408:  # the rest of a stalled body must not be read as the next request
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await self._send(message)


async def _within(seconds: float, awaitable):
    """awaitable's result, or asyncio.TimeoutError after `seconds`. A timer, not a task, where Python has
    asyncio.timeout (3.11): this runs for every request body."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


async def send_json_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- running it

def prepared(app: FastAPI) -> FastAPI:
    """app, with this process's interpreter set up to serve it:

    - Every object that exists now (the loaded model, the framework's routes and schemas: some 200,000)
      is moved out of the garbage collector's sight. Python's full collection walks every tracked object;
      with these it took about 85 ms, a stall that every request in flight waited out, a few times a
      second under load (wrk at 32 connections, ONNX Runtime: p99 127 -> 45 ms). The start-up
      objects live as long as the process: there is nothing to collect among them.
    - The interpreter hands the GIL over after 0.2 ms instead of 5 ms when another thread asks for it:
      the inference thread asks each time one of its calls into the model returns, and the event loop,
      busy with other requests, held it the full 5 ms each time.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    return app


GIL_SWITCH_SECONDS = 0.0002


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: each worker reads the settings the parent wrote."""
    configure_logging()  # workers are fresh processes: they do not inherit the parent's logging set-up
    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings(**json.loads(raw)).checked() if raw else Settings.from_env()
    return prepared(create_app(settings))
