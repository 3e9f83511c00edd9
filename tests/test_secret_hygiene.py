"""No secret leaves the proxy: not in logs, output, responses, errors or reprs.

The secrets are the Nexus key and two access tokens (and an OAuth client secret for
the command line). Every error path runs with every logger at DEBUG, and each check
looks for the secrets in all the text that path produced.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nexus_proxy import secretfile
from nexus_proxy.errors import ConfigError
from nexus_proxy.settings import Settings, describe
from tests.conftest import KEY, PROXY_VARS, RunningProxy, raw_exchange, serve_proxy
from tests.upstream import RecordedRequest, Reply, StandInUpstream

pytestmark = pytest.mark.timeout(30)

TOKENS = ("local-token-a1b2", "local-token-c3d4")
OAUTH_SECRET = "oauth-secret-5b6c"
SECRETS = (KEY, *TOKENS, OAUTH_SECRET)
LOGGERS = ("", "nexus_proxy", "nexus_proxy.access", "httpx", "httpcore", "uvicorn",
           "uvicorn.error", "uvicorn.access", "asyncio")  # fmt: skip
CONFIG_ERROR_EXIT = 2
CLI_TIMEOUT = 20.0
MODULE = (sys.executable, "-m", "nexus_proxy")
DEBUG_FLAGS = ("--log-level", "debug", "--log-format", "json", "--deny-paths", "/token/**")
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def _leaks(text: str | bytes) -> list[str]:
    """The secrets that occur in `text`."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return [secret for secret in SECRETS if secret in text]


def _log_everything(caplog: pytest.LogCaptureFixture) -> None:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)


def _captured(caplog: pytest.LogCaptureFixture) -> str:
    """The formatted log lines, and every attribute of every record, extras included."""
    records = "\n".join(repr(vars(record)) for record in caplog.records)
    return caplog.text + "\n" + records


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3})", response)
    return int(match[1]) if match else 0


def _request(method: str, target: str, *headers: str, body: bytes = b"") -> str:
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy.local", *headers, "", ""]
    return "\r\n".join(lines) + body.decode("latin-1")


# Error paths of a proxy served in this process


BEARER = "Authorization: Bearer {token}"
GET = _request("GET", "/customer", BEARER)

SCENARIOS = [
    pytest.param({}, Reply(), GET, 200, id="forwarded"),
    pytest.param({}, None, GET, 502, id="upstream-unreachable"),
    pytest.param({"read_timeout": 0.3}, Reply(fail="hang"), GET, 504, id="upstream-timeout"),
    pytest.param({}, Reply(fail="invalid"), GET, 502, id="upstream-invalid"),
    pytest.param({}, Reply(status=401), GET, 401, id="upstream-401"),
    pytest.param(
        {}, Reply(body=b"0123456789", fail="reset_mid_body", fail_after=4), GET, 200, id="reset"
    ),
    pytest.param({}, Reply(), _request("GET", "/customer"), 401, id="token-missing"),
    pytest.param(
        {}, Reply(), _request("GET", "/x", "Authorization: Bearer wrong"), 401, id="token-wrong"
    ),
    pytest.param(
        {}, Reply(), _request("GET", "/x", f"Authorization: Bearer {KEY}"), 401, id="token-is-key"
    ),
    pytest.param({}, Reply(), _request("GET", "/x", BEARER, BEARER), 401, id="token-twice"),
    pytest.param(
        {"read_only": True},
        Reply(),
        _request("POST", "/x", BEARER, "Content-Length: 0"),
        403,
        id="read-only",
    ),
    pytest.param(
        {"deny_paths": ["/token/**"]},
        Reply(),
        _request("GET", "/token/x", BEARER),
        403,
        id="deny-paths",
    ),
    pytest.param(
        {"deny_paths": ["/token/**"]},
        Reply(),
        _request("GET", "/a/../token", BEARER),
        400,
        id="ambiguous-path",
    ),
    pytest.param(
        {"max_body_size": 10},
        Reply(),
        _request("POST", "/x", BEARER, "Content-Length: 11"),
        413,
        id="declared-too-large",
    ),
    pytest.param(
        {"max_body_size": 10},
        Reply(),
        _request("POST", "/x", BEARER, "Transfer-Encoding: chunked", body=b"8\r\naaaaaaaa\r\n" * 2),
        413,
        id="chunked-too-large",
    ),
    pytest.param(
        {},
        Reply(),
        "GET http://127.0.0.1:9/x HTTP/1.1\r\nHost: p\r\n" + BEARER + "\r\n\r\n",
        400,
        id="absolute-target",
    ),
    pytest.param(
        {},
        Reply(),
        _request("POST", "/x", BEARER, "Transfer-Encoding: gzip, chunked"),
        400,
        id="bad-framing",
    ),
    pytest.param(
        {}, Reply(), "GET /x HTTP/1.1 junk\r\n" + BEARER + "\r\n\r\n", 400, id="parser-error"
    ),
    pytest.param(
        {"max_header_size": 1024},
        Reply(),
        _request("GET", "/x", BEARER, "X-Big: " + "a" * 2000),
        431,
        id="headers-too-large",
    ),
    pytest.param(
        {"client_header_timeout": 0.3},
        Reply(),
        "GET /x HTTP/1.1\r\n" + BEARER + "\r\n",
        408,
        id="header-timeout",
    ),
    pytest.param(
        {"client_body_timeout": 0.3},
        Reply(),
        _request("POST", "/x", BEARER, "Content-Length: 10", body=b"abc"),
        408,
        id="body-timeout",
    ),
    pytest.param({}, Reply(), _request("GET", "/_proxy/ready", BEARER), 200, id="ready"),
    pytest.param({}, Reply(), _request("GET", "/_proxy/ready"), 401, id="ready-no-token"),
    pytest.param({}, Reply(), _request("GET", "/_proxy/metrics", BEARER), 200, id="metrics"),
    pytest.param({}, Reply(), _request("GET", "/_proxy/metrics"), 401, id="metrics-no-token"),
    pytest.param({}, Reply(), _request("GET", "/_proxy/health"), 200, id="health"),
    pytest.param({}, Reply(), _request("GET", "/_proxy/other", BEARER), 404, id="admin-404"),
]


