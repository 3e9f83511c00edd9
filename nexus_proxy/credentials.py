"""The Nexus credential: where the key comes from, and how it is shown (only as a fingerprint)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from .errors import ConfigError
from .settings import Settings

__all__ = [
    "Credential",
    "CredentialUnavailable",
    "StaticKey",
    "fingerprint",
    "load_api_key",
]

# RFC 9110 section 5.5: a field value is visible ASCII, space and tab; we also
# refuse inner spaces, which no Nexus key contains and which would split "Bearer KEY".
_ALLOWED = frozenset(range(0x21, 0x7F))


class CredentialUnavailable(Exception):
    """No valid credential exists right now; the message says why (never a secret)."""


class Credential(Protocol):
    """What the proxy needs from a credential, whatever its kind."""

    kind: str  # "api_key" or "oauth"

    @property
    def fingerprint(self) -> str | None:
        """The current secret's fingerprint, or None while there is none."""

    async def authorization(self) -> bytes:
        """The `Authorization` header value to send now; raises `CredentialUnavailable`."""

    async def rejected(self, authorization: bytes) -> bool:
        """Note that the upstream answered 401 to `authorization`.

        Returns True when a different credential is now available, so that a
        request which is safe to repeat may be sent once more.
        """

    def unavailable_reason(self) -> str | None:
        """Why no credential can be sent right now, or None when one can."""

    async def start(self) -> None:
        """Begin: fetch a first token, start refreshing; called once at startup."""

    async def aclose(self) -> None:
        """Stop background work; called once at shutdown."""


def fingerprint(secret: SecretStr) -> str:
    """The first 8 hex digits of the secret's SHA-256: enough to tell keys apart, safe to log."""
    return hashlib.sha256(secret.get_secret_value().encode()).hexdigest()[:8]


def load_api_key(settings: Settings) -> SecretStr:
    """Read the key from `api_key` or `api_key_file`, stripped, or raise `ConfigError`."""
    if settings.api_key_file is not None:
        raw = _read_secret_file(settings.api_key_file, "api_key_file")
        source = f"api_key_file ({settings.api_key_file})"
    elif settings.api_key is not None:
        raw = settings.api_key.get_secret_value()
        source = "NEXUS_PROXY_API_KEY"
    else:
        raise ConfigError(
            "api_key: no Nexus API key is configured; set NEXUS_PROXY_API_KEY "
            "or point api_key_file (--api-key-file) at a file that holds it"
        )

    key = raw.strip()
    if not key:
        raise ConfigError(
            f"api_key: the key from {source} is empty; set NEXUS_PROXY_API_KEY "
            "or point api_key_file at a file that holds the key"
        )
    if not all(ord(char) in _ALLOWED for char in key):
        raise ConfigError(
            f"api_key: the key from {source} holds characters that cannot be sent in an "
            "HTTP header (spaces, control or non-ASCII characters); copy the key again"
        )
    return SecretStr(key)


def _read_secret_file(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.__class__.__name__}") from None


class StaticKey:
    """A fixed Service Account API key, sent as `Authorization: Bearer KEY`."""

    kind = "api_key"

    def __init__(self, key: SecretStr) -> None:
        self._fingerprint = fingerprint(key)
        # The one place the key is unwrapped: the header value sent upstream.
        self._authorization = b"Bearer " + key.get_secret_value().encode("ascii")

    @property
    def fingerprint(self) -> str:
        """The key's fingerprint."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"StaticKey(fingerprint={self.fingerprint!r})"

    async def authorization(self) -> bytes:
        """The Bearer header value; a static key is always available."""
        return self._authorization

    async def rejected(self, authorization: bytes) -> bool:
        """A static key cannot change, so a 401 is final."""
        return False

    def unavailable_reason(self) -> None:
        """A static key is always available."""
        return None

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Nothing to stop."""
