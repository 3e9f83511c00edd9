"""The ASGI application: the forwarder, and the lifespan that owns the upstream pool."""

from __future__ import annotations

import contextlib
import gc
import logging
import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import certifi
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from . import observe
from .access import AccessTokens, load_access_tokens
from .admin import NOT_FOUND, AdminRoutes, error_response
from .credentials import Credential
from .forward import Forwarder
from .gate import Gate
from .policy import RequestRules
from .protocol import LIMITS_STATE_KEY, ClientLimits
from .settings import Settings
from .transport import UpstreamTransport
from .types import Receive, Scope, Send

__all__ = ["NexusProxy", "build_transport"]

logger = logging.getLogger("nexus_proxy")

# Requests under this prefix are the proxy's own and are never forwarded.
ADMIN_PREFIX = "/_proxy/"


def egress_proxy(settings: Settings) -> str | None:
    """Return the outbound proxy URL for the upstream, or None to connect directly."""
    if settings.egress_proxy is not None:
        return settings.egress_proxy or None
    upstream = httpx.URL(settings.upstream)
    if urllib.request.proxy_bypass(upstream.host):
        return None
    return urllib.request.getproxies_environment().get(upstream.scheme)


def build_transport(settings: Settings) -> UpstreamTransport:
    """Build the upstream connection pool: HTTP/1.1, TLS verified, nothing repeated once sent."""
    cafile = str(settings.ca_bundle) if settings.ca_bundle is not None else certifi.where()
    return UpstreamTransport(
        ssl_context=ssl.create_default_context(cafile=cafile),
        max_connections=settings.max_connections,
        timeout=timeout(settings),
        proxy=egress_proxy(settings),
    )


def timeout(settings: Settings) -> httpx.Timeout:
    """Return the upstream timeouts from the settings."""
    return httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.write_timeout,
        pool=settings.pool_timeout,
    )


class NexusProxy:
    """Sends `/_proxy/` requests to the admin routes and everything else upstream."""

    def __init__(
        self, settings: Settings, credential: Credential, tokens: AccessTokens | None = None
    ) -> None:
        self.settings = settings
        self.credential = credential
        self.transport = build_transport(settings)
        rules = RequestRules(
            read_only=settings.read_only,
            allow_methods=settings.allow_methods,
            allow_paths=settings.allow_paths,
            deny_paths=settings.deny_paths,
        )
        if tokens is None:
            tokens = load_access_tokens(settings)
        gate = Gate(tokens, rules, settings.max_body_size)
        self.forwarder = Forwarder(
            settings.upstream,
            credential,
            self.transport,
            gate,
            iso8601=settings.iso8601,
            default_headers=settings.default_headers,
            timeout=timeout(settings),
            access_log=settings.access_log,
            body_timeout=settings.client_body_timeout,
        )
        self.client_limits = ClientLimits(
            max_header_size=settings.max_header_size,
            header_timeout=settings.client_header_timeout,
        )
        self.admin = Starlette(
            routes=AdminRoutes(settings, credential, gate).routes(),
            exception_handlers={404: _not_found, 405: _not_found},
            lifespan=self._lifespan,
        )
        # A slash redirect would build its Location from the client's Host header.
        self.admin.router.redirect_slashes = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(ADMIN_PREFIX):
            await self.forwarder(scope, receive, send)
        else:
            await self.admin(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with self.transport, observe.flushing():
            await self.credential.start()
            # Everything alive now lives as long as the process. Frozen, it is left
            # out of every later garbage collection, which then takes microseconds
            # instead of pausing requests for milliseconds.
            gc.collect()
            gc.freeze()
            try:
                # uvicorn hands this state to every connection's protocol.
                yield {LIMITS_STATE_KEY: self.client_limits}
            finally:
                await self.credential.aclose()
        logger.info("upstream connection pool closed")


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(NOT_FOUND)