@pytest.mark.parametrize(("options", "reply", "request_text", "status"), SCENARIOS)
def test_hygiene_error_path(
    caplog: pytest.LogCaptureFixture,
    options: dict[str, Any],
    reply: Reply | None,
    request_text: str,
    status: int,
) -> None:
    _log_everything(caplog)
    with StandInUpstream() as gone:
        unreachable = gone.url
    request = request_text.format(token=TOKENS[0]).encode("latin-1")

    # The proxy stops before the checks, so that lines logged after the response
    # (the access line) are captured too.
    with StandInUpstream(reply) as upstream:
        url = upstream.url if reply is not None else unreachable
        with serve_proxy(url, access_tokens=list(TOKENS), log_level="debug", **options) as proxy:
            response = raw_exchange(proxy.port, request)

    assert _status(response) == status
    assert _leaks(response) == []
    assert _leaks(_captured(caplog)) == []


def test_hygiene_log_capture_sees_proxy_lines(
    upstream: StandInUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    # The checks above are only as good as the capture: it must see the proxy's lines.
    _log_everything(caplog)
    with serve_proxy(upstream.url, access_tokens=list(TOKENS), log_level="debug") as proxy:
        raw_exchange(proxy.port, _request("GET", "/x").encode())

    assert "access token missing" in caplog.text
    assert any(record.name == "nexus_proxy.access" for record in caplog.records)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(f"HTTP/1.1 200 OK\r\nx-echo authorization: Bearer {KEY}\r\n\r\n", id="header"),
        pytest.param(f"Bearer {KEY}\r\n\r\n", id="status-line"),
    ],
)
def test_hygiene_invalid_upstream_echo(caplog: pytest.LogCaptureFixture, raw: str) -> None:
    _log_everything(caplog)

    upstream = StandInUpstream(Reply(raw=raw.encode()))
    with upstream, serve_proxy(upstream.url, log_level="debug") as proxy:
        response = raw_exchange(proxy.port, _request("GET", "/customer").encode())

    # httpcore's DEBUG trace quotes upstream bytes too, but logs.configure_logging keeps
    # httpcore at WARNING, as test_cli_serve_debug_logs_hide_secrets checks.
    own = [record for record in caplog.records if not record.name.startswith("httpcore")]
    assert _status(response) == 502
    assert _leaks(response) == []
    assert _leaks("\n".join(repr(vars(record)) for record in own)) == []


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(("x-debug-authorization", f"Bearer {KEY}"), id="bearer"),
        pytest.param(("x-echo", KEY), id="bare"),
        pytest.param(("x-echo", f"prefix{KEY}suffix"), id="inside"),
        pytest.param(("set-cookie", f"session={KEY}; Path=/; HttpOnly"), id="cookie"),
        pytest.param(("location", f"http://127.0.0.1:9/next?key={KEY}"), id="location"),
        pytest.param(
            ("www-authenticate", f'Bearer error="invalid", token="{KEY}"'), id="challenge"
        ),
    ],
)
def test_redact_key_in_upstream_header(
    proxy: RunningProxy, upstream: StandInUpstream, header: tuple[str, str]
) -> None:
    upstream.reply_with(Reply(headers=[("content-type", "application/json"), header]))

    response = raw_exchange(proxy.port, _request("GET", "/customer").encode())

    assert _status(response) == 200
    assert f"\r\n{header[0]}: [redacted]\r\n".encode() in response.lower()
    assert b"content-type: application/json" in response.lower()
    assert KEY.encode() not in response


