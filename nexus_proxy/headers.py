"""Header policy: what is removed, replaced and added on the way up and on the way back.

Header names arrive lower-cased from the ASGI server (the ASGI spec requires it),
so every set here contains lower-case names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import httpx

from .types import Headers

__all__ = ["HOP_BY_HOP", "RequestPolicy", "ResponsePolicy", "connection_tokens"]

# RFC 9110 section 7.6.1, plus the non-standard Proxy-Connection and the proxy
# credentials, which belong to one connection and are never forwarded.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Set by the proxy itself. The server already sent 100 Continue for "Expect: 100-continue"
# (RFC 9110 section 10.1.1) when the body was first read, so it stops here.
_REPLACED = frozenset({b"host", b"authorization", b"expect", b"content-length", b"x-request-id"})

ISO8601 = b"request_iso8601"
REDACTED = b"[redacted]"

# The proxy sets the request id it logged; an upstream one would repeat it.
_RESPONSE_DROPPED = HOP_BY_HOP | {b"x-request-id"}


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Names listed in `Connection` headers: they apply to this hop only."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    return frozenset(tokens)


@dataclass(frozen=True)
class Framing:
    """The framing of the client's request body."""

    content_length: bytes | None
    chunked: bool

    @property
    def has_body(self) -> bool:
        """Whether a body follows the headers."""
        return self.chunked or self.content_length is not None


class RequestPolicy:
    """Turns the client's request headers into the upstream's."""

    def __init__(self, host: str, *, iso8601: bool, defaults: Mapping[str, str]) -> None:
        self.host = host.encode("ascii")
        self.iso8601 = iso8601
        self.defaults = [
            (name.lower().encode(), value.encode()) for name, value in defaults.items()
        ]
        self.dropped = HOP_BY_HOP | _REPLACED | ({ISO8601} if iso8601 else frozenset())

    def apply(self, headers: Headers, authorization: bytes) -> tuple[Headers, Framing]:
        """Return the upstream headers, with `authorization` set last, and the body framing."""
        dropped = self.dropped
        if any(name == b"connection" for name, _ in headers):
            dropped = dropped | connection_tokens(headers)

        content_length = None
        chunked = False
        upstream: Headers = [(b"host", self.host)]
        for name, value in headers:
            if name not in dropped:
                upstream.append((name, value))
            elif name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                chunked = True

        # With both headers the body is chunked (RFC 9112 section 6.3), so the
        # length is not forwarded.
        if chunked:
            upstream.append((b"transfer-encoding", b"chunked"))
        elif content_length is not None:
            upstream.append((b"content-length", content_length))

        for default in self.defaults:
            if not any(name == default[0] for name, _ in headers):
                upstream.append(default)
        if self.iso8601:
            upstream.append((ISO8601, b"true"))
        upstream.append((b"authorization", authorization))
        return upstream, Framing(content_length, chunked)


class ResponsePolicy:
    """Turns the upstream's response headers into the client's."""

    def __init__(self, upstream: httpx.URL) -> None:
        default_port = 443 if upstream.scheme == "https" else 80
        port = upstream.port or default_port
        host = f"[{upstream.host}]" if ":" in upstream.host else upstream.host
        origin = f"{upstream.scheme}://{host}"
        origins = [f"{origin}:{port}"] + ([origin] if port == default_port else [])
        base = upstream.raw_path.rstrip(b"/")
        self.location_prefixes = [prefix.encode().lower() + base for prefix in origins]

    def apply(self, headers: Iterable[tuple[bytes, bytes]], secret: bytes = b"") -> Headers:
        """Return the headers to send to the client, any value that contains `secret` replaced."""
        kept: Headers = []
        names: list[bytes] = []
        tokens: set[bytes] = set()
        for name, value in headers:
            lowered = name.lower()
            if lowered in _RESPONSE_DROPPED:
                if lowered == b"connection":
                    tokens |= connection_tokens([(lowered, value)])
                continue
            if lowered == b"location":
                value = self.rewrite_location(value)
            if secret and secret in value and lowered != b"content-length":
                # An upstream that echoes the credential (a debug header, an error
                # page's redirect) must not hand it to the client. A length is
                # digits only and frames the body, so it is never replaced.
                value = REDACTED
            kept.append((name, value))
            names.append(lowered)
        if tokens & set(names):
            # Headers a Connection header names apply to this hop only.
            pairs = zip(kept, names, strict=True)
            kept = [header for header, lowered in pairs if lowered not in tokens]
        return kept

    def rewrite_location(self, location: bytes) -> bytes:
        """Point a redirect to the upstream origin back at the proxy, so clients stay behind it."""
        lowered = location.lower()
        for prefix in self.location_prefixes:
            if lowered.startswith(prefix):
                rest = location[len(prefix) :]
                if not rest or rest[:1] in (b"/", b"?"):
                    return rest if rest.startswith(b"/") else b"/" + rest
        return location
