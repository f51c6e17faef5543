"""The ingress: one Ray Serve deployment that owns each client's stream, over HTTP and gRPC.

It is assembled from one mixin per front end over the shared `FleetGateway`: the OpenAI routes
(`openai_api.py`), the admin routes (`admin_api.py`), the ops dashboard (`dashboard_api.py`) and vLLM's gRPC
service (`grpc_servicer.py`). The
FastAPI app translates the errors raised anywhere below into OpenAI error bodies, once, here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema
from ray import serve
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from rayfleet.control_plane.serving import admin_api, dashboard_api, openai_api, routing_api
from rayfleet.control_plane.serving.admin_api import AdminRoutes
from rayfleet.control_plane.serving.dashboard_api import DashboardRoutes
from rayfleet.control_plane.serving.errors import OpenAIHTTPError, error_response_json
from rayfleet.control_plane.serving.grpc_servicer import GrpcServicer
from rayfleet.control_plane.serving.openai_api import OpenAIRoutes
from rayfleet.control_plane.serving.rendering import RenderError
from rayfleet.control_plane.serving.routing_api import RoutingRoutes

logger = logging.getLogger("rayfleet.ingress")

app = FastAPI(title="rayfleet", description="OpenAI-compatible endpoint of a rayfleet LLM fleet")
app.include_router(openai_api.router)
app.include_router(admin_api.router)
app.include_router(routing_api.router)
app.include_router(dashboard_api.router)


def _openapi() -> dict:
    """FastAPI's schema plus the bodies the OpenAI routes parse themselves (vLLM's request models, whose own
    validation answers): clients, and the fuzz tests, see what each route accepts."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        bodies = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
        refs, defs = models_json_schema([(model, "validation") for model in bodies.values()],
                                        ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        for path, model in bodies.items():
            schema["paths"][path]["post"]["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}}
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


@app.exception_handler(OpenAIHTTPError)
async def _openai_error(_: Request, error: OpenAIHTTPError) -> JSONResponse:
    return error.response()


@app.exception_handler(RenderError)
async def _render_error(_: Request, error: RenderError) -> JSONResponse:
    return error_response_json(error.response)


@app.exception_handler(Exception)
async def _internal_error(_: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error in the ingress")
    return OpenAIHTTPError(500, f"internal error ({type(error).__name__}); see the ingress log").response()


# Serve runs a replica's code on a second event loop by default, so every streamed SSE chunk crosses threads
# (`call_soon_threadsafe`, a wake-up write per message). The ingress never blocks its loop (rendering and
# derendering are vLLM's async calls), so it runs on Serve's own loop, as Serve's throughput mode does.
INGRESS_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


@serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ENV}},
                  max_ongoing_requests=2048)
@serve.ingress(app)
class OpenAIIngress(OpenAIRoutes, AdminRoutes, RoutingRoutes, DashboardRoutes, GrpcServicer):
    """The fleet's endpoint; constructed from the fleet spec as a dict (`FleetSpec.model_dump()`)."""