def test_redact_leaves_other_headers(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    upstream.reply_with(Reply(headers=[("content-type", "application/json"), ("x-id", "abc")]))

    response = raw_exchange(proxy.port, _request("GET", "/customer").encode())

    assert b"\r\nx-id: abc\r\n" in response.lower()


# Objects that hold secrets


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"api_key": KEY, "access_tokens": list(TOKENS)}, id="key-and-tokens"),
        pytest.param({"oauth": {"client_id": "client", "client_secret": OAUTH_SECRET}}, id="oauth"),
    ],
)
def test_settings_text_hides_secrets(options: dict[str, Any]) -> None:
    settings = Settings(upstream_url="http://127.0.0.1:9", **options)

    assert _leaks(repr(settings)) == []
    assert _leaks(str(settings)) == []
    assert _leaks(settings.model_dump_json()) == []
    assert _leaks(json.dumps(describe(settings, {}))) == []


def _existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(0o600)
    return path


INVALID_SETTINGS = [
    pytest.param(
        lambda path: {"api_key": KEY, "access_tokens": list(TOKENS), "port": -1}, id="port"
    ),
    pytest.param(lambda path: {"api_key": KEY, "api_key_file": path}, id="two-key-sources"),
    pytest.param(
        lambda path: {
            "api_key": KEY,
            "oauth": {"client_id": "c", "client_secret": OAUTH_SECRET},
        },
        id="key-and-oauth",
    ),
    pytest.param(
        lambda path: {
            "oauth": {"client_id": "c", "client_secret": OAUTH_SECRET, "client_secret_file": path}
        },
        id="two-oauth-sources",
    ),
    pytest.param(
        lambda path: {"oauth": {"client_id": "c", "client_secret": OAUTH_SECRET, "x": KEY}},
        id="oauth-unknown-key",
    ),
    pytest.param(lambda path: {"api_key": KEY, "unknown": KEY}, id="unknown-key"),
    pytest.param(lambda path: {"access_tokens": [TOKENS[0], {"a": TOKENS[1]}]}, id="token-type"),
    pytest.param(lambda path: {"api_key": [KEY]}, id="key-type"),
    pytest.param(lambda path: {"upstream_url": f"http://user:{KEY}@127.0.0.1:9"}, id="userinfo"),
    pytest.param(lambda path: {"egress_proxy": f"http://user:{KEY}@127.0.0.1:9"}, id="proxy-info"),
]


@pytest.mark.parametrize("build", INVALID_SETTINGS)
def test_validation_error_hides_secrets(
    tmp_path: Path, build: Callable[[Path], dict[str, Any]]
) -> None:
    options = {"upstream_url": "http://127.0.0.1:9", **build(_existing_file(tmp_path))}

    with pytest.raises(ValidationError) as caught:
        Settings(**options)

    assert _leaks(str(caught.value)) == []
    assert _leaks(repr(caught.value)) == []


def test_running_app_reprs_hide_secrets(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream
) -> None:
    proxy = make_proxy(upstream.url, access_tokens=list(TOKENS))
    app = proxy.app
    forwarder = app.forwarder
    objects = [
        app,
        app.settings,
        app.credential,
        app.transport,
        app.admin,
        forwarder,
        forwarder.credential,
        forwarder.gate,
        forwarder.gate.tokens,
        forwarder.gate.rules,
        forwarder.requests,
        forwarder.responses,
        proxy.settings,
    ]

    for item in objects:
        assert _leaks(repr(item)) == [], type(item).__name__
        assert _leaks(str(item)) == [], type(item).__name__


