"""Local access tokens: who may use the proxy, and so spend the Nexus key."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Iterable

from pydantic import SecretStr

from .errors import ConfigError
from .secretfile import read_secret_file
from .settings import Settings

__all__ = ["AccessTokens", "check_exposure", "is_loopback", "load_access_tokens"]

logger = logging.getLogger("nexus_proxy")


class AccessTokens:
    """The tokens a client may present as `Authorization: Bearer <token>`."""

    def __init__(self, tokens: Iterable[SecretStr]) -> None:
        # Held as the full header values, so a check is one comparison per token.
        self._expected = [b"bearer " + token.get_secret_value().encode() for token in tokens]

    def __len__(self) -> int:
        return len(self._expected)

    def __repr__(self) -> str:
        return f"AccessTokens(count={len(self._expected)})"

    def refusal(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Return why the request's credential is rejected, or None when it is accepted.

        The reasons (`missing`, `malformed`, `not recognised`) never contain the value.
        """
        values = [value for name, value in headers if name == b"authorization"]
        if not values:
            return "missing"
        # The scheme name is case-insensitive (RFC 9110 section 11.1).
        value = values[0][:7].lower() + values[0][7:]
        if len(values) > 1 or not value.startswith(b"bearer ") or len(value) == 7:
            return "malformed"

        # Compare with every token, so the time taken does not tell which one matched.
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(value, expected)
        return None if matched else "not recognised"


def is_loopback(host: str) -> bool:
    """Check whether a listen address accepts connections from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_access_tokens(settings: Settings) -> AccessTokens:
    """Load the tokens from `access_tokens` and `access_token_file`, or raise `ConfigError`."""
    tokens = [token for token in settings.access_tokens if token.get_secret_value().strip()]
    if settings.access_token_file is not None:
        text = read_secret_file(
            settings.access_token_file,
            "access_token_file",
            allow_insecure=settings.allow_insecure_permissions,
        )
        # One token per line; blank lines and "#" comments are skipped, so an empty
        # token never matches.
        tokens += [
            SecretStr(line.strip())
            for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]

    for token in tokens:
        value = token.get_secret_value()
        if value != value.strip() or not all(0x21 <= ord(char) <= 0x7E for char in value):
            raise ConfigError(
                "access_tokens or access_token_file: a token contains spaces, control or "
                "non-ASCII characters, which cannot be sent in an Authorization header; "
                "use visible ASCII only, one token per line"
            )
    return AccessTokens(tokens)


def check_exposure(settings: Settings, tokens: AccessTokens) -> None:
    """Refuse to listen beyond this machine when anyone who connects could spend the key."""
    if settings.unix_socket is not None or is_loopback(settings.host) or tokens:
        return
    if settings.allow_unauthenticated_remote:
        logger.warning(
            "listening on %s without access tokens: anyone who can reach this address can "
            "use the Nexus key (allow_unauthenticated_remote is set)",
            settings.host,
        )
        return
    raise ConfigError(
        f"host: {settings.host} is not a loopback address, and without access tokens anyone "
        "who can reach it could use the Nexus key. Configure access_tokens "
        "(NEXUS_PROXY_ACCESS_TOKENS or access_token_file), or set "
        "allow_unauthenticated_remote = true on purpose"
    )
