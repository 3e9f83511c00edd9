"""The Service Account API key: fixed, or read from a file that may be rotated, and its expiry.

A key file is re-read on use at most once per `check_interval`, at once on
`reload()` (SIGHUP), and after an upstream 401. A secret mount that swaps a
symlinked directory (Kubernetes) is followed, because the path is opened anew
each time. A missing, empty or invalid file keeps the last good key. `SecretFile`
holds these rules for every secret file that is re-read while the proxy runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path

from pydantic import SecretStr

from . import metrics
from .credentials import (
    RepeatLimit,
    describe_read_error,
    fingerprint,
    is_header_safe,
    load_api_key,
    read_secret,
    repeats_note,
    warn_unauthorized,
)
from .secretfile import is_too_open
from .settings import Settings

__all__ = ["EXPIRY_WARNING_DAYS", "ApiKey", "KeyExpiry", "SecretFile", "utc_today"]

logger = logging.getLogger("nexus_proxy")

EXPIRY_WARNING_DAYS = 14

_CHECK_INTERVAL = 1.0
_WARNING_INTERVAL = 60.0
# The expiry is checked this often; a log line appears at most once per UTC day.
_EXPIRY_CHECK_INTERVAL = 3600.0


def utc_today() -> date:
    """Today's date in UTC."""
    return datetime.now(UTC).date()


class KeyExpiry:
    """The configured expiry date of a key, with a warning or an error at most once a day."""

    def __init__(self, expires: date, today: Callable[[], date] = utc_today) -> None:
        self.expires = expires
        self._today = today
        self._reported: date | None = None

    def days_left(self) -> int:
        """Days from today (UTC) until the expiry date; negative once it has passed."""
        return (self.expires - self._today()).days

    def check(self) -> None:
        """Log the days left from `EXPIRY_WARNING_DAYS` before the date, and an error after it."""
        today = self._today()
        days = (self.expires - today).days
        if today == self._reported or days > EXPIRY_WARNING_DAYS:
            return

        self._reported = today
        if days < 0:
            logger.error(
                "the API key expired on %s (%s ago), so Nexus rejects it; create a new "
                "key in the Nexus Identity portal, then update the key and api_key_expires",
                self.expires,
                _days(-days),
            )
        else:
            logger.warning(
                "the API key expires on %s (%s); create a new key in the Nexus "
                "Identity portal, then update the key and api_key_expires",
                self.expires,
                f"in {_days(days)}" if days else "today",
            )


def _days(count: int) -> str:
    return "1 day" if count == 1 else f"{count} days"


class SecretFile:
    """A secret file that is re-read while the proxy runs, keeping its last good value.

    A file that cannot be read, is empty or fails `check` keeps the value it had,
    with a warning at most once a minute.
    """

    def __init__(
        self,
        path: Path,
        setting: str,
        value: SecretStr,
        *,
        clock: Callable[[], float] = time.monotonic,
        check: Callable[[str], str | None] = lambda secret: None,
        allow_insecure: bool = False,
    ) -> None:
        self.path = path
        self.allow_insecure = allow_insecure
        self.setting = setting
        self.value = value
        self.fingerprint = fingerprint(value)
        self._check = check
        self._problem: str | None = None
        self._warnings = RepeatLimit(_WARNING_INTERVAL, clock)

    def __repr__(self) -> str:
        return f"SecretFile({self.setting}={self.path}, fingerprint={self.fingerprint!r})"

    def read(self) -> bool:
        """Re-read the file; returns True when it contains a new, valid value."""
        try:
            loose = not self.allow_insecure and is_too_open(self.path.stat())
            secret = read_secret(self.path)
        except (OSError, ValueError) as exc:
            return self._keep(f"cannot be read: {describe_read_error(exc)}")
        if loose:
            # The rule checked at startup holds for every later version of the file.
            return self._keep(
                f"is open to group or others; run 'chmod 600 {self.path}' "
                "(allow_insecure_permissions accepts it)"
            )
        problem = self._check(secret) if secret else "is empty"
        if problem is not None:
            return self._keep(problem)

        if self._problem is not None:
            logger.info("%s %s contains a valid secret again", self.setting, self.path)
            self._problem = None
        if secret == self.value.get_secret_value():
            return False
        previous = self.fingerprint
        self.value = SecretStr(secret)
        self.fingerprint = fingerprint(self.value)
        logger.info(
            "%s %s changed: fingerprint %s replaces %s",
            self.setting,
            self.path,
            self.fingerprint,
            previous,
        )
        return True

    def _keep(self, problem: str) -> bool:
        self._problem = problem
        suppressed = self._warnings.allow()
        if suppressed is not None:
            logger.warning(
                "%s %s %s; keeping the last good secret (fingerprint %s)%s",
                self.setting,
                self.path,
                problem,
                self.fingerprint,
                repeats_note(suppressed),
            )
        return False


