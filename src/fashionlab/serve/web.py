"""The web page: GET / (static/index.html), its static files and the test images it offers."""

from __future__ import annotations

import io
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .decoding import ClientError
from .routing import bind
from .service import ModelService

STATIC_DIR = Path(__file__).parent.with_name("static")


async def page():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


async def v1_samples(service: ModelService):
    imgs, labels = await run_in_threadpool(service.samples)
    return {"samples": [{"id": i, "label": service.class_names[int(y)], "url": f"/v1/samples/{i}.png"}
                        for i, y in enumerate(labels)], "note": service.samples_note}


async def v1_sample(service: ModelService, sample_id: int):
    imgs, _ = await run_in_threadpool(service.samples)
    if not 0 <= sample_id < len(imgs):
        raise ClientError(404, f"sample {sample_id}: no such sample; ids run from 0 to {len(imgs) - 1}")
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(imgs[sample_id], mode="L").save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


def router(service: ModelService) -> APIRouter:
    r = APIRouter()
    r.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    r.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    r.add_api_route("/v1/samples", bind(v1_samples, service), methods=["GET"],
                    summary="Test images the web page offers")
    r.add_api_route("/v1/samples/{sample_id}.png", bind(v1_sample, service), methods=["GET"],
                    summary="One sample test image as PNG")
    return r
