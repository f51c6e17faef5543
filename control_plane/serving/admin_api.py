"""The admin routes: fleet status, scale a pool, drain a replica, live-migrate a request (what `rayfleet
status|scale|drain|migrate` do over Ray, over HTTP). Each forwards to the FleetController by name; its
`FleetError`s become 400s, and the controller records each action in its audit log.

Every control needs an admin key (`auth.require_admin`, through `admin_principal` here); a user key gets 403.
`/v1/fleet/status` answers both: an admin sees the whole fleet, a user the pools' readiness and only its own
requests in flight at this ingress.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rayfleet.control_plane.controller_api import FleetError
from rayfleet.control_plane.serving.auth import Principal, require_admin
from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.serving.gateway import FleetGateway
from rayfleet.control_plane.serving.openai_api import authenticate
from rayfleet.control_plane.serving.request_limits import read_json_body

router = APIRouter()
ORIGIN = "admin-api"


def admin_principal(gateway: FleetGateway, request: Request) -> Principal:
    """The caller of an admin route: 401 without a valid key, 403 with a user key. Routes of other front ends
    that control the fleet (the dashboard's) call this too."""
    return require_admin(authenticate(gateway, request))


class AdminRoutes(FleetGateway):
    """Mixin of the Serve ingress: `/v1/fleet/*`."""

    @router.get("/v1/fleet/status")
    async def fleet_status(self, request: Request) -> JSONResponse:
        principal = authenticate(self, request)
        if principal.admin:
            status = await self.controller.status.remote()
            status["routing"] = self.routing_decisions(10)
            return JSONResponse(status)
        snapshot, _ = await self.fleet_view()
        mine = [{"request_id": rid, "output_tokens": ledger.output_tokens, "migrations": ledger.migrations,
                 "replays": ledger.replays}
                for rid, ledger in list(self.ledgers.items()) if ledger.owner == principal.name]
        return JSONResponse({
            "fleet": self.spec.name,
            "pools": {name: {"ready": len(pool.routable_replicas), "desired": pool.desired_replicas}
                      for name, pool in snapshot.pools.items()},
            "requests": mine,
        })

    @router.post("/v1/fleet/scale")
    async def fleet_scale(self, request: Request) -> JSONResponse:
        """{"pool": name, "replicas": n}; same as `rayfleet scale`."""
        return await run_control(self, "scale", request, ORIGIN)

    @router.post("/v1/fleet/drain")
    async def fleet_drain(self, request: Request) -> JSONResponse:
        """{"replica_id": id}; same as `rayfleet drain`: its requests move out (or finish), then it stops."""
        return await run_control(self, "drain", request, ORIGIN)

    @router.post("/v1/fleet/migrate")
    async def fleet_migrate(self, request: Request) -> JSONResponse:
        """{"request_id", "src", "dst", "mode"?}; same as `rayfleet migrate`. Returns the record."""
        return await run_control(self, "migrate", request, ORIGIN)


# The controller's control methods and the typed body fields each takes, in order.
CONTROLS = {
    "scale": (("pool", str), ("replicas", int)),
    "drain": (("replica_id", str),),
    "migrate": (("request_id", str), ("src", str), ("dst", str), ("mode", str)),
}


async def run_control(gateway: FleetGateway, action: str, request: Request, origin: str) -> JSONResponse:
    """One control action from a JSON body, for an admin key only, on behalf of `origin` (the audit log's
    "who")."""
    admin_principal(gateway, request)
    body = await read_json_body(request, gateway.spec.ingress.limits)
    if action == "migrate":
        body.setdefault("mode", "precopy")
    return JSONResponse(await control(getattr(gateway.controller, action), body, origin, *CONTROLS[action]))


async def control(method, body: dict[str, Any], origin: str, *fields: tuple[str, type]):
    """Call a controller method with the body's typed fields, naming who asks (`origin`, for the audit log);
    a field of the wrong type is a 400 naming it."""
    args = []
    for name, kind in fields:
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise OpenAIHTTPError(400, f"'{name}' must be a {kind.__name__}", "invalid_request_error", name)
        args.append(value)
    try:
        return await method.remote(*args, origin=origin)
    except FleetError as error:  # Ray re-raises the controller's error as an instance of its class
        raise OpenAIHTTPError(400, str(getattr(error, "cause", error)), "invalid_request_error") from None
