"""The ops dashboard: a small web page served by the ingress at `/dashboard`, fed live over server-sent events.

- `GET /dashboard` and its two assets: the page (`dashboards/web/`, packaged as `rayfleet.dashboards`), plain
  HTML, CSS and JavaScript with no build step and no third-party code.
- `GET /dashboard/api/events`: a server-sent event stream, one `state` event per `STATE_PERIOD_S`: the
  controller's status (pools, replicas, load, requests, migrations), the KV store's shards, the audit log,
  this ingress's recent routing decisions and whatever else the fleet reports (RL jobs when there are any).
  `GET /dashboard/api/state` is the same snapshot once.
- `POST /dashboard/api/scale|drain|migrate`: the page's controls, confirmed on the page and recorded by the
  controller in its audit log with origin `dashboard`.

The page is public (it holds no data); every `/dashboard/api/*` route passes `authorize_dashboard`, the one
place that decides who may see and steer the fleet.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib.resources import files
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rayfleet.control_plane.serving.admin_api import CONTROLS, admin_principal, run_control
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.gateway import FleetGateway

router = APIRouter()
ORIGIN = "dashboard"
STATE_PERIOD_S = 1.0
MIGRATIONS_SHOWN = 100
AUDIT_SHOWN = 50
ROUTING_SHOWN = 50
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}


def authorize_dashboard(gateway: FleetGateway, request: Request) -> None:
    """Who may read the fleet's state and use the controls: an admin key (the state names every tenant's
    requests; none needed when the fleet states `auth: none`)."""
    admin_principal(gateway, request)


def _page_file(name: str) -> bytes:
    return (files("rayfleet.dashboards") / "web" / name).read_bytes()


class DashboardRoutes(FleetGateway):
    """Mixin of the Serve ingress: the ops dashboard."""

    @router.get("/dashboard")
    async def dashboard_page(self) -> Response:
        return Response(_page_file("index.html"), media_type="text/html")

    @router.get("/dashboard/{asset}")
    async def dashboard_asset(self, asset: str) -> Response:
        if asset not in ASSETS:
            raise OpenAIHTTPError(404, f"no dashboard asset '{asset}'")
        return Response(_page_file(asset), media_type=ASSETS[asset], headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/api/state")
    async def dashboard_state(self, request: Request) -> JSONResponse:
        authorize_dashboard(self, request)
        return JSONResponse(json.loads(_encode(await self.fleet_state())))

    @router.get("/dashboard/api/events")
    async def dashboard_events(self, request: Request) -> StreamingResponse:
        authorize_dashboard(self, request)
        return StreamingResponse(self._state_events(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.post("/dashboard/api/{action}")
    async def dashboard_control(self, action: str, request: Request) -> JSONResponse:
        """scale, drain or migrate, with the bodies of `/v1/fleet/*`."""
        authorize_dashboard(self, request)
        if action not in CONTROLS:
            raise OpenAIHTTPError(404, f"no dashboard action '{action}'; actions: {', '.join(CONTROLS)}")
        return await run_control(self, action, request, ORIGIN)

    async def fleet_state(self) -> dict[str, Any]:
        """Everything the page shows, in one snapshot."""
        status, kv_store, audit = await asyncio.gather(
            self.controller.status.remote(migrations=MIGRATIONS_SHOWN), self.controller.kv_store_stats.remote(),
            self.controller.audit_log.remote(AUDIT_SHOWN))
        return {
            "at": time.time(),
            **status,
            "kv_store": kv_store,
            "audit": audit,
            "routing": list(self.telemetry.routing_log)[-ROUTING_SHOWN:],
            "ingress": {"in_flight": len(self.ledgers), "router": self.spec.policies.router.name,
                        "migration_policy": self.spec.policies.migration.name},
        }

    async def _state_events(self, request: Request) -> AsyncIterator[str]:
        while not await request.is_disconnected():
            yield f"event: state\ndata: {_encode(await self.fleet_state())}\n\n"
            await asyncio.sleep(STATE_PERIOD_S)


def _encode(state: dict[str, Any]) -> str:
    """JSON for the page; values the router explains with (dataclasses, enums) become strings if they must."""
    return json.dumps(state, default=str, separators=(",", ":"))