# The command line


def _environment(**variables: str) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NEXUS_PROXY_") and name.upper() not in PROXY_VARS
    }
    environment.update(variables)
    return environment


def _run(args: list[str], cwd: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODULE, *args],
        cwd=cwd,
        env=_environment(**variables),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=CLI_TIMEOUT,
        check=False,
    )


def _toml(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "nexus-proxy.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


TOML_SECRETS = f"""
upstream_url = "http://127.0.0.1:9"
api_key = "{KEY}"
access_tokens = ["{TOKENS[0]}", "{TOKENS[1]}"]
"""


def test_cli_check_env_hides_secrets(tmp_path: Path) -> None:
    result = _run(
        ["check", "--upstream-url", "http://127.0.0.1:9"],
        tmp_path,
        NEXUS_PROXY_API_KEY=KEY,
        NEXUS_PROXY_ACCESS_TOKENS=",".join(TOKENS),
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["access_tokens"] == 2
    assert _leaks(result.stdout + result.stderr) == []


def test_cli_check_toml_hides_secrets(tmp_path: Path) -> None:
    config = _toml(tmp_path, TOML_SECRETS)

    result = _run(["check", "--config", str(config)], tmp_path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["access_tokens"] == 2
    assert _leaks(result.stdout + result.stderr) == []


def test_cli_check_oauth_hides_secret(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'upstream_url = "http://127.0.0.1:9"\n[oauth]\nclient_id = "client"\n'
        f'client_secret = "{OAUTH_SECRET}"\ntoken_url = "http://127.0.0.1:9/connect/token"\n',
    )

    result = _run(["check", "--config", str(config)], tmp_path)

    assert _leaks(result.stdout + result.stderr) == []


CONFIG_ERRORS = [
    pytest.param([], TOML_SECRETS + "bogus = 1\n", {}, id="toml-unknown-key"),
    pytest.param([], TOML_SECRETS + "max_connections = 0\n", {}, id="toml-invalid-value"),
    pytest.param([], f'api_key = "{KEY}\n', {}, id="toml-syntax-on-secret-line"),
    pytest.param([], f"api_key = {KEY}\n", {}, id="toml-bare-secret"),
    pytest.param([], TOML_SECRETS + '[oauth]\nclient_id = "c"\n', {}, id="toml-key-and-oauth"),
    pytest.param(["--port", "99999"], None, {"NEXUS_PROXY_API_KEY": KEY}, id="invalid-port"),
    pytest.param(["--api-key", KEY], None, {}, id="key-flag"),
    pytest.param([f"--api-key={KEY}"], None, {}, id="key-flag-equals"),
    pytest.param([f"--api_key={KEY}"], None, {}, id="key-flag-underscore"),
    pytest.param([f"--access-tokens={TOKENS[0]}"], None, {}, id="tokens-flag"),
    pytest.param([f"--api-key-fil={KEY}"], None, {}, id="abbreviated-flag"),
    pytest.param(
        ["--upstream-url", f"http://user:{KEY}@127.0.0.1:9"], None, {}, id="userinfo-flag"
    ),
    pytest.param([], None, {"NEXUS_PROXY_API_KEY": f"{KEY} {TOKENS[0]}"}, id="key-with-space"),
    pytest.param(
        [],
        None,
        {"NEXUS_PROXY_API_KEY": KEY, "NEXUS_PROXY_ACCESS_TOKENS": f"{TOKENS[0]} {TOKENS[1]}"},
        id="token-with-space",
    ),
    pytest.param(
        [],
        None,
        {"NEXUS_PROXY_API_KEY": KEY, "NEXUS_PROXY_ACCESS_TOKENS": f'["{TOKENS[0]}", {TOKENS[1]}'},
        id="tokens-invalid-json",
    ),
    pytest.param(
        [],
        None,
        {"NEXUS_PROXY_API_KEY": KEY, "NEXUS_PROXY_OAUTH__CLIENT_SECRET": OAUTH_SECRET},
        id="key-and-oauth-secret",
    ),
    pytest.param(
        [],
        None,
        {"NEXUS_PROXY_API_KEY": KEY, "NEXUS_PROXY_ACCESS_TOKEN_FILE": "/nonexistent/tokens"},
        id="missing-token-file",
    ),
]


@pytest.mark.parametrize(("args", "toml", "variables"), CONFIG_ERRORS)
@pytest.mark.parametrize("command", [["check"], []], ids=["check", "serve"])
def test_cli_config_error_hides_secrets(
    tmp_path: Path,
    command: list[str],
    args: list[str],
    toml: str | None,
    variables: dict[str, str],
) -> None:
    if toml is not None:
        args = [*args, "--config", str(_toml(tmp_path, toml))]

    # Should a case be accepted after all, serve listens on loopback only, and _run ends it.
    upstream = ["--upstream-url", "http://127.0.0.1:9", "--port", "0"]
    result = _run([*command, *upstream, *args], tmp_path, **variables)

    assert result.returncode == CONFIG_ERROR_EXIT
    assert result.stderr.startswith("nexus-proxy: configuration error")
    assert _leaks(result.stdout + result.stderr) == []


def test_cli_remote_host_rejection_hides_secrets(tmp_path: Path) -> None:
    result = _run(
        ["--host", "0.0.0.0", "--port", "0", "--upstream-url", "http://127.0.0.1:9"],
        tmp_path,
        NEXUS_PROXY_API_KEY=KEY,
    )

    assert result.returncode == CONFIG_ERROR_EXIT
    assert _leaks(result.stdout + result.stderr) == []


def _answer(request: RecordedRequest) -> Reply:
    if request.target == b"/unauthorized":
        return Reply(status=401, headers=[("content-type", "application/json")])
    if request.target == b"/echo":
        return Reply(headers=[("x-echo", f"Bearer {KEY}")])
    return Reply()


def test_cli_serve_debug_logs_hide_secrets(tmp_path: Path) -> None:
    bearer = f"Authorization: Bearer {TOKENS[1]}"
    requests = [
        _request("GET", "/customer", bearer),
        _request("GET", "/unauthorized", bearer),
        _request("GET", "/echo", bearer),
        _request("GET", "/customer"),
        _request("GET", "/customer", f"Authorization: Bearer {KEY}"),
        _request("GET", "/token/payments", bearer),
        _request("GET", "/_proxy/ready", bearer),
        _request("GET", "/_proxy/metrics", bearer),
        "GET http://127.0.0.1:9/x HTTP/1.1\r\nHost: p\r\n" + bearer + "\r\n\r\n",
    ]
    with StandInUpstream(_answer) as upstream:
        process = subprocess.Popen(
            [*MODULE, "--upstream-url", upstream.url, "--port", "0", *DEBUG_FLAGS],
            cwd=tmp_path,
            env=_environment(NEXUS_PROXY_API_KEY=KEY, NEXUS_PROXY_ACCESS_TOKENS=",".join(TOKENS)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        lines: list[str] = []
        try:
            port = _wait_until_listening(process, lines)
            responses = [raw_exchange(port, request.encode()) for request in requests]
        finally:
            process.send_signal(signal.SIGTERM)
            rest, _ = process.communicate(timeout=CLI_TIMEOUT)
            lines.append(rest)

    assert [_status(response) for response in responses] == [
        200, 401, 200, 401, 401, 403, 200, 200, 400,
    ]  # fmt: skip
    assert all(_leaks(response) == [] for response in responses)
    assert _leaks("".join(lines)) == []


def _wait_until_listening(process: subprocess.Popen[str], lines: list[str]) -> int:
    """Read output lines until the proxy names its port; the test timeout bounds the wait."""
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        match = LISTENING.search(line)
        if match is not None:
            _connect_once(int(match[1]))
            return int(match[1])
    raise AssertionError(f"the proxy exited before listening: {lines}")


def _connect_once(port: int) -> None:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()


# Permissions of files that hold secrets


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601], ids=oct)
def test_secret_file_loose_mode_rejected(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKENS[0])
    path.chmod(mode)

    with pytest.raises(ConfigError) as caught:
        secretfile.read_secret_file(path, "access_token_file")

    assert f"chmod 600 {path}" in str(caught.value)
    assert "access_token_file" in str(caught.value)
    assert _leaks(str(caught.value)) == []


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700], ids=oct)
def test_secret_file_private_mode_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"  {TOKENS[0]}\n")
    path.chmod(mode)

    assert secretfile.read_secret_file(path, "access_token_file") == TOKENS[0]


