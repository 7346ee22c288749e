"""The FastAPI app: the contracts' routers over one ModelService, the shared error handlers and the
request guard (body size limit, one log line per request); app_from_env and run for uvicorn."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__, images
from ..errors import UserError
from . import json_api, openinference, sagemaker, web
from .decoding import ClientError, image_error_status
from .service import ModelService, ModelUnavailable
from .settings import Settings

log = logging.getLogger("fashionlab.serve")


def create_app(settings: Settings | None = None, service: ModelService | None = None) -> FastAPI:
    """The FastAPI app. Loads the model now (once), unless a loaded service is handed in."""
    settings = settings or Settings.from_env()
    service = service or ModelService(settings)
    app = FastAPI(title="fashionlab", version=__version__,
                  description="Fashion-MNIST garment classifier: JSON API, SageMaker and Open Inference contracts.")
    app.state.settings, app.state.service = settings, service
    for exc_class, handler in ERROR_HANDLERS:
        app.add_exception_handler(exc_class, handler)
    # in this order, the OpenAPI schema lists the paths as it always has
    app.include_router(json_api.router(service, settings))
    app.include_router(web.router(service))
    app.include_router(sagemaker.router(service, settings))
    app.include_router(openinference.router(service, settings))
    app.add_middleware(RequestGuard, max_body_bytes=settings.max_body_bytes)
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
    """Pure ASGI middleware: refuses bodies over the limit (413) and logs one line per request."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, exchange = time.perf_counter(), _Exchange(receive, send, self.limit)
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
            log.info("%s %s %d %.1fms", scope.get("method"), scope.get("path"), exchange.status,
                     (time.perf_counter() - start) * 1000)


class _Exchange:
    """One request's receive and send, counting the body's bytes in and noting the status out."""

    def __init__(self, receive, send, limit: int):
        self._receive, self._send, self.limit = receive, send, limit
        self.received, self.status = 0, 0

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:  # chunked bodies have no Content-Length to check up front
                raise ClientError(413, f"request body is over the limit of {self.limit:,} bytes")
        return message

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self._send(message)


async def send_json_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- running it

def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def app_from_env() -> FastAPI:
    """uvicorn factory for multi-worker serving: each worker reads the settings the parent wrote."""
    _configure_logging()  # workers are fresh processes: they do not inherit the parent's logging set-up
    raw = os.environ.get("FASHIONLAB_SERVE_SETTINGS")
    settings = Settings(**json.loads(raw)).checked() if raw else Settings.from_env()
    return create_app(settings)


def run(settings: Settings) -> None:
    """Serve until interrupted (what `fashionlab serve` calls)."""
    import uvicorn
    _configure_logging()
    log.info("loading %s with %s from %s", settings.model_name, settings.backend, settings.model_path)
    common = dict(host=settings.host, port=settings.port, access_log=False, log_level="info",
                  timeout_graceful_shutdown=5)
    if settings.workers > 1:
        create_app(settings)  # fail fast in the parent on a bad model folder, with a clear message
        os.environ["FASHIONLAB_SERVE_SETTINGS"] = json.dumps(asdict(settings))
        uvicorn.run("fashionlab.serve:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        uvicorn.run(create_app(settings), **common)
