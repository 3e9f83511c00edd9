"""Operations: admin endpoints, metrics, logs, request ids, shutdown, Unix socket, workers."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus_proxy.observe import FLUSH_INTERVAL
from tests.conftest import KEY, RunningProxy, raw_exchange
from tests.upstream import Reply, StandInUpstream

pytestmark = pytest.mark.timeout(30)

TOKEN = "local-token-7d2e"


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _metric(
    proxy_url: str, name: str, headers: dict[str, str] | None = None, **labels: str
) -> float:
    text = httpx.get(proxy_url + "/_proxy/metrics", headers=headers).text
    return _samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_is_ok_and_not_forwarded(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    response = httpx.get(proxy.url + "/_proxy/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert upstream.connections == 0


def test_unknown_admin_path_is_404_envelope(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    response = httpx.post(proxy.url + "/_proxy/customer")

    assert response.status_code == 404
    assert response.json()["errors"] == ["ProxyNotFound"]
    assert upstream.connections == 0


def test_ready_reports_credential(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, api_key_expires="2999-01-01")

    response = httpx.get(proxy.url + "/_proxy/ready")

    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "ready"
    assert body["environment"] == "test"
    assert body["upstream"] == upstream.url
    assert body["credential"] == "api_key"
    assert re.fullmatch("[0-9a-f]{8}", body["fingerprint"])
    assert body["apiKeyExpiresInDays"] > 300
    assert KEY not in response.text


class _SwitchableCredential:
    """A credential that a test can take away and give back."""

    kind = "api_key"
    fingerprint = "0badc0de"

    def __init__(self) -> None:
        self.available = True

    async def authorization(self) -> bytes:
        from nexus_proxy.credentials import CredentialUnavailable

        if not self.available:
            raise CredentialUnavailable("test credential withdrawn")
        return b"Bearer " + KEY.encode()

    async def rejected(self, authorization: bytes) -> bool:
        return False

    def unavailable_reason(self) -> str | None:
        return None if self.available else "test credential withdrawn"

    def fingerprints(self) -> dict[str, str]:
        return {"api_key": self.fingerprint}

    def expiry_days(self) -> int | None:
        return None

    def reload(self) -> None:
        pass

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_ready_flips_when_credential_goes(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    credential = _SwitchableCredential()
    proxy = make_proxy(upstream.url, credential=credential)

    before = httpx.get(proxy.url + "/_proxy/ready")
    credential.available = False
    during = httpx.get(proxy.url + "/_proxy/ready")
    forwarded = httpx.get(proxy.url + "/customer")
    credential.available = True
    after = httpx.get(proxy.url + "/_proxy/ready")

    assert before.status_code == 200
    assert during.status_code == 503
    assert during.json()["reason"] == "test credential withdrawn"
    assert forwarded.status_code == 503
    assert forwarded.json()["errors"] == ["ProxyCredentialUnavailable"]
    assert forwarded.json()["values"] == {"upstreamReached": False}
    assert after.status_code == 200
    assert len(upstream.requests) == 0


def test_admin_endpoints_need_token_except_health(
    upstream: StandInUpstream, make_proxy: Callable[..., RunningProxy]
) -> None:
    proxy = make_proxy(upstream.url, access_tokens=[TOKEN])
    auth = {"Authorization": f"Bearer {TOKEN}"}

    assert httpx.get(proxy.url + "/_proxy/health").status_code == 200
    assert httpx.get(proxy.url + "/_proxy/ready").status_code == 401
    assert httpx.get(proxy.url + "/_proxy/metrics").status_code == 401
    assert httpx.get(proxy.url + "/_proxy/ready", headers=auth).status_code == 200
    assert httpx.get(proxy.url + "/_proxy/metrics", headers=auth).status_code == 200


def test_metrics_after_known_requests(proxy: RunningProxy, upstream: StandInUpstream) -> None:
    requests_ok = ("nexus_proxy_requests_total", {"method": "GET", "status": "200"})
    created = ("nexus_proxy_requests_total", {"method": "POST", "status": "201"})
    before_ok = _metric(proxy.url, requests_ok[0], **requests_ok[1])
    before_created = _metric(proxy.url, created[0], **created[1])
    before_in = _metric(proxy.url, "nexus_proxy_request_bytes_total")
    before_out = _metric(proxy.url, "nexus_proxy_response_bytes_total")
    before_401 = _metric(proxy.url, "nexus_proxy_upstream_unauthorized_total")
    before_timeouts = _metric(proxy.url, "nexus_proxy_errors_total", code="ProxyBadRequest")

    for _ in range(3):
        httpx.get(proxy.url + "/customer")
    upstream.reply_with(Reply(status=201, body=b"{}"))
    httpx.post(proxy.url + "/customer", content=b"0123456789")
    upstream.reply_with(Reply(status=401, body=b"{}"))
    httpx.get(proxy.url + "/customer")
    raw_exchange(proxy.port, b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n")

    body_size = len(Reply().body)
    assert _metric(proxy.url, requests_ok[0], **requests_ok[1]) - before_ok == 3
    assert _metric(proxy.url, created[0], **created[1]) - before_created == 1
    assert _metric(proxy.url, "nexus_proxy_request_bytes_total") - before_in == 10
    assert _metric(proxy.url, "nexus_proxy_response_bytes_total") - before_out == 3 * body_size + 4
    assert _metric(proxy.url, "nexus_proxy_upstream_unauthorized_total") - before_401 == 1
    assert (
        _metric(proxy.url, "nexus_proxy_errors_total", code="ProxyBadRequest") - before_timeouts
        == 1
    )


def test_metrics_count_protocol_rejections(proxy: RunningProxy) -> None:
    # The server protocol rejects this framing before any request reaches the app.
    before = _metric(proxy.url, "nexus_proxy_errors_total", code="ProxyBadRequest")
    head = b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"

    response = raw_exchange(proxy.port, head + b"3\r\nabc\r\n0\r\n\r\n")

    assert response.startswith(b"HTTP/1.1 400 ")
    assert _metric(proxy.url, "nexus_proxy_errors_total", code="ProxyBadRequest") == before + 1


def test_metrics_list_every_family(proxy: RunningProxy) -> None:
    httpx.get(proxy.url + "/customer")

    names = {
        family.name
        for family in text_string_to_metric_families(httpx.get(proxy.url + "/_proxy/metrics").text)
    }

    assert names >= {
        "nexus_proxy_requests",
        "nexus_proxy_request_duration_seconds",
        "nexus_proxy_upstream_duration_seconds",
        "nexus_proxy_errors",
        "nexus_proxy_in_flight_requests",
        "nexus_proxy_request_bytes",
        "nexus_proxy_response_bytes",
        "nexus_proxy_upstream_unauthorized",
        "nexus_proxy_credential_reloads",
        "nexus_proxy_credential_refreshes",
        "nexus_proxy_api_key_expiry_seconds",
    }


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param("abc-123", True, id="sane"),
        pytest.param("x" * 128, True, id="max-length"),
        pytest.param("x" * 129, False, id="too-long"),
        pytest.param("has space", False, id="space"),
        pytest.param(None, False, id="absent"),
    ],
)
def test_request_id_propagates(
    proxy: RunningProxy, upstream: StandInUpstream, sent: str | None, kept: bool
) -> None:
    headers = {"X-Request-ID": sent} if sent is not None else {}
    upstream.reply_with(Reply(headers=[("X-Request-ID", "upstream-made")]))

    response = httpx.get(proxy.url + "/customer", headers=headers)

    returned = response.headers.get_list("x-request-id")
    assert len(returned) == 1
    assert upstream.requests[-1].header("x-request-id") == returned
    if kept:
        assert returned == [sent]
    else:
        assert re.fullmatch("[0-9a-f]{32}", returned[0])


def test_request_id_on_proxy_errors(make_proxy: Callable[..., RunningProxy]) -> None:
    proxy = make_proxy("http://127.0.0.1:9")

    response = httpx.get(proxy.url + "/customer", headers={"X-Request-ID": "req-42"})

    assert response.status_code == 502
    assert response.headers["x-request-id"] == "req-42"


class _AccessRecords(logging.Handler):
    """Collects access log records, which the proxy writes after the last response byte."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.arrived:
            self.records.append(record)
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 5) -> list[logging.LogRecord]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.records) >= count, timeout)
            return list(self.records)


