"""Checks a request passes before any byte of it goes upstream.

In order: the local access token, the framing of the body (so that no smuggled
request reaches the upstream), the method and path policy, and the declared body
size. Each refusal is logged with its reason, never with a credential.
"""

from __future__ import annotations

import logging

from . import errors
from .access import AccessTokens
from .policy import RequestRules
from .types import Headers, Scope

__all__ = ["Gate"]

logger = logging.getLogger("nexus_proxy")


class Gate:
    """Decides whether a request may be forwarded."""

    def __init__(self, tokens: AccessTokens, rules: RequestRules, max_body_size: int) -> None:
        self.tokens = tokens
        self.rules = rules
        self.max_body_size = max_body_size

    def authenticate(self, scope: Scope) -> errors.ProxyError | None:
        """Return the 401 error when access tokens are configured and none matches."""
        if not self.tokens:
            return None
        reason = self.tokens.refusal(scope["headers"])
        if reason is None:
            return None
        logger.warning(
            "rejected %s request from %s: access token %s",
            scope["method"],
            _client(scope),
            reason,
        )
        return errors.UNAUTHORIZED

    def refusal(self, scope: Scope, raw_path: bytes) -> errors.ProxyError | None:
        """Return the error to send instead of forwarding, or None to forward."""
        rejection = self.authenticate(scope)
        if rejection is not None:
            return rejection

        framing_problem = _framing_problem(scope["headers"])
        if framing_problem is not None:
            logger.warning("rejected request with %s", framing_problem)
            return errors.BAD_FRAMING

        if not self.rules.is_empty:
            refusal = self.rules.check(scope["method"], raw_path)
            if refusal is not None:
                logger.warning("rejected %s request: policy rule %s", scope["method"], refusal.rule)
                return errors.FORBIDDEN if refusal.forbidden else errors.AMBIGUOUS_PATH

        if self.max_body_size and _declared_length(scope["headers"]) > self.max_body_size:
            logger.warning("rejected request: declared body over max_body_size")
            return errors.BODY_TOO_LARGE
        return None


def _framing_problem(headers: Headers) -> str | None:
    """Describe how the body's framing could be read two ways (RFC 9112 section 6.3), if it can."""
    lengths = [value for name, value in headers if name == b"content-length"]
    encodings = [value for name, value in headers if name == b"transfer-encoding"]
    if lengths and encodings:
        return "both Content-Length and Transfer-Encoding"
    if len(lengths) > 1:
        return "more than one Content-Length"
    if lengths and not lengths[0].isdigit():
        return "an invalid Content-Length"
    if encodings and (len(encodings) > 1 or encodings[0].strip().lower() != b"chunked"):
        return "a Transfer-Encoding other than chunked"
    return None


def _declared_length(headers: Headers) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return 0


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "a Unix socket"
