"""OAuth2 client credentials (RFC 6749 section 4.4), the flow the Nexus SDKs use.

One access token is cached and replaced before it expires. Token requests never
overlap: a request that needs a token while one is being fetched waits for that
fetch. A failing token endpoint is retried with exponential backoff and jitter,
and two token requests never start less than `RefreshPolicy.min_interval` apart,
which keeps the proxy under the endpoint's limit of 60 requests per minute per IP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from pydantic import SecretStr

from . import metrics
from .credentials import (
    CredentialUnavailable,
    RepeatLimit,
    fingerprint,
    is_header_safe,
    load_secret_file,
    warn_unauthorized,
)
from .errors import ConfigError
from .keyfile import SecretFile
from .settings import Settings

__all__ = ["TOKEN_URLS", "ClientCredentials", "RefreshPolicy", "token_url"]

logger = logging.getLogger("nexus_proxy")

TOKEN_URLS = {
    "test": "https://testidentity.quantoznexus.com/connect/token",
    "production": "https://identity.quantoznexus.com/connect/token",
}

# RFC 6749 section 5.2: an error code is printable ASCII without quotes or backslash.
_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}")
_WARNING_INTERVAL = 60.0


@dataclass(frozen=True)
class RefreshPolicy:
    """When tokens are replaced and failed token requests repeated; all times in seconds."""

    refresh_fraction: float = 0.8  # of expires_in, for long-lived tokens
    min_lead: float = 30.0  # replace a token at least this long before it expires...
    expiry_margin: float = 10.0  # ...and never send it this close to its expiry
    retry_initial: float = 1.0
    retry_max: float = 60.0
    min_interval: float = 2.0  # between the starts of two token requests: 30 a minute at most
    timeout: httpx.Timeout = field(default_factory=lambda: httpx.Timeout(10.0, connect=5.0))

    def refresh_after(self, expires_in: float) -> float:
        """Seconds after a token request at which to request the next token."""
        lead = max((1 - self.refresh_fraction) * expires_in, min(self.min_lead, expires_in / 2))
        return expires_in - lead

    def usable_for(self, expires_in: float) -> float:
        """Seconds after a token request during which its token may be sent."""
        return expires_in - min(self.expiry_margin, expires_in / 10)

    def retry_delay(self, failures: int, jitter: float) -> float:
        """Seconds before the next attempt after `failures` in a row; `jitter` is in [0, 1)."""
        step = min(self.retry_max, self.retry_initial * 2.0 ** min(failures - 1, 30))
        return max(self.min_interval, step * (0.5 + jitter / 2))


@dataclass(frozen=True)
class _Token:
    authorization: bytes
    fingerprint: str
    usable_until: float  # on the credential's clock


class _TokenRequestFailed(Exception):
    """The token request failed; the message gives the reason without quoting the response body."""


def token_url(settings: Settings) -> str:
    """Return the token endpoint: `[oauth] token_url`, else the default for the environment."""
    assert settings.oauth is not None
    if settings.oauth.token_url:
        return settings.oauth.token_url
    if settings.upstream_url is None and settings.environment in TOKEN_URLS:
        return TOKEN_URLS[settings.environment]
    raise ConfigError(
        "oauth.token_url: there is no default for the dcts environment or a custom "
        "upstream_url; set token_url in the [oauth] table or NEXUS_PROXY_OAUTH__TOKEN_URL"
    )


class ClientCredentials:
    """An access token from the client credentials grant, sent as `Authorization: Bearer`."""

    kind = "oauth"

    def __init__(
        self,
        client_id: str,
        client_secret: SecretStr | SecretFile,
        url: str,
        *,
        scope: str = "api1",
        verify: ssl.SSLContext | bool = True,
        proxy: str | None = None,
        policy: RefreshPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.reloads = 0
        self.refreshes = 0
        self.refresh_failures = 0
        self.unauthorized = 0
        self._client_id = client_id
        self._secret = client_secret
        self._url = url
        self._scope = scope
        self._verify = verify
        self._proxy = proxy
        self._policy = policy or RefreshPolicy()
        self._clock = clock
        self._jitter = jitter

        self._token: _Token | None = None
        self._next_attempt = -float("inf")
        self._last_attempt = -float("inf")
        self._failures = 0
        self._problem = "no OAuth token has been requested yet"
        self._inflight: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._unauthorized_warnings = RepeatLimit(_WARNING_INTERVAL, clock)
        self._client: httpx.AsyncClient | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        policy: RefreshPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> ClientCredentials:
        """Build the credential from the `[oauth]` table; raises `ConfigError`."""
        oauth = settings.oauth
        assert oauth is not None
        if not oauth.client_id.strip():
            raise ConfigError("oauth.client_id: it is empty; set the client id from Nexus")
        secret: SecretStr | SecretFile
        if oauth.client_secret_file is not None:
            setting = "oauth.client_secret_file"
            value = load_secret_file(oauth.client_secret_file, setting)
            secret = SecretFile(
                oauth.client_secret_file,
                setting,
                value,
                clock=clock,
                allow_insecure=settings.allow_insecure_permissions,
            )
        else:
            assert oauth.client_secret is not None
            secret = SecretStr(oauth.client_secret.get_secret_value().strip())
            if not secret.get_secret_value():
                raise ConfigError(
                    "oauth.client_secret: it is empty; set NEXUS_PROXY_OAUTH__CLIENT_SECRET "
                    "or client_secret_file"
                )
        url = token_url(settings)
        return cls(
            oauth.client_id.strip(),
            secret,
            url,
            scope=oauth.scope,
            verify=_tls_context(settings),
            proxy=_egress_proxy(settings, url),
            policy=policy,
            clock=clock,
        )

    @property
    def fingerprint(self) -> str | None:
        """The current token's fingerprint, or None while there is no usable token."""
        token = self._usable_token()
        return token.fingerprint if token is not None else None

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self._client_id!r}, token_url={self._url!r})"

    async def authorization(self) -> bytes:
        """Return the Bearer header value, waiting for a token request in flight if needed.

        Raises `CredentialUnavailable` when no usable token exists and none is being fetched.
        """
        now = self._clock()
        token = self._token
        if token is not None and now < token.usable_until:
            if now >= self._next_attempt and self._inflight is None:
                self._fetch()  # replace it early and keep sending it meanwhile
            return token.authorization

        if self._inflight is None and now >= self._next_attempt:
            self._fetch()
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        token = self._usable_token()
        if token is None:
            raise CredentialUnavailable(self.unavailable_reason())
        return token.authorization

    async def rejected(self, authorization: bytes) -> bool:
        """Count and log the 401, drop the token if it is the current one, and fetch a new one.

        Returns True once a different token is available.
        """
        self.unauthorized += 1
        warn_unauthorized(self._unauthorized_warnings, "OAuth token", authorization)
        token = self._token
        if token is not None and token.authorization == authorization:
            logger.info(
                "dropping the OAuth token with fingerprint %s and requesting a new one",
                token.fingerprint,
            )
            self._token = None
            self._problem = "the upstream rejected the OAuth token"
            # NOTE: an upstream that rejects every token (a wrong scope, say) costs one
            # token request per 401, so up to one every `min_interval` under load.
            self._next_attempt = min(self._next_attempt, self._clock())

        if self._inflight is None and self._token is None and self._clock() >= self._next_attempt:
            self._fetch()
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        token = self._usable_token()
        return token is not None and token.authorization != authorization

    def unavailable_reason(self) -> str | None:
        """Why no token can be sent now, or None when one can."""
        if self._usable_token() is not None:
            return None
        if self._inflight is not None:
            return f"{self._problem}; a token request is in flight"
        wait = self._next_attempt - self._clock()
        if wait > 0:
            return f"{self._problem}; the next token request starts in {wait:.0f} s"
        return self._problem

    def expiry_days(self) -> None:
        """Tokens are replaced automatically, so there is no expiry date to report."""
        return None

    def fingerprints(self) -> dict[str, str]:
        """Return the client secret's fingerprint by setting name."""
        return {"oauth.client_secret": fingerprint(self._client_secret())}

    def reload(self) -> None:
        """Request a new token now, re-reading client_secret_file; safe in a signal handler."""
        if self._loop is None:
            return
        # The loop is closed once the server has stopped; nothing is left to reload.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._reload)

    def _reload(self) -> None:
        logger.info("reload requested: requesting a new OAuth token from %s", self._url)
        self._next_attempt = min(self._next_attempt, self._clock())
        self._fetch()

    async def start(self) -> None:
        """Request the first token and start the background refresh.

        A failed first request is logged and retried in the background, so that
        the proxy still starts and responds with 503 until a token arrives.
        """
        self._loop = asyncio.get_running_loop()
        self._client = httpx.AsyncClient(
            timeout=self._policy.timeout,
            verify=self._verify,
            proxy=self._proxy,
            trust_env=False,
            follow_redirects=False,
        )
        first = self._fetch()
        self._refresher = asyncio.create_task(self._refresh_when_due())
        await asyncio.shield(first)

    async def aclose(self) -> None:
        """Stop refreshing, cancel a token request in flight and close the connections."""
        tasks = [task for task in (self._refresher, self._inflight) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def _usable_token(self) -> _Token | None:
        token = self._token
        if token is None or self._clock() >= token.usable_until:
            return None
        return token

    async def _refresh_when_due(self) -> None:
        while True:
            self._wake.clear()
            delay = self._next_attempt - self._clock()
            if delay <= 0 or self._inflight is not None:
                await asyncio.shield(self._fetch())
                continue
            # Woken early when a fetch that someone else started has finished.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _fetch(self) -> asyncio.Task[None]:
        """Return the token request in flight, starting one if there is none."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._attempt(), name="oauth-token-request")
        return self._inflight

    async def _attempt(self) -> None:
        try:
            wait = self._last_attempt + self._policy.min_interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            self._last_attempt = sent_at = self._clock()
            try:
                token, expires_in = await self._request_token()
            except _TokenRequestFailed as exc:
                self._failed(str(exc))
            except Exception as exc:  # a bug must not end the refreshing for good
                logger.exception("OAuth token request to %s failed unexpectedly", self._url)
                self._failed(exc.__class__.__name__)
            else:
                self._succeeded(token, expires_in, sent_at)
        finally:
            self._inflight = None
            self._wake.set()

    async def _request_token(self) -> tuple[SecretStr, float]:
        assert self._client is not None, "start() was not called"
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret().get_secret_value(),
            "scope": self._scope,
        }
        try:
            response = await self._client.post(
                self._url, data=form, headers={"accept": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise _TokenRequestFailed(f"{exc.__class__.__name__} ({exc})") from None
        return _parse_token_response(response)

    def _succeeded(self, token: SecretStr, expires_in: float, sent_at: float) -> None:
        # The lifetime counts from when the request was sent, which errs on the early side.
        self._token = _Token(
            authorization=b"Bearer " + token.get_secret_value().encode("ascii"),
            fingerprint=fingerprint(token),
            usable_until=sent_at + self._policy.usable_for(expires_in),
        )
        refresh_after = self._policy.refresh_after(expires_in)
        self._next_attempt = sent_at + refresh_after
        self._failures = 0
        self._problem = "the OAuth token expired before a new one arrived"
        self.refreshes += 1
        metrics.CREDENTIAL_REFRESHES.labels(outcome="success").inc()
        logger.info(
            "OAuth token obtained for client %s: fingerprint %s, expires in %.0f s, "
            "replaced in %.0f s",
            self._client_id,
            self._token.fingerprint,
            expires_in,
            refresh_after,
        )

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self.refresh_failures += 1
        metrics.CREDENTIAL_REFRESHES.labels(outcome="failure").inc()
        delay = self._policy.retry_delay(self._failures, self._jitter())
        self._next_attempt = self._clock() + delay
        self._problem = f"the OAuth token request to {self._url} failed: {reason}"
        token = self._usable_token()
        consequence = (
            f"the token with fingerprint {token.fingerprint} is sent meanwhile"
            if token is not None
            else "requests get 503 ProxyCredentialUnavailable meanwhile"
        )
        logger.log(
            logging.WARNING if token is not None else logging.ERROR,
            "OAuth token request to %s failed: %s; retrying in %.1f s (failure %d in a row), %s",
            self._url,
            reason,
            delay,
            self._failures,
            consequence,
        )

    def _client_secret(self) -> SecretStr:
        if isinstance(self._secret, SecretStr):
            return self._secret
        if self._secret.read():
            self.reloads += 1
        return self._secret.value


def _parse_token_response(response: httpx.Response) -> tuple[SecretStr, float]:
    """Parse the access token and its lifetime in seconds; messages never quote the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        code = f" ({error})" if isinstance(error, str) and _ERROR_CODE.fullmatch(error) else ""
        raise _TokenRequestFailed(f"HTTP {response.status_code}{code}")
    if not isinstance(body, dict):
        raise _TokenRequestFailed("the response is not a JSON object")

    token = body.get("access_token")
    if not isinstance(token, str) or not token or not is_header_safe(token):
        raise _TokenRequestFailed("the response has no usable access_token")
    token_type = body.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise _TokenRequestFailed("the response's token_type is not Bearer")
    expires_in = body.get("expires_in")
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        raise _TokenRequestFailed("the response has no positive expires_in")
    # Python's json module reads NaN and Infinity, which no schedule can use.
    if not math.isfinite(expires_in) or expires_in <= 0:
        raise _TokenRequestFailed("the response has no positive expires_in")
    return SecretStr(token), float(expires_in)


def _tls_context(settings: Settings) -> ssl.SSLContext:
    """Verify the token endpoint with `ca_bundle` when set, as the upstream is, else certifi."""
    if settings.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(settings.ca_bundle))
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _egress_proxy(settings: Settings, url: str) -> str | None:
    """Return the outbound proxy for the token endpoint, by the rule used for the upstream."""
    if settings.egress_proxy is not None:
        return settings.egress_proxy or None
    target = httpx.URL(url)
    if urllib.request.proxy_bypass(target.host):
        return None
    return urllib.request.getproxies_environment().get(target.scheme)
