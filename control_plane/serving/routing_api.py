"""The routing routes: `POST /v1/feedback` (a verdict on an answered request teaches the router) and
`GET /v1/fleet/routing` (recent decisions with each candidate's predicted quality, length and latency).

Both talk to a learning router (`policies.base.LearningRouter`, e.g. `chimera`); with another router feedback
is refused with a 400 and the decision list is empty. Each ingress replica learns from the requests it routed.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rayfleet.control_plane.serving.admin_api import admin_principal
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.gateway import FleetGateway
from rayfleet.control_plane.serving.openai_api import authenticate
from rayfleet.control_plane.serving.request_limits import read_json_body

router = APIRouter()


class RoutingRoutes(FleetGateway):
    """Mixin of the Serve ingress: feedback and routing explanations."""

    @router.post("/v1/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        """{"request_id": the response's id, "score": number in [0, 1]}; 404 when the request is unknown."""
        authenticate(self, request)
        body = await read_json_body(request, self.spec.ingress.limits)
        request_id, score = body.get("request_id"), body.get("score")
        if not isinstance(request_id, str) or not request_id:
            raise OpenAIHTTPError(400, "'request_id' must be a non-empty string (the response's id)",
                                  "invalid_request_error", "request_id")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score) \
                or not 0 <= score <= 1:
            raise OpenAIHTTPError(400, "'score' must be a number in [0, 1]", "invalid_request_error", "score")
        if self.learning_router is None:
            raise OpenAIHTTPError(400, f"router '{self.spec.policies.router.name}' does not learn from feedback",
                                  "invalid_request_error", "request_id")
        if not self.learning_router.feedback(request_id, float(score)):
            raise OpenAIHTTPError(404, f"request '{request_id}' was not routed by this router (or is too old)",
                                  "not_found_error", "request_id")
        return JSONResponse({"request_id": request_id, "score": score, "learned": True})

    @router.get("/v1/fleet/routing")
    async def fleet_routing(self, request: Request, limit: int = 20) -> JSONResponse:
        admin_principal(self, request)  # decisions name every tenant's requests
        return JSONResponse(self.routing_decisions(limit))