@pytest.fixture
def access_records() -> Iterator[_AccessRecords]:
    """The access log records written while the test runs."""
    handler = _AccessRecords()
    access_logger = logging.getLogger("nexus_proxy.access")
    previous = access_logger.level
    access_logger.setLevel(logging.INFO)
    access_logger.addHandler(handler)
    try:
        yield handler
    finally:
        access_logger.removeHandler(handler)
        access_logger.setLevel(previous)


def test_access_log_line_fields(proxy: RunningProxy, access_records: _AccessRecords) -> None:
    httpx.post(
        proxy.url + "/customer?email=secret%40x.com",
        content=b"12345",
        headers={"X-Request-ID": "req-7"},
    )

    records = access_records.wait_for(1)
    assert len(records) == 1
    record = records[0]
    assert record.method == "POST"  # type: ignore[attr-defined]
    assert record.path == "/customer"  # type: ignore[attr-defined]
    assert record.status == 200  # type: ignore[attr-defined]
    assert record.bytes_in == 5  # type: ignore[attr-defined]
    assert record.bytes_out == len(Reply().body)  # type: ignore[attr-defined]
    assert record.upstream_ms is not None  # type: ignore[attr-defined]
    assert record.request_id == "req-7"  # type: ignore[attr-defined]
    assert "secret" not in record.getMessage()


