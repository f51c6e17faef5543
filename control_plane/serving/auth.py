"""Who is calling: API keys, their tenants and roles, checked the same way for HTTP and gRPC.

Keys are kept only as SHA-256 digests and compared in constant time (`hmac.compare_digest` over every
digest, so the time taken does not depend on which key, or how much of one, matched). A key belongs to a
tenant (`Principal.name`): request ids the client chooses are scoped by it, and a user sees only its own
requests. Admin keys also reach the fleet's control routes (`/v1/fleet/scale|migrate|drain`, fleet-wide
status, and the dashboard's controls): `require_admin` is the one check every such route makes.

`auth: none` is an explicit choice in the spec; the ingress then logs, loudly and at every start, that anyone
who reaches its port may use every route.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from typing import Mapping

from rayfleet.control_plane.serving.errors import OpenAIHTTPError
from rayfleet.control_plane.spec import APIKeySpec, IngressSpec, key_digest

logger = logging.getLogger("rayfleet.auth")


class AuthConfigError(ValueError):
    """The ingress cannot start with this authentication setup (names the field or variable)."""


@dataclass(frozen=True)
class Principal:
    """The caller behind a key."""

    name: str  # the tenant
    admin: bool = False
    may_set_priority: bool = False

    def scoped_id(self, client_request_id: str) -> str:
        """The fleet-wide id of a request id the client chose: two tenants may choose the same one."""
        return f"{self.name}/{client_request_id}"


ANONYMOUS_ADMIN = Principal(name="anonymous", admin=True, may_set_priority=True)  # auth: none


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal


class KeyRing:
    """The ingress' keys (digests only) and the check of an `Authorization: Bearer <key>` value."""

    def __init__(self, keys: list[_Key], enabled: bool = True):
        self._keys = keys
        self.enabled = enabled

    @classmethod
    def from_spec(cls, ingress: IngressSpec, environ: Mapping[str, str] = os.environ) -> KeyRing:
        if ingress.auth == "none":
            logger.warning("AUTHENTICATION IS OFF (ingress.auth: none): anyone who reaches this endpoint may "
                           "generate, see fleet status, scale pools and migrate requests")
            return cls([], enabled=False)
        entries = ingress.key_entries()
        for variable, role in ((ingress.api_keys_env, "user"), (ingress.admin_keys_env, "admin")):
            if variable is None:
                continue
            values = [k.strip() for k in environ.get(variable, "").split(",") if k.strip()]
            if not values:
                raise AuthConfigError(f"ingress.{'api' if role == 'user' else 'admin'}_keys_env: environment "
                                      f"variable {variable} is missing or empty; refusing to start without keys "
                                      "(set ingress.auth: none to serve without authentication)")
            entries += [APIKeySpec(name=f"{variable.lower()}-{i}", sha256=key_digest(v), role=role)
                        for i, v in enumerate(values)]
        if not entries:
            raise AuthConfigError("ingress.auth is 'api_keys' but no key is configured: set ingress.api_keys, "
                                  "ingress.api_keys_env or ingress.admin_keys_env, or ingress.auth: none to serve "
                                  "without authentication")
        keys = [_Key(bytes.fromhex(e.sha256),
                     Principal(e.name, admin=e.role == "admin", may_set_priority=e.allow_priority or e.role == "admin"))
                for e in entries]
        return cls(keys)

    def authenticate(self, authorization: str, how: str) -> Principal:
        """The caller of an `Authorization` header value; 401 naming where to send the key otherwise."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        scheme, _, key = authorization.partition(" ")
        digest = bytes.fromhex(key_digest(key.strip()))
        found = None
        for entry in self._keys:  # every entry is compared: no early exit on a match
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        if scheme.lower() != "bearer" or found is None:
            raise OpenAIHTTPError(401, f"Incorrect API key provided. Send {how}.",
                                  err_type="invalid_request_error", param="authorization")
        return found


def require_admin(principal: Principal) -> Principal:
    """403 unless `principal` holds an admin key: the gate of every fleet control (routes, dashboard)."""
    if not principal.admin:
        raise OpenAIHTTPError(403, "This route needs an admin API key.", err_type="permission_error",
                              param="authorization")
    return principal
