"""Serving the app with uvicorn, configured so that it keeps the forwarding contract."""

from __future__ import annotations

import logging
import signal

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import NexusProxy
from .credentials import Credential
from .settings import Settings

__all__ = ["OriginFormHttpTools", "serve", "uvicorn_config"]

logger = logging.getLogger("nexus_proxy")


class OriginFormHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol, but it lets the app see non-origin-form targets.

    uvicorn parses an absolute-form target (`GET http://host/x`) down to its path,
    so the app could not refuse it. A target that does not start with "/" is
    parsed as "/" and handed over in `raw_path`, where the forwarder refuses it.
    """

    def on_headers_complete(self) -> None:
        target = self.url
        if not target.startswith(b"/"):
            self.url = b"/"
        super().on_headers_complete()
        if not target.startswith(b"/"):
            self.scope["raw_path"] = target


def uvicorn_config(app: NexusProxy, settings: Settings) -> uvicorn.Config:
    """The uvicorn settings the proxy relies on."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=OriginFormHttpTools,
        lifespan="on",
        # Our own access log comes later; uvicorn's prints query strings.
        access_log=False,
        # The upstream's Server and Date headers are forwarded; uvicorn's would repeat them.
        server_header=False,
        date_header=False,
        # Never trust X-Forwarded-* from anyone: the client address stays the socket's.
        proxy_headers=False,
        forwarded_allow_ips="",
        log_config=None,
        log_level=settings.log_level,
    )


def serve(settings: Settings, credential: Credential) -> bool:
    """Listen and forward until SIGTERM or SIGINT, then shut down gracefully.

    Returns False when the server could not start.
    """
    config = uvicorn_config(NexusProxy(settings, credential), settings)
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    host, port = sock.getsockname()[:2]
    logger.info(
        "nexus-proxy listening on http://%s:%d, forwarding to %s (environment %s), "
        "%s fingerprint %s",
        _bracketed(host),
        port,
        settings.upstream,
        settings.environment,
        credential.kind,
        credential.fingerprint,
    )

    # uvicorn re-raises the signal that stopped it once it has shut down cleanly;
    # with these handlers that re-raise is a no-op and the process exits 0.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return server.started


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
