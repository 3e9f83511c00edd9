"""Serving the app with uvicorn, configured so that it keeps the forwarding contract."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket

import uvicorn
from uvicorn.supervisors import Multiprocess

from .access import AccessTokens
from .app import NexusProxy
from .credentials import Credential, build_credential
from .errors import ConfigError
from .logs import configure_logging
from .protocol import OriginFormHttpTools
from .settings import Settings
from .types import ASGIApp

__all__ = ["serve", "uvicorn_config", "worker_app"]

logger = logging.getLogger("nexus_proxy")

_WORKER_ARGV = "NEXUS_PROXY_WORKER_ARGV"


def uvicorn_config(app: ASGIApp | str, settings: Settings) -> uvicorn.Config:
    """Build the uvicorn settings the proxy relies on."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        factory=isinstance(app, str),
        workers=settings.workers,
        http=OriginFormHttpTools,
        # Upgrade requests are forwarded as plain requests, minus the Upgrade header.
        ws="none",
        lifespan="on",
        # One access line per request comes from nexus_proxy.access; uvicorn's
        # would print query strings.
        access_log=False,
        # The upstream's Server and Date headers are forwarded; uvicorn's would repeat them.
        server_header=False,
        date_header=False,
        # Never trust X-Forwarded-* from anyone: the client address stays the socket's.
        proxy_headers=False,
        forwarded_allow_ips="",
        log_config=None,
        log_level=settings.log_level,
        # uvicorn takes whole seconds here.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
    )


def serve(
    settings: Settings, credential: Credential, tokens: AccessTokens, argv: list[str]
) -> bool:
    """Listen and forward until SIGTERM or SIGINT, then shut down gracefully.

    Returns False when the server could not start.
    """
    if settings.workers > 1:
        # Each worker process builds its own app from the same flags and environment.
        os.environ[_WORKER_ARGV] = json.dumps(argv)
        config = uvicorn_config(f"{__name__}:worker_app", settings)
    else:
        config = uvicorn_config(NexusProxy(settings, credential, tokens), settings)

    # SIGHUP re-reads api_key_file, or requests a new OAuth token, without a restart.
    # It is set before the listening line below, so that no SIGHUP after that line
    # meets the default action, which ends the process.
    signal.signal(signal.SIGHUP, lambda *_: credential.reload())
    sock = _bind(settings)
    # Listening now makes the log line below true: connections wait in the
    # backlog until the server (or the first worker) accepts them.
    sock.listen(config.backlog)
    logger.info(
        "nexus-proxy listening on %s, forwarding to %s (%s), %s fingerprint %s%s",
        _address(sock),
        settings.upstream,
        f"environment {settings.environment}"
        + (", overridden by upstream_url" if settings.upstream_url else ""),
        credential.kind,
        credential.fingerprint or "pending (token requested at startup)",
        f", {settings.workers} workers" if settings.workers > 1 else "",
    )

    # uvicorn re-raises the signal that stopped it once it has shut down cleanly.
    # With these handlers that re-raise does nothing, so the process exits 0.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, lambda *_: None)
    server = uvicorn.Server(config)
    try:
        if settings.workers > 1:
            Multiprocess(config, sockets=[sock]).run()
            return True
        server.run(sockets=[sock])
        return server.started
    finally:
        sock.close()
        if settings.unix_socket is not None:
            settings.unix_socket.unlink(missing_ok=True)
        logger.info("nexus-proxy stopped")


def worker_app() -> NexusProxy:
    """Build the app of one worker process from the parent's flags and environment."""
    argv = json.loads(os.environ[_WORKER_ARGV])
    settings = Settings.load(argv)
    configure_logging(settings.log_level, settings.log_format)
    return NexusProxy(settings, build_credential(settings))


def _bind(settings: Settings) -> socket.socket:
    """Bind the listen socket: TCP, or a Unix socket only its owner may connect to."""
    if settings.unix_socket is None:
        config = uvicorn.Config(
            None,  # type: ignore[arg-type]
            host=settings.host,
            port=settings.port,
            log_config=None,
        )
        try:
            return config.bind_socket()
        except SystemExit:  # uvicorn has logged the OS error
            raise ConfigError(
                f"host, port: cannot listen on {settings.host}:{settings.port}; choose a free "
                "port (0 picks one) and an address of this machine"
            ) from None

    path = settings.unix_socket
    if path.is_socket():
        path.unlink()  # left over from a process that did not stop cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # uvicorn's own Unix socket gets mode 0666; this one is created 0600 under the umask.
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"unix_socket: cannot listen on {path}: {exc.strerror}; give a path in an "
            "existing directory where no other file has that name"
        ) from None
    finally:
        os.umask(previous)
    return sock


def _address(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
