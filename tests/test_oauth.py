"""OAuth2 client credentials, through real sockets.

The proxy runs under uvicorn on loopback with a stand-in identity server as its
token endpoint and a stand-in upstream that accepts only the token issued last.
Expiry is tested with a fake clock that the proxy and the identity server share.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from nexus_proxy.credentials import build_credential, fingerprint
from nexus_proxy.errors import ConfigError
from nexus_proxy.oauth import TOKEN_URLS, ClientCredentials, RefreshPolicy, token_url
from nexus_proxy.settings import Settings
from tests.conftest import RunningProxy, serve_proxy
from tests.identity import (
    CLIENT_ID,
    CLIENT_SECRET,
    UNAUTHORIZED_BODY,
    ScriptedResponse,
    StandInIdentity,
    accepting_upstream,
)
from tests.upstream import Reply, StandInUpstream

# Retries within milliseconds, and no pause between token requests.
FAST = RefreshPolicy(min_interval=0.0, retry_initial=0.01, retry_max=0.05)
CONCURRENT_REQUESTS = 20


class FakeClock:
    """A monotonic clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def identity() -> Iterator[StandInIdentity]:
    with StandInIdentity() as server:
        yield server


def oauth_table(url: str, **overrides: Any) -> dict[str, Any]:
    table = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": url}
    table.update(overrides)
    return table


def start_proxy(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    url: str,
    *,
    clock: Callable[[], float] | None = None,
    **oauth: Any,
) -> tuple[RunningProxy, ClientCredentials]:
    """Serve a proxy whose credential uses the fast retry policy and `clock`."""
    settings = Settings(upstream_url=upstream.url, oauth=oauth_table(url, **oauth), egress_proxy="")
    credential = ClientCredentials.from_settings(
        settings, policy=FAST, clock=clock or time.monotonic
    )
    running = make_proxy(
        upstream.url, credential=credential, api_key=None, oauth=oauth_table(url, **oauth)
    )
    return running, credential


def authorizations(upstream: StandInUpstream) -> list[str]:
    return [request.header("authorization")[0] for request in upstream.requests]


