"""The /v1 JSON API: classify images, explain one, describe the served model.

Routes are plain functions; `router(service, settings)` registers them. The route functions
have no docstrings and no return annotations on purpose: FastAPI would turn them into the
OpenAPI description and a response model.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..images import brief
from .decoding import ClientError, parse_top_k, read_batch
from .routing import RequestRoute, bind
from .service import ModelService
from .settings import Settings

# The query parameter the prediction routes read (query_top_k), for the OpenAPI schema.
TOP_K_PARAMETER = {"name": "top_k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1},
                   "description": "how many classes to return per image, best first"}
INTEGER = re.compile(r"[+-]?[0-9]+")  # what query_top_k passes on to parse_top_k

# read_batch's bodies, for the OpenAPI schema (the routes read the raw request themselves)
PREDICT_BODY: dict[str, Any] = {
    "parameters": [TOP_K_PARAMETER],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"type": "object", "properties": {
                "image": {"type": "string", "description": "base64 PNG/JPEG/.npy bytes"},
                "images": {"type": "array", "items": {"type": "string"}},
                "array": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "top_k": {"type": "integer"}}}},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                "file": {"type": "string", "format": "binary"}}}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


# What /v1/predict and /invocations answer, for the OpenAPI schema: one object per image.
OOD_SCORE = {"type": ["number", "null"], "minimum": 0,
             "description": "out-of-distribution score: distance of the image's features to the nearest class "
                            "mean (null when the model has no out-of-distribution detector)"}
UNSURE = {"type": ["boolean", "null"],
          "description": "true when ood_score is above the model's calibrated threshold: probably not a garment"}
RANKED_CLASSES = {"type": "array", "description": "top_k classes, best first", "items": {
    "type": "object", "properties": {"label": {"type": "string"}, "index": {"type": "integer"},
                                     "score": {"type": "number", "description": "probability"}}}}
PREDICT_RESPONSE: dict[str, Any] = {200: {"description": "one object per image, in the order sent", "content": {
    "application/json": {"schema": {"type": "array", "items": {
        "type": "object", "required": ["classes", "ood_score", "unsure"],
        "properties": {"classes": RANKED_CLASSES, "ood_score": OOD_SCORE, "unsure": UNSURE}}}}}}}
EXPLAIN_RESPONSE: dict[str, Any] = {200: {"description": "what the web page shows", "content": {
    "application/json": {"schema": {"type": "object", "properties": {
        "input": {"type": "array", "description": "the preprocessed 28x28 image the model sees"},
        "probabilities": {**RANKED_CLASSES, "description": "every class's probability, in class order"},
        "prediction": RANKED_CLASSES["items"], "ood_score": OOD_SCORE,
        "unsure": UNSURE, "saliency": {"type": ["array", "null"]}}}}}}}


async def ranked(service: ModelService, settings: Settings, request: Request) -> JSONResponse:
    """The body's images, each with its top_k classes sorted by score and its out-of-distribution score
    and flag (/v1/predict, /invocations: RequestRoutes, so the answer is encoded here, by json.dumps)."""
    batch, body_k = await read_batch(request, service)
    k = parse_top_k(query_top_k(request), body_k, settings, len(service.class_names))
    return JSONResponse(await service.work(service.predict, batch, k))


def query_top_k(request: Request) -> str | None:
    """The query's top_k as sent (parse_top_k checks its value), or None; 422 when it is not an integer,
    as for any query parameter of the wrong type."""
    if not request.scope.get("query_string"):  # the usual request: no query to parse
        return None
    raw = request.query_params.get("top_k")
    if raw is not None and not INTEGER.fullmatch(raw):
        raise ClientError(422, f"invalid request: query.top_k: expected an integer; got {brief(raw)}")
    return raw



async def v1_predict(service: ModelService, settings: Settings, request: Request):
    return await ranked(service, settings, request)


async def v1_explain(service: ModelService, settings: Settings, request: Request):
    batch, _ = await read_batch(request, service)
    if len(batch) != 1:
        raise ClientError(400, f"/v1/explain takes exactly one image; got {len(batch)}")
    return await service.work(service.explain, batch[0])


async def v1_model(service: ModelService, settings: Settings):
    return {"name": settings.model_name, "backend": settings.backend, "platform": service.platform,
            "class_names": service.class_names, "max_body_bytes": settings.max_body_bytes,
            "max_pixels": settings.max_pixels, "max_request_pixels": settings.max_request_pixels,
            "max_decoded_bytes": settings.max_decoded_bytes, "saliency": service.saliency_model is not None,
            "ood": service.predictor.ood_status(), "calibration": service.predictor.calibration_status()}


def router(service: ModelService, settings: Settings) -> APIRouter:
    r = APIRouter()
    r.add_api_route("/v1/predict", bind(v1_predict, service, settings), methods=["POST"], openapi_extra=PREDICT_BODY,
                    responses=PREDICT_RESPONSE, route_class_override=RequestRoute,
                    summary="Classify one or more images; per image, its classes sorted by score, its "
                            "out-of-distribution score and whether it is unsure (probably not a garment)")
    r.add_api_route("/v1/explain", bind(v1_explain, service, settings), methods=["POST"], openapi_extra=PREDICT_BODY,
                    responses=EXPLAIN_RESPONSE,
                    summary="One image: preprocessed 28x28 input, probabilities of every class, saliency map, "
                            "out-of-distribution score and unsure flag")
    r.add_api_route("/v1/model", bind(v1_model, service, settings), methods=["GET"],
                    summary="The served model: classes, backend, input contract, out-of-distribution threshold")
    return r
