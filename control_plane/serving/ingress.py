"""The ingress: one Ray Serve deployment that owns each client's stream, over HTTP and gRPC.

It is assembled from one mixin per front end over the shared `FleetGateway`: the OpenAI routes
(`openai_api.py`), the admin routes (`admin_api.py`), the ops dashboard (`dashboard_api.py`) and vLLM's gRPC
service (`grpc_servicer.py`). The
FastAPI app translates the errors raised anywhere below into OpenAI error bodies, once, here.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from rayfleet.control_plane.serving import admin_api, dashboard_api, openai_api
from rayfleet.control_plane.serving.admin_api import AdminRoutes
from rayfleet.control_plane.serving.dashboard_api import DashboardRoutes
from rayfleet.control_plane.serving.errors import OpenAIHTTPError, error_response_json
from rayfleet.control_plane.serving.grpc_servicer import GrpcServicer
from rayfleet.control_plane.serving.openai_api import OpenAIRoutes
from rayfleet.control_plane.serving.rendering import RenderError

logger = logging.getLogger("rayfleet.ingress")

app = FastAPI(title="rayfleet", description="OpenAI-compatible endpoint of a rayfleet LLM fleet")
app.include_router(openai_api.router)
app.include_router(admin_api.router)
app.include_router(dashboard_api.router)


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


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(app)
class OpenAIIngress(OpenAIRoutes, AdminRoutes, DashboardRoutes, GrpcServicer):
    """The fleet's endpoint; constructed from the fleet spec as a dict (`FleetSpec.model_dump()`)."""