def test_access_log_can_be_turned_off(
    upstream: StandInUpstream,
    make_proxy: Callable[..., RunningProxy],
    access_records: _AccessRecords,
) -> None:
    quiet = make_proxy(upstream.url, access_log=False)
    loud = make_proxy(upstream.url)

    httpx.get(quiet.url + "/customer")
    httpx.get(loud.url + "/marker")

    # The loud proxy's line arrives; had the quiet one logged, its line would be first.
    records = access_records.wait_for(1)
    assert [r.path for r in records] == ["/marker"]  # type: ignore[attr-defined]


# Processes: the command line as an operator runs it.


class ProxyProcess:
    """`nexus-proxy` in a subprocess, with its stderr read line by line."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nexus_proxy", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.address = ""
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"listening on (\S+?),", line)
            if match:
                self.address = match.group(1)
                self.listening.set()

    def wait_listening(self) -> str:
        assert self.listening.wait(15), "".join(self.lines)
        return self.address

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.reader.join(5)
            assert self.process.stderr is not None
            self.process.stderr.close()


@contextmanager
def run_proxy(upstream_url: str, *args: str, **env: str) -> Iterator[ProxyProcess]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NEXUS_PROXY_") and "PROXY" not in name.upper()
    }
    environment.update({"NEXUS_PROXY_API_KEY": KEY, **env})
    process = ProxyProcess(["--upstream-url", upstream_url, *args], environment)
    try:
        yield process
    finally:
        process.stop()


def test_json_logs_are_one_object_per_line(upstream: StandInUpstream) -> None:
    with run_proxy(upstream.url, "--port", "0", "--log-format", "json") as proxy:
        url = proxy.wait_listening()
        httpx.get(url + "/customer?page=1", headers={"X-Request-ID": "req-json"})
        assert proxy.stop() == 0

    entries = [json.loads(line) for line in proxy.lines]
    access = [e for e in entries if e["logger"] == "nexus_proxy.access"]
    assert {e["logger"] for e in entries} >= {"nexus_proxy", "uvicorn.error", "nexus_proxy.access"}
    assert len(access) == 1
    assert access[0]["request_id"] == "req-json"
    assert access[0]["path"] == "/customer"
    assert access[0]["status"] == 200
    assert all(KEY not in line for line in proxy.lines)
    assert all("page=1" not in line for line in proxy.lines)


def test_text_logs_name_request_id(upstream: StandInUpstream) -> None:
    with run_proxy(upstream.url, "--port", "0") as proxy:
        url = proxy.wait_listening()
        httpx.get(url + "/customer?page=1", headers={"X-Request-ID": "req-text"})
        assert proxy.stop() == 0

    access = [line for line in proxy.lines if "nexus_proxy.access" in line]
    assert len(access) == 1
    assert "[req-text]" in access[0]
    assert "GET /customer 200" in access[0]
    assert all(KEY not in line for line in proxy.lines)


def test_graceful_shutdown_finishes_request(upstream: StandInUpstream) -> None:
    upstream.reply_with(lambda request: Reply(head_delay=1.0))
    results: list[httpx.Response] = []

    with run_proxy(upstream.url, "--port", "0", "--shutdown-timeout", "10") as proxy:
        url = proxy.wait_listening()
        client = threading.Thread(
            target=lambda: results.append(httpx.get(url + "/token/envelope/1", timeout=10))
        )
        client.start()
        upstream.wait_for_requests(1)
        proxy.process.send_signal(signal.SIGTERM)
        client.join(10)
        status = proxy.stop()

    assert status == 0
    assert [r.status_code for r in results] == [200]


def test_unix_socket_mode(upstream: StandInUpstream, tmp_path: Path) -> None:
    path = tmp_path / "proxy.sock"

    with run_proxy(upstream.url, "--unix-socket", str(path)) as proxy:
        assert proxy.wait_listening() == f"unix:{path}"
        mode = stat.S_IMODE(path.stat().st_mode)
        transport = httpx.HTTPTransport(uds=str(path))
        with httpx.Client(transport=transport) as client:
            response = client.get("http://proxy/customer")
        assert proxy.stop() == 0

    assert mode == 0o600
    assert response.status_code == 200
    assert upstream.requests[-1].header("authorization") == [f"Bearer {KEY}"]
    assert not path.exists()


GET_200 = ("nexus_proxy_requests_total", (("method", "GET"), ("status", "200")))


@pytest.mark.timeout(60)
def test_two_workers_serve_and_share_metrics(upstream: StandInUpstream) -> None:
    with run_proxy(upstream.url, "--port", "0", "--workers", "2") as proxy:
        url = proxy.wait_listening()
        with httpx.Client() as client:
            # Wait for both workers to have started before counting.
            for _ in range(2):
                assert client.get(url + "/_proxy/health").status_code == 200
            statuses = [httpx.get(url + "/customer").status_code for _ in range(20)]
            # The other worker writes its counts at most FLUSH_INTERVAL later.
            deadline = time.monotonic() + FLUSH_INTERVAL + 4
            while True:
                metrics = client.get(url + "/_proxy/metrics").text
                if _samples(metrics).get(GET_200) == 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        assert proxy.stop() == 0

    pids = set(re.findall(r"Started server process \[(\d+)\]", "".join(proxy.lines)))
    assert statuses == [200] * 20
    assert len(pids) == 2
    assert _samples(metrics)[GET_200] == 20


def test_shutdown_timeout_answers_envelope(upstream: StandInUpstream) -> None:
    upstream.reply_with(Reply(fail="hang"))
    results: list[httpx.Response] = []

    with run_proxy(upstream.url, "--port", "0", "--shutdown-timeout", "1") as proxy:
        url = proxy.wait_listening()
        client = threading.Thread(
            target=lambda: results.append(httpx.get(url + "/token/envelope/1", timeout=10))
        )
        client.start()
        upstream.wait_for_requests(1)
        proxy.process.send_signal(signal.SIGTERM)
        client.join(10)
        status = proxy.process.wait(15)

    # The request reached the upstream, so the client must not assume it was lost.
    assert status == 0
    assert [r.status_code for r in results] == [503]
    assert results[0].json()["errors"] == ["ProxyShuttingDown"]
    assert results[0].json()["values"] == {"upstreamReached": True}


def test_unix_socket_bad_path_exits_2(upstream: StandInUpstream, tmp_path: Path) -> None:
    taken = tmp_path / "regular-file"
    taken.write_text("not a socket")

    with run_proxy(upstream.url, "--unix-socket", str(taken)) as proxy:
        status = proxy.process.wait(15)

    assert status == 2
    assert "unix_socket: cannot listen on" in "".join(proxy.lines)
    assert taken.read_text() == "not a socket"
