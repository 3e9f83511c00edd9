"""The proxy's own errors: one exception for bad configuration, and the HTTP error envelope.

Errors the proxy answers itself use the Nexus envelope, so that clients which parse
every body as `{"message", "errors", "values"}` keep working:

    {"message": "...", "errors": ["ProxyUpstreamTimeout"], "values": {"upstreamReached": true}}

`upstreamReached` is false only when no byte of the request was sent upstream, so a
client may safely retry exactly those requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .types import Send

__all__ = [
    "BAD_REQUEST",
    "CREDENTIAL_UNAVAILABLE",
    "UPSTREAM_BUSY",
    "UPSTREAM_PROTOCOL_ERROR",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_UNREACHABLE",
    "ConfigError",
    "ProxyError",
    "send_error",
]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the setting and the fix."""


@dataclass(frozen=True)
class ProxyError:
    """One kind of error that the proxy answers itself."""

    status: int
    code: str
    message: str
    upstream_reached: bool

    def body(self) -> bytes:
        """The error as a Nexus envelope."""
        envelope = {
            "message": self.message,
            "errors": [self.code],
            "values": {"upstreamReached": self.upstream_reached},
        }
        return json.dumps(envelope).encode()


UPSTREAM_UNREACHABLE = ProxyError(
    502,
    "ProxyUpstreamUnreachable",
    "Could not connect to the Nexus API (connection, DNS or TLS failure); "
    "nothing was sent, so the request can be retried.",
    upstream_reached=False,
)
UPSTREAM_BUSY = ProxyError(
    503,
    "ProxyUpstreamBusy",
    "Every upstream connection stayed busy for pool_timeout; nothing was sent, "
    "so the request can be retried. Raise max_connections if this repeats.",
    upstream_reached=False,
)
UPSTREAM_TIMEOUT = ProxyError(
    504,
    "ProxyUpstreamTimeout",
    "The Nexus API did not answer in time. The request was sent and may have been "
    "processed; check its outcome before repeating it.",
    upstream_reached=True,
)
UPSTREAM_PROTOCOL_ERROR = ProxyError(
    502,
    "ProxyUpstreamProtocolError",
    "The Nexus API closed the connection or sent an invalid response. The request was "
    "sent and may have been processed; check its outcome before repeating it.",
    upstream_reached=True,
)
CREDENTIAL_UNAVAILABLE = ProxyError(
    503,
    "ProxyCredentialUnavailable",
    "The proxy holds no valid Nexus credential right now; nothing was sent. "
    "Retry later, and check the proxy's log and /_proxy/ready.",
    upstream_reached=False,
)
BAD_REQUEST = ProxyError(
    400,
    "ProxyBadRequest",
    "This is a reverse proxy: send origin-form requests such as 'GET /customer', "
    "not absolute URLs or CONNECT.",
    upstream_reached=False,
)


async def send_error(send: Send, error: ProxyError) -> None:
    """Answer the client with `error` as a JSON envelope."""
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-nexus-proxy-error", error.code.encode()),
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
