"""The Nexus credential: where the key comes from, and how it is shown (only as a fingerprint)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from pydantic import SecretStr

from .errors import ConfigError
from .settings import Settings

__all__ = ["Credential", "StaticKey", "fingerprint", "load_api_key"]

# RFC 9110 section 5.5: a field value is visible ASCII, space and tab; we also
# refuse inner spaces, which no Nexus key contains and which would split "Bearer KEY".
_ALLOWED = frozenset(range(0x21, 0x7F))


class Credential(Protocol):
    """What the forwarder needs from a credential."""

    kind: str
    fingerprint: str
    authorization: bytes


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
        self.fingerprint = fingerprint(key)
        # The one place the key is unwrapped: the header value sent upstream.
        self.authorization = b"Bearer " + key.get_secret_value().encode("ascii")

    def __repr__(self) -> str:
        return f"StaticKey(fingerprint={self.fingerprint!r})"
