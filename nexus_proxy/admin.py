"""The proxy's own endpoints under `/_proxy/`: health, readiness and metrics. Never forwarded."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import errors, metrics, observe
from .credentials import Credential
from .gate import Gate
from .settings import Settings

__all__ = ["AdminRoutes"]

_SECONDS_PER_DAY = 86400


class AdminRoutes:
    """Handlers for `/_proxy/health`, `/_proxy/ready` and `/_proxy/metrics`."""

    def __init__(self, settings: Settings, credential: Credential, gate: Gate) -> None:
        self.settings = settings
        self.credential = credential
        self.gate = gate

    def routes(self) -> list[Route]:
        """Return the Starlette routes."""
        return [
            Route("/_proxy/health", self.health, methods=["GET", "HEAD"]),
            Route("/_proxy/ready", self.ready, methods=["GET", "HEAD"]),
            Route("/_proxy/metrics", self.metrics, methods=["GET", "HEAD"]),
        ]

    async def health(self, request: Request) -> Response:
        """Liveness: 200 while the process serves; never needs an access token."""
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 while a credential can be sent upstream, else 503 with the reason."""
        rejection = self.gate.authenticate(request.scope)
        if rejection is not None:
            return error_response(rejection)

        reason = self.credential.unavailable_reason()
        body: dict[str, Any] = {
            "status": "ready" if reason is None else "not ready",
            "environment": self.settings.environment,
            "upstream": self.settings.upstream,
            "credential": self.credential.kind,
            "fingerprint": self.credential.fingerprint,
        }
        days = self.credential.expiry_days()
        if days is not None:
            body["apiKeyExpiresInDays"] = days
        if reason is not None:
            body["reason"] = reason
        return JSONResponse(body, status_code=200 if reason is None else 503)

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics in the text format."""
        rejection = self.gate.authenticate(request.scope)
        if rejection is not None:
            return error_response(rejection)

        days = self.credential.expiry_days()
        if days is not None:
            metrics.API_KEY_EXPIRY.set(days * _SECONDS_PER_DAY)
        observe.flush()
        return Response(metrics.exposition(), media_type=metrics.CONTENT_TYPE_LATEST)


def error_response(error: errors.ProxyError) -> Response:
    """Build a Starlette response that carries a proxy error envelope."""
    headers = {"x-nexus-proxy-error": error.code}
    headers.update({name.decode(): value.decode() for name, value in error.headers})
    return Response(
        error.body(), status_code=error.status, headers=headers, media_type="application/json"
    )


NOT_FOUND = errors.ProxyError(
    404,
    "ProxyNotFound",
    "Paths under /_proxy/ belong to the proxy itself: /_proxy/health, /_proxy/ready "
    "and /_proxy/metrics. Nothing under /_proxy/ is forwarded.",
    upstream_reached=False,
)
