"""The proxy's own errors: one exception for bad configuration, and the HTTP error envelope.

Errors the proxy sends itself use the Nexus envelope, so that clients which parse
every body as `{"message", "errors", "values"}` keep working:

    {"message": "...", "errors": ["ProxyUpstreamTimeout"], "values": {"upstreamReached": true}}

`upstreamReached` is false only when no byte of the request was sent upstream, so a
client may safely retry exactly those requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus

from .types import Send

__all__ = [
    "AMBIGUOUS_PATH",
    "BAD_FRAMING",
    "BAD_REQUEST",
    "BODY_TOO_LARGE",
    "BODY_TOO_LARGE_SENT",
    "CLIENT_TIMEOUT",
    "CREDENTIAL_UNAVAILABLE",
    "FORBIDDEN",
    "HEADERS_TOO_LARGE",
    "HEADER_TIMEOUT",
    "MALFORMED_BODY_SENT",
    "MALFORMED_REQUEST",
    "SHUTDOWN",
    "SHUTDOWN_SENT",
    "UNAUTHORIZED",
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
    """One kind of error that the proxy sends itself."""

    status: int
    code: str
    message: str
    upstream_reached: bool
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def body(self) -> bytes:
        """Return the error as a Nexus envelope."""
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
UNAUTHORIZED = ProxyError(
    401,
    "ProxyUnauthorized",
    "This proxy needs a local access token: send 'Authorization: Bearer <token>' "
    "with one of the proxy's access tokens (not the Nexus key).",
    upstream_reached=False,
    headers=((b"www-authenticate", b'Bearer realm="nexus-proxy"'),),
)
FORBIDDEN = ProxyError(
    403,
    "ProxyForbidden",
    "The proxy's request policy does not allow this method or path; "
    "the proxy's log names the rule.",
    upstream_reached=False,
)
AMBIGUOUS_PATH = ProxyError(
    400,
    "ProxyBadRequest",
    "The path contains an encoded slash, backslash, dot or percent sign, a dot "
    "segment or a ';' parameter, which the proxy's path rules cannot judge. "
    "Send the path in its plain form.",
    upstream_reached=False,
)
BAD_FRAMING = ProxyError(
    400,
    "ProxyBadRequest",
    "The request body's framing is ambiguous (Content-Length together with "
    "Transfer-Encoding, repeated or invalid Content-Length, or a Transfer-Encoding "
    "other than chunked).",
    upstream_reached=False,
)
BODY_TOO_LARGE = ProxyError(
    413,
    "ProxyBodyTooLarge",
    "The request body is larger than the proxy's max_body_size; nothing was sent.",
    upstream_reached=False,
)
BODY_TOO_LARGE_SENT = ProxyError(
    413,
    "ProxyBodyTooLarge",
    "The request body grew larger than the proxy's max_body_size, so the upstream "
    "request was aborted before its end and cannot have been processed.",
    upstream_reached=True,
)
CLIENT_TIMEOUT = ProxyError(
    408,
    "ProxyClientTimeout",
    "The request was not received within the proxy's client timeouts; "
    "the upstream request, if any, was aborted before its end.",
    upstream_reached=True,
)
MALFORMED_REQUEST = ProxyError(
    400,
    "ProxyBadRequest",
    "The request is not valid HTTP/1.1 (request line, header syntax or body framing).",
    upstream_reached=False,
)
MALFORMED_BODY_SENT = ProxyError(
    400,
    "ProxyBadRequest",
    "The request body's framing is not valid HTTP/1.1. The upstream request had "
    "started and was aborted before its end, so it cannot have been processed.",
    upstream_reached=True,
)
HEADER_TIMEOUT = ProxyError(
    408,
    "ProxyClientTimeout",
    "The request line and headers did not arrive within the proxy's "
    "client_header_timeout; nothing was sent upstream.",
    upstream_reached=False,
)
HEADERS_TOO_LARGE = ProxyError(
    431,
    "ProxyHeadersTooLarge",
    "The request line and headers are larger than the proxy's max_header_size, "
    "or there are more than 100 header fields.",
    upstream_reached=False,
)
SHUTDOWN = ProxyError(
    503,
    "ProxyShuttingDown",
    "The proxy is shutting down and stopped this request before sending it; "
    "nothing was sent, so it can be retried.",
    upstream_reached=False,
    headers=((b"connection", b"close"),),
)
SHUTDOWN_SENT = ProxyError(
    503,
    "ProxyShuttingDown",
    "The proxy is shutting down and stopped this request after shutdown_timeout. "
    "It was sent and may have been processed; check its outcome before repeating it.",
    upstream_reached=True,
    headers=((b"connection", b"close"),),
)
BAD_REQUEST = ProxyError(
    400,
    "ProxyBadRequest",
    "This is a reverse proxy: send origin-form requests such as 'GET /customer', "
    "not absolute URLs or CONNECT.",
    upstream_reached=False,
)


def raw_response(error: ProxyError) -> bytes:
    """Return the error as a complete HTTP/1.1 response that closes the connection."""
    body = error.body()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-nexus-proxy-error: {error.code}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


async def send_error(send: Send, error: ProxyError, *extra: tuple[bytes, bytes]) -> None:
    """Send the client `error` as a JSON envelope, adding `extra` headers."""
    body = error.body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-nexus-proxy-error", error.code.encode()),
        *error.headers,
        *extra,
    ]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
