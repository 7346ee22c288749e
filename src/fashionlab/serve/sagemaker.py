"""The SageMaker inference contract: GET /ping, POST /invocations (the bodies /v1/predict takes),
GET /execution-parameters for batch transform."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .json_api import PREDICT_BODY, PREDICT_RESPONSE, ranked
from .routing import RequestRoute, bind
from .service import ModelService
from .settings import Settings


async def ping(service: ModelService, settings: Settings):
    await service.require_ready()
    return {"status": "ok", "model": settings.model_name}


async def invocations(service: ModelService, settings: Settings, request: Request):
    return await ranked(service, settings, request)


async def execution_parameters(settings: Settings):
    return {"MaxConcurrentTransforms": settings.workers, "BatchStrategy": "SINGLE_RECORD",
            "MaxPayloadInMB": max(1, settings.max_body_bytes // (1024 * 1024))}


def router(service: ModelService, settings: Settings) -> APIRouter:
    r = APIRouter()
    r.add_api_route("/ping", bind(ping, service, settings), methods=["GET"],
                    summary="SageMaker health check: 200 while the model's predictions work, else 503")
    r.add_api_route("/invocations", bind(invocations, service, settings), methods=["POST"],
                    openapi_extra=PREDICT_BODY, responses=PREDICT_RESPONSE, route_class_override=RequestRoute,
                    summary="SageMaker inference: same bodies and answers as /v1/predict")
    r.add_api_route("/execution-parameters", bind(execution_parameters, settings), methods=["GET"],
                    summary="SageMaker batch transform: how to split and send requests")
    return r