def get_all(url: str, count: int) -> list[httpx.Response]:
    """Send `count` GET requests at once, each on its own connection."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: httpx.get(url, timeout=10), range(count)))


def fingerprint_of(token: str) -> str:
    return fingerprint(SecretStr(token))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Startup and the token request.


@pytest.mark.timeout(10)
def test_oauth_sends_issued_token(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, identity: StandInIdentity
) -> None:
    upstream.reply_with(accepting_upstream(identity))
    running, _ = start_proxy(make_proxy, upstream, identity.url)

    response = httpx.get(running.url + "/customer")

    assert response.status_code == 200
    assert authorizations(upstream) == [f"Bearer {identity.issued[0]}"]


@pytest.mark.timeout(10)
def test_oauth_token_request_is_form_encoded(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, identity: StandInIdentity
) -> None:
    start_proxy(make_proxy, upstream, identity.url, scope="api1 extra")

    [request] = identity.wait_for_requests(1)

    assert request.method == "POST"
    assert request.content_type == "application/x-www-form-urlencoded"
    assert request.form == {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "scope": "api1 extra",
    }


@pytest.mark.timeout(10)
def test_oauth_token_fetched_once_at_startup(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, identity: StandInIdentity
) -> None:
    upstream.reply_with(accepting_upstream(identity))
    running, credential = start_proxy(make_proxy, upstream, identity.url)

    assert len(identity.requests) == 1
    for _ in range(3):
        assert httpx.get(running.url + "/customer").status_code == 200
    assert len(identity.requests) == 1
    assert credential.refreshes == 1


@pytest.mark.timeout(10)
def test_oauth_client_secret_file_stripped_and_reread(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    tmp_path: Path,
) -> None:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(f"  {CLIENT_SECRET}\n")
    upstream.reply_with(accepting_upstream(identity))
    running, _ = start_proxy(
        make_proxy, upstream, identity.url, client_secret=None, client_secret_file=secret_file
    )
    secret_file.write_text("cs-rotated-51ab\n")
    identity.client_secret = "cs-rotated-51ab"
    identity.revoke()

    response = httpx.get(running.url + "/customer")

    assert response.status_code == 200
    assert [request.form["client_secret"] for request in identity.requests] == [
        CLIENT_SECRET,
        "cs-rotated-51ab",
    ]


# Refresh before expiry.


@pytest.mark.timeout(15)
def test_oauth_refresh_before_expiry_one_request(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream
) -> None:
    clock = FakeClock()
    with StandInIdentity(expires_in=1000, clock=clock) as identity:
        upstream.reply_with(accepting_upstream(identity))
        running, credential = start_proxy(make_proxy, upstream, identity.url, clock=clock)
        identity.hold()
        clock.advance(850)  # past 80% of 1000 s, still well before expiry

        early = get_all(running.url + "/customer", CONCURRENT_REQUESTS)
        identity.wait_for_requests(2)
        identity.release()
        identity.wait_until(lambda: len(identity.issued) == 2)
        late = get_all(running.url + "/customer", CONCURRENT_REQUESTS)

    assert [response.status_code for response in early] == [200] * CONCURRENT_REQUESTS
    assert [response.status_code for response in late] == [200] * CONCURRENT_REQUESTS
    assert len(identity.requests) == 2
    assert credential.fingerprint == fingerprint_of(identity.issued[1])


@pytest.mark.timeout(15)
def test_oauth_expired_token_waits_for_one_refresh(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream
) -> None:
    clock = FakeClock()
    with StandInIdentity(expires_in=1000, clock=clock) as identity:
        upstream.reply_with(accepting_upstream(identity))
        running, _ = start_proxy(make_proxy, upstream, identity.url, clock=clock)
        identity.hold()
        clock.advance(1000)  # the first token has expired

        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            futures = [
                pool.submit(httpx.get, running.url + "/customer", timeout=10)
                for _ in range(CONCURRENT_REQUESTS)
            ]
            identity.wait_for_requests(2)
            forwarded_while_held = len(upstream.requests)
            identity.release()
            responses = [future.result() for future in futures]

    assert forwarded_while_held == 0
    assert [response.status_code for response in responses] == [200] * CONCURRENT_REQUESTS
    assert len(identity.requests) == 2
    assert set(authorizations(upstream)) == {f"Bearer {identity.issued[1]}"}


@pytest.mark.parametrize(
    ("expires_in", "refresh_after", "usable_for"),
    [
        pytest.param(3600, 2880, 3590, id="hour"),
        pytest.param(300, 240, 290, id="five-minutes"),
        pytest.param(60, 30, 54, id="minute"),
        pytest.param(10, 5, 9, id="ten-seconds"),
    ],
)
def test_refresh_policy_schedule(
    expires_in: float, refresh_after: float, usable_for: float
) -> None:
    policy = RefreshPolicy()

    assert policy.refresh_after(expires_in) == pytest.approx(refresh_after)
    assert policy.usable_for(expires_in) == pytest.approx(usable_for)


def test_retry_delay_doubles_with_jitter_and_cap() -> None:
    policy = RefreshPolicy(min_interval=0.0, retry_initial=1.0, retry_max=60.0)

    shortest = [policy.retry_delay(failures, 0.0) for failures in range(1, 9)]
    longest = [policy.retry_delay(failures, 1.0) for failures in range(1, 9)]

    assert shortest == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert longest == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert policy.retry_delay(10_000, 0.5) == 45.0


def test_retry_delay_stays_under_endpoint_limit() -> None:
    policy = RefreshPolicy()
    elapsed, attempts, failures = 0.0, 1, 0
    while True:
        failures += 1
        elapsed += policy.retry_delay(failures, 0.0)  # the shortest delays jitter allows
        if elapsed >= 60:
            break
        attempts += 1

    assert attempts <= 30


# Outage and recovery.


@pytest.mark.timeout(10)
def test_oauth_outage_503_then_recovers(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    identity.fail_always(ScriptedResponse(503))
    upstream.reply_with(accepting_upstream(identity))
    running, credential = start_proxy(make_proxy, upstream, identity.url)

    failed = httpx.get(running.url + "/customer")
    identity.wait_for_requests(4)  # retried in the background
    identity.fail_always(None)
    identity.wait_until(lambda: bool(identity.issued))
    recovered = httpx.get(running.url + "/customer")

    assert failed.status_code == 503
    assert failed.json()["errors"] == ["ProxyCredentialUnavailable"]
    assert failed.json()["values"]["upstreamReached"] is False
    assert recovered.status_code == 200
    assert authorizations(upstream) == [f"Bearer {identity.issued[0]}"]
    assert credential.refresh_failures >= 3
    assert "OAuth token request to" in caplog.text
    assert "HTTP 503 (temporarily_unavailable)" in caplog.text


@pytest.mark.timeout(10)
def test_oauth_starts_with_endpoint_down(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/connect/token"
    running, credential = start_proxy(make_proxy, upstream, url)

    failed = httpx.get(running.url + "/customer")
    with StandInIdentity(port=port) as identity:
        upstream.reply_with(accepting_upstream(identity))
        identity.wait_until(lambda: bool(identity.issued))
        recovered = httpx.get(running.url + "/customer")

    assert failed.status_code == 503
    assert failed.json()["errors"] == ["ProxyCredentialUnavailable"]
    assert upstream.requests[0].header("authorization") == [f"Bearer {identity.issued[0]}"]
    assert recovered.status_code == 200
    assert credential.refreshes == 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("scripted", "reason"),
    [
        pytest.param(
            ScriptedResponse(
                200, b'{"token_type": "Bearer", "expires_in": 60, "note": "SENTINEL"}'
            ),
            "no usable access_token",
            id="no-token",
        ),
        pytest.param(
            ScriptedResponse(200, b'{"access_token": "has space SENTINEL", "expires_in": 60}'),
            "no usable access_token",
            id="token-with-space",
        ),
        pytest.param(
            ScriptedResponse(
                200, b'{"access_token": "SENTINEL", "token_type": "mac", "expires_in": 60}'
            ),
            "token_type is not Bearer",
            id="not-bearer",
        ),
        pytest.param(
            ScriptedResponse(200, b'{"access_token": "SENTINEL", "token_type": "Bearer"}'),
            "no positive expires_in",
            id="no-expiry",
        ),
        pytest.param(
            ScriptedResponse(200, b'{"access_token": "SENTINEL", "expires_in": 0}'),
            "no positive expires_in",
            id="zero-expiry",
        ),
        pytest.param(
            ScriptedResponse(200, b'{"access_token": "SENTINEL", "expires_in": NaN}'),
            "no positive expires_in",
            id="nan-expiry",
        ),
        pytest.param(
            ScriptedResponse(200, b"SENTINEL, not JSON"), "not a JSON object", id="not-json"
        ),
        pytest.param(
            ScriptedResponse(400, b'{"error": "invalid_client", "error_description": "SENTINEL"}'),
            "HTTP 400 (invalid_client)",
            id="invalid-client",
        ),
        pytest.param(ScriptedResponse(500, b"SENTINEL"), "HTTP 500", id="server-error"),
    ],
)
def test_oauth_unusable_response_rejected(
    scripted: ScriptedResponse,
    reason: str,
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    identity.fail_always(scripted)
    running, credential = start_proxy(make_proxy, upstream, identity.url)

    response = httpx.get(running.url + "/customer")

    assert response.status_code == 503
    assert upstream.requests == []
    assert credential.fingerprint is None
    assert reason in caplog.text
    assert "SENTINEL" not in caplog.text
    assert reason in (credential.unavailable_reason() or "")


# An upstream 401.


@pytest.mark.timeout(10)
def test_oauth_401_refreshes_and_repeats_get(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.reply_with(accepting_upstream(identity))
    running, credential = start_proxy(make_proxy, upstream, identity.url)
    identity.revoke()

    response = httpx.get(running.url + "/customer")

    assert response.status_code == 200
    assert authorizations(upstream) == [
        f"Bearer {identity.issued[0]}",
        f"Bearer {identity.issued[1]}",
    ]
    assert len(identity.requests) == 2
    assert credential.unauthorized == 1
    rejected = fingerprint_of(identity.issued[0])
    assert f"401 Unauthorized for the OAuth token with fingerprint {rejected}" in caplog.text


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("method", "body", "repeated"),
    [
        pytest.param("GET", None, True, id="get"),
        pytest.param("HEAD", None, True, id="head"),
        pytest.param("OPTIONS", None, True, id="options"),
        pytest.param("GET", b"{}", False, id="get-with-body"),
        pytest.param("DELETE", None, False, id="delete"),
        pytest.param("PUT", None, False, id="put-without-body"),
        pytest.param("POST", b'{"amount": "14729.80374332"}', False, id="post"),
    ],
)
def test_oauth_401_repeat_rules(
    method: str,
    body: bytes | None,
    repeated: bool,
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
) -> None:
    upstream.reply_with(accepting_upstream(identity))
    running, _ = start_proxy(make_proxy, upstream, identity.url)
    identity.revoke()

    response = httpx.request(method, running.url + "/token/payments", content=body)
    after = httpx.get(running.url + "/customer")

    assert len(identity.requests) == 2  # the 401 dropped the token and fetched a new one
    assert response.status_code == (200 if repeated else 401)
    assert len(upstream.requests) == (3 if repeated else 2)
    if not repeated and method != "HEAD":
        assert response.content == UNAUTHORIZED_BODY
    assert after.status_code == 200
    assert upstream.requests[-1].header("authorization") == [f"Bearer {identity.issued[1]}"]


@pytest.mark.timeout(10)
def test_oauth_401_without_new_token_relays_401(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, identity: StandInIdentity
) -> None:
    upstream.reply_with(accepting_upstream(identity))
    running, _ = start_proxy(make_proxy, upstream, identity.url)
    identity.revoke()
    identity.fail_always(ScriptedResponse(503))

    response = httpx.get(running.url + "/customer")

    # The request did reach the upstream: its own 401 tells the client so, where a
    # 503 with upstreamReached false would invite a blind retry.
    assert response.status_code == 401
    assert response.content == UNAUTHORIZED_BODY
    assert len(upstream.requests) == 1


@pytest.mark.timeout(10)
def test_oauth_401_repeated_only_once(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, identity: StandInIdentity
) -> None:
    upstream.reply_with(Reply(status=401, body=UNAUTHORIZED_BODY))
    running, _ = start_proxy(make_proxy, upstream, identity.url)

    response = httpx.get(running.url + "/customer")

    assert response.status_code == 401
    assert response.content == UNAUTHORIZED_BODY
    assert len(upstream.requests) == 2
    assert len(identity.requests) == 2


@pytest.mark.timeout(10)
def test_oauth_401_warnings_rate_limited(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.reply_with(Reply(status=401, body=UNAUTHORIZED_BODY))
    running, credential = start_proxy(make_proxy, upstream, identity.url)

    for _ in range(3):
        httpx.post(running.url + "/token/payments", content=b"{}")

    assert credential.unauthorized == 3
    assert caplog.text.count("401 Unauthorized for the OAuth token") == 1


# Secret hygiene and configuration.


@pytest.mark.timeout(10)
def test_oauth_logs_no_secret_or_token(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.reply_with(accepting_upstream(identity))
    running, credential = start_proxy(make_proxy, upstream, identity.url)
    identity.revoke()
    httpx.get(running.url + "/customer")
    credential.reload()
    identity.wait_for_requests(3)

    assert len(identity.issued) >= 2
    assert CLIENT_SECRET not in caplog.text
    for token in identity.issued:
        assert token not in caplog.text
    assert fingerprint_of(identity.issued[0]) in caplog.text
    assert CLIENT_SECRET not in repr(credential)


@pytest.mark.timeout(10)
def test_oauth_reload_requests_new_token(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, identity: StandInIdentity
) -> None:
    upstream.reply_with(accepting_upstream(identity))
    running, _ = start_proxy(make_proxy, upstream, identity.url)

    running.app.credential.reload()
    identity.wait_until(lambda: len(identity.issued) == 2)
    response = httpx.get(running.url + "/customer")

    assert response.status_code == 200
    assert upstream.requests[0].header("authorization") == [f"Bearer {identity.issued[1]}"]


@pytest.mark.timeout(10)
def test_oauth_shutdown_cancels_token_request(upstream: StandInUpstream) -> None:
    with StandInIdentity() as identity:
        settings = Settings(upstream_url=upstream.url, oauth=oauth_table(identity.url))
        credential = ClientCredentials.from_settings(settings, policy=FAST)
        with serve_proxy(
            upstream.url, credential, api_key=None, oauth=oauth_table(identity.url)
        ) as running:
            identity.hold()
            running.app.credential.reload()
            identity.wait_for_requests(2)
        # Leaving serve_proxy asserts that the proxy stopped while the response was held.


@pytest.mark.timeout(10)
def test_oauth_ignores_proxy_environment(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    identity: StandInIdentity,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("HTTP_PROXY", closed)
    monkeypatch.setenv("ALL_PROXY", closed)
    upstream.reply_with(accepting_upstream(identity))

    running, _ = start_proxy(make_proxy, upstream, identity.url)

    assert httpx.get(running.url + "/customer", trust_env=False).status_code == 200


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        pytest.param({"environment": "test"}, TOKEN_URLS["test"], id="test"),
        pytest.param({"environment": "production"}, TOKEN_URLS["production"], id="production"),
        pytest.param(
            {"environment": "dcts", "token_url": "http://127.0.0.1:9/connect/token"},
            "http://127.0.0.1:9/connect/token",
            id="explicit",
        ),
    ],
)
def test_token_url_defaults(settings: dict[str, Any], expected: str) -> None:
    url = settings.pop("token_url", None)
    oauth = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": url}

    assert token_url(Settings(oauth=oauth, **settings)) == expected


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"environment": "dcts"}, id="dcts"),
        pytest.param({"upstream_url": "http://127.0.0.1:9"}, id="custom-upstream"),
    ],
)
def test_token_url_required(settings: dict[str, Any]) -> None:
    oauth = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}

    with pytest.raises(ConfigError, match=r"oauth\.token_url"):
        build_credential(Settings(oauth=oauth, **settings))


def test_oauth_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_PROXY_OAUTH__CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("NEXUS_PROXY_OAUTH__CLIENT_SECRET", CLIENT_SECRET)

    credential = build_credential(Settings.load([]))

    assert credential.kind == "oauth"
    assert credential.fingerprints() == {"oauth.client_secret": fingerprint_of(CLIENT_SECRET)}
    assert credential.fingerprint is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [pytest.param(" \n", "empty", id="blank"), pytest.param(b"\xff\xfe", "UTF-8", id="binary")],
)
def test_oauth_unusable_secret_file(content: str | bytes, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "client_secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    oauth = {
        "client_id": CLIENT_ID,
        "client_secret_file": path,
        "token_url": "http://127.0.0.1:9/t",
    }

    with pytest.raises(ConfigError, match=problem):
        build_credential(Settings(oauth=oauth))


def test_oauth_build_contacts_nothing(identity: StandInIdentity) -> None:
    build_credential(Settings(oauth=oauth_table(identity.url)))

    assert identity.requests == []


def test_oauth_rejects_empty_client_id() -> None:
    oauth = {"client_id": " ", "client_secret": CLIENT_SECRET, "token_url": "http://127.0.0.1:9/t"}

    with pytest.raises(ConfigError, match=r"oauth\.client_id"):
        build_credential(Settings(oauth=oauth))