def test_secret_file_loose_mode_allowed_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nexus_proxy")
    path = tmp_path / "tokens"
    path.write_text(TOKENS[0])
    path.chmod(0o644)

    text = secretfile.read_secret_file(path, "access_token_file", allow_insecure=True)

    assert text == TOKENS[0]
    assert str(path) in caplog.text
    assert "allow_insecure_permissions" in caplog.text
    assert _leaks(caplog.text) == []


def _loose_access_token_file(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    path = tmp_path / "tokens"
    path.write_text("\n".join(TOKENS))
    return [], {"NEXUS_PROXY_API_KEY": KEY, "NEXUS_PROXY_ACCESS_TOKEN_FILE": str(path)}, path


def _loose_api_key_file(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    path = tmp_path / "key"
    path.write_text(KEY)
    return ["--api-key-file", str(path)], {}, path


def _loose_toml(
    text: str, **variables: str
) -> Callable[[Path], tuple[list[str], dict[str, str], Path]]:
    def build(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
        path = tmp_path / "nexus-proxy.toml"
        path.write_text(text)
        return ["--config", str(path)], variables, path

    return build


def _loose_oauth_secret_file(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    path = tmp_path / "client-secret"
    path.write_text(OAUTH_SECRET)
    config = tmp_path / "nexus-proxy.toml"
    config.write_text(
        f'[oauth]\nclient_id = "client"\nclient_secret_file = "{path}"\n'
        'token_url = "http://127.0.0.1:9/connect/token"\n'
    )
    return ["--config", str(config)], {}, path


def _loose_toml_from_env(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    path = tmp_path / "nexus-proxy.toml"
    path.write_text(f'api_key = "{KEY}"\n')
    return [], {"NEXUS_PROXY_CONFIG": str(path)}, path


OAUTH_TOML = (
    f'[oauth]\nclient_id = "client"\nclient_secret = "{OAUTH_SECRET}"\n'
    'token_url = "http://127.0.0.1:9/connect/token"\n'
)

LOOSE_FILES = [
    pytest.param(_loose_access_token_file, id="access-token-file"),
    pytest.param(_loose_api_key_file, id="api-key-file"),
    pytest.param(_loose_toml(f'api_key = "{KEY}"\n'), id="toml-api-key"),
    pytest.param(
        _loose_toml(f'access_tokens = ["{TOKENS[0]}"]\n', NEXUS_PROXY_API_KEY=KEY),
        id="toml-access-tokens",
    ),
    pytest.param(_loose_toml(OAUTH_TOML), id="toml-oauth-secret"),
    pytest.param(_loose_toml_from_env, id="toml-from-env"),
    pytest.param(_loose_oauth_secret_file, id="oauth-client-secret-file"),
]


@pytest.mark.parametrize("build", LOOSE_FILES)
def test_cli_rejects_loose_secret_file(
    tmp_path: Path, build: Callable[[Path], tuple[list[str], dict[str, str], Path]]
) -> None:
    args, variables, path = build(tmp_path)
    path.chmod(0o644)

    result = _run(["check", "--upstream-url", "http://127.0.0.1:9", *args], tmp_path, **variables)

    assert result.returncode == CONFIG_ERROR_EXIT
    assert f"chmod 600 {path}" in result.stderr
    assert _leaks(result.stdout + result.stderr) == []


@pytest.mark.parametrize("build", LOOSE_FILES)
def test_cli_loose_secret_file_allowed_warns(
    tmp_path: Path, build: Callable[[Path], tuple[list[str], dict[str, str], Path]]
) -> None:
    args, variables, path = build(tmp_path)
    path.chmod(0o644)

    result = _run(
        ["check", "--upstream-url", "http://127.0.0.1:9", *args],
        tmp_path,
        NEXUS_PROXY_ALLOW_INSECURE_PERMISSIONS="true",
        **variables,
    )

    assert "chmod 600" not in result.stderr
    assert str(path) in result.stderr
    assert _leaks(result.stdout + result.stderr) == []


def test_cli_toml_without_secret_any_mode(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'upstream_url = "http://127.0.0.1:9"\nport = 8081\n', mode=0o644)

    result = _run(["check", "--config", str(config)], tmp_path, NEXUS_PROXY_API_KEY=KEY)

    assert result.returncode == 0, result.stderr
    assert "chmod" not in result.stderr
