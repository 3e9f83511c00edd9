"""The Nexus credential: the interface the proxy uses, and the helpers both kinds share.

Two kinds exist: an API key (`keyfile.ApiKey`, optionally re-read from a file) and
OAuth2 client credentials (`oauth.ClientCredentials`). `build_credential` picks
one from the settings. Secrets are shown only as fingerprints.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import SecretStr

from .errors import ConfigError
from .secretfile import check_permissions
from .settings import Settings

if TYPE_CHECKING:
    from .keyfile import ApiKey
    from .oauth import ClientCredentials

__all__ = [
    "MAX_SECRET_FILE_BYTES",
    "Credential",
    "CredentialUnavailable",
    "RepeatLimit",
    "authorization_fingerprint",
    "build_credential",
    "describe_read_error",
    "fingerprint",
    "is_header_safe",
    "load_api_key",
    "load_secret_file",
    "read_secret",
    "repeats_note",
    "warn_unauthorized",
]

logger = logging.getLogger("nexus_proxy")

# RFC 9110 section 5.5 allows visible ASCII, space and tab in a field value. Spaces
# are rejected too, because no Nexus key contains one and it would split "Bearer KEY".
_ALLOWED = frozenset(range(0x21, 0x7F))

# A secret file larger than this is a mistake (a key is under 100 bytes), not a secret.
MAX_SECRET_FILE_BYTES = 64 * 1024


class CredentialUnavailable(Exception):
    """No valid credential exists right now. The message gives the reason, never a secret."""


class Credential(Protocol):
    """The interface the proxy uses for a credential of any kind."""

    kind: str  # "api_key" or "oauth"
    reloads: int  # new keys loaded from api_key_file
    refreshes: int  # OAuth tokens obtained
    unauthorized: int  # upstream 401 responses

    @property
    def fingerprint(self) -> str | None:
        """The current secret's fingerprint, or None while there is none."""

    async def authorization(self) -> bytes:
        """The `Authorization` header value to send now; raises `CredentialUnavailable`."""

    async def rejected(self, authorization: bytes) -> bool:
        """Record that the upstream returned 401 for `authorization`.

        Returns True when a different credential is now available, so that a
        request which is safe to repeat may be sent once more.
        """

    def unavailable_reason(self) -> str | None:
        """Why no credential can be sent right now, or None when one can."""

    def expiry_days(self) -> int | None:
        """Days left until the API key's configured expiry date (negative after it), or None."""

    def fingerprints(self) -> dict[str, str]:
        """Return the fingerprint of each configured secret by setting name, for `check`."""

    def reload(self) -> None:
        """Re-read the secret files now; safe to call from a signal handler."""

    async def start(self) -> None:
        """Begin: fetch a first token, start refreshing; called once at startup."""

    async def aclose(self) -> None:
        """Stop background work; called once at shutdown."""


def build_credential(settings: Settings) -> ApiKey | ClientCredentials:
    """Build the credential that the settings configure, or raise `ConfigError`.

    Nothing is contacted here; an OAuth token is first requested by `start()`.
    """
    # Secret files are checked once, at startup: a rotated file keeps the mode
    # its mount gives it.
    secret_files = [("api_key_file", settings.api_key_file)]
    if settings.oauth is not None:
        secret_files.append(("oauth.client_secret_file", settings.oauth.client_secret_file))
    for setting, path in secret_files:
        if path is not None:
            check_permissions(path, setting, allow_insecure=settings.allow_insecure_permissions)

    # Imported here because both modules import this one.
    if settings.oauth is not None:
        from .oauth import ClientCredentials

        return ClientCredentials.from_settings(settings)

    from .keyfile import ApiKey

    return ApiKey.from_settings(settings)


def fingerprint(secret: SecretStr) -> str:
    """Return the first 8 hex digits of the secret's SHA-256, which is safe to log."""
    return hashlib.sha256(secret.get_secret_value().encode()).hexdigest()[:8]


def authorization_fingerprint(authorization: bytes) -> str:
    """Return the fingerprint of the secret in a `Bearer SECRET` header value."""
    return hashlib.sha256(authorization.removeprefix(b"Bearer ")).hexdigest()[:8]


def is_header_safe(secret: str) -> bool:
    """Check that `secret` can follow "Bearer " in a header: visible ASCII without spaces."""
    return all(ord(char) in _ALLOWED for char in secret)


def read_secret(path: Path) -> str:
    """Read a secret file as secret mounts write it: UTF-8, surrounding whitespace stripped.

    Raises `OSError`, `UnicodeDecodeError`, or `ValueError` for a file larger than
    `MAX_SECRET_FILE_BYTES`.
    """
    with path.open("rb") as file:
        data = file.read(MAX_SECRET_FILE_BYTES + 1)
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise ValueError(f"it is larger than {MAX_SECRET_FILE_BYTES} bytes")
    return data.decode("utf-8").strip()


def describe_read_error(exc: OSError | ValueError) -> str:
    """Name a `read_secret` failure without quoting any byte of the file."""
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, OSError):
        return exc.strerror or exc.__class__.__name__
    return str(exc)


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
    if not is_header_safe(key):
        raise ConfigError(
            f"api_key: the key from {source} contains characters that cannot be sent in an "
            "HTTP header (spaces, control or non-ASCII characters); copy the key again"
        )
    return SecretStr(key)


def load_secret_file(path: Path, setting: str) -> SecretStr:
    """Read a secret file at startup; raises `ConfigError` when it is unreadable or empty."""
    secret = _read_secret_file(path, setting)
    if not secret:
        raise ConfigError(f"{setting}: {path} is empty; write the secret into it")
    return SecretStr(secret)


def _read_secret_file(path: Path, name: str) -> str:
    try:
        return read_secret(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {describe_read_error(exc)}") from None


class RepeatLimit:
    """Allows one log line per `interval` seconds for a repeating event, counting the rest."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._next = -math.inf
        self._suppressed = 0

    def allow(self) -> int | None:
        """Return the number of repeats left out since the last line, or None to leave this out."""
        now = self._clock()
        if now < self._next:
            self._suppressed += 1
            return None
        suppressed, self._suppressed = self._suppressed, 0
        self._next = now + self._interval
        return suppressed


def repeats_note(suppressed: int) -> str:
    """Format the repeats that a `RepeatLimit` left out as a log line suffix, or "" for none."""
    return f" ({suppressed} more since the last warning)" if suppressed else ""


def warn_unauthorized(limit: RepeatLimit, secret: str, authorization: bytes) -> None:
    """Log an upstream 401 for the `secret` kind ("API key", "OAuth token"), rate-limited."""
    suppressed = limit.allow()
    if suppressed is None:
        return
    logger.warning(
        "the upstream returned 401 Unauthorized for the %s with fingerprint %s%s",
        secret,
        authorization_fingerprint(authorization),
        repeats_note(suppressed),
    )