def _header_problem(key: str) -> str | None:
    if is_header_safe(key):
        return None
    return (
        "holds characters that cannot be sent in an HTTP header "
        "(spaces, control or non-ASCII characters)"
    )


class ApiKey:
    """A Service Account API key, sent as `Authorization: Bearer KEY`."""

    kind = "api_key"

    def __init__(
        self,
        key: SecretStr,
        *,
        path: Path | None = None,
        expires: date | None = None,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], date] = utc_today,
        check_interval: float = _CHECK_INTERVAL,
        allow_insecure: bool = False,
    ) -> None:
        self.reloads = 0
        self.refreshes = 0
        self.unauthorized = 0
        self._file = None
        if path is not None:
            self._file = SecretFile(
                path,
                "api_key_file",
                key,
                clock=clock,
                check=_header_problem,
                allow_insecure=allow_insecure,
            )
        self._clock = clock
        self._check_interval = check_interval
        self._next_check = clock() + check_interval
        self._use(key)

        # api_key_expires describes the key loaded at startup, not a key rotated in later.
        self._expiry = KeyExpiry(expires, today) if expires is not None else None
        self._expiry_fingerprint = self._fingerprint
        self._unauthorized_warnings = RepeatLimit(_WARNING_INTERVAL, clock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expiry_task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], date] = utc_today,
    ) -> ApiKey:
        """Load the key from `api_key` or `api_key_file`; raises `ConfigError`."""
        return cls(
            load_api_key(settings),
            path=settings.api_key_file,
            expires=settings.api_key_expires,
            allow_insecure=settings.allow_insecure_permissions,
            clock=clock,
            today=today,
        )

    def _use(self, key: SecretStr) -> None:
        self._fingerprint = fingerprint(key)
        # The one place the key is unwrapped: the header value sent upstream.
        self._authorization = b"Bearer " + key.get_secret_value().encode("ascii")

    @property
    def fingerprint(self) -> str:
        """The current key's fingerprint."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"ApiKey(fingerprint={self._fingerprint!r}, file={self._file!r})"

    async def authorization(self) -> bytes:
        """Return the Bearer header value, re-reading the key file once `check_interval` passed."""
        if self._file is not None and self._clock() >= self._next_check:
            self._read_file()
        return self._authorization

    async def rejected(self, authorization: bytes) -> bool:
        """Count and log the 401; re-read the key file, if any, unless the key changed already."""
        self.unauthorized += 1
        warn_unauthorized(self._unauthorized_warnings, "API key", authorization)
        if authorization != self._authorization:
            return True
        return self._file is not None and self._read_file()

    def unavailable_reason(self) -> None:
        """Return None, because an API key is always available, stale or not."""
        return None

    def expiry_days(self) -> int | None:
        """Days left until api_key_expires, or None when unset or the key has been rotated."""
        if self._expiry is None or self._fingerprint != self._expiry_fingerprint:
            return None
        return self._expiry.days_left()

    def fingerprints(self) -> dict[str, str]:
        """Return the key's fingerprint by setting name."""
        return {"api_key": self._fingerprint}

    def reload(self) -> None:
        """Re-read the key file on the event loop; safe to call from a signal handler."""
        if self._loop is None:
            self._reload()
            return
        # The loop is closed once the server has stopped; nothing is left to reload.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._reload)

    def _reload(self) -> None:
        if self._file is None:
            logger.info(
                "reload requested, but the API key comes from NEXUS_PROXY_API_KEY, "
                "which cannot change while the proxy runs"
            )
            return
        if not self._read_file():
            logger.info(
                "reload requested: api_key_file %s still contains the key with fingerprint %s",
                self._file.path,
                self._fingerprint,
            )

    async def start(self) -> None:
        """Warn about the expiry date now, and check it every hour from now on."""
        self._loop = asyncio.get_running_loop()
        if self._expiry is not None:
            self._expiry.check()
            self._expiry_task = asyncio.create_task(self._watch_expiry())

    async def aclose(self) -> None:
        """Stop the expiry checks."""
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry_task

    async def _watch_expiry(self) -> None:
        assert self._expiry is not None
        while True:
            await asyncio.sleep(_EXPIRY_CHECK_INTERVAL)
            if self._fingerprint == self._expiry_fingerprint:
                self._expiry.check()

    def _read_file(self) -> bool:
        """Re-read the key file; returns True when it contains a new, valid key."""
        assert self._file is not None
        self._next_check = self._clock() + self._check_interval
        if not self._file.read():
            return False

        self._use(self._file.value)
        self.reloads += 1
        metrics.CREDENTIAL_RELOADS.inc()
        if self._expiry is not None and self._fingerprint != self._expiry_fingerprint:
            logger.info(
                "api_key_expires (%s) belongs to the key with fingerprint %s, so expiry "
                "warnings stop; restart with the new key's expiry date to resume them",
                self._expiry.expires,
                self._expiry_fingerprint,
            )
        return True
