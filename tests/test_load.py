"""Load and shutdown: the short form of benchmarks/load.py, and SIGTERM with requests in flight."""

from __future__ import annotations

import asyncio
import ssl
import time

import httpx
import pytest

from benchmarks import load
from tests.upstream import RecordedRequest, Reply, StandInUpstream

pytestmark = pytest.mark.timeout(90)


@pytest.mark.timeout(120)
def test_load_short_form() -> None:
    # 200 clients as in the long form, for 12 s instead of 30, so that the whole test
    # stays well under a minute on a two-core CI machine.
    result = load.run(duration=12, clients=200, warmup=4)
    summary = load.format_summary(result)

    # About 40 requests per second: a third of the slowest rate that docs/benchmarks.md
    # records for this harness on two cores, so that only a stalling proxy fails here.
    assert result["requests"] >= 500, summary
    assert result["unexpected"] == {}, summary
    assert result["corrupted_downloads"] == 0, summary
    assert result["changed_uploads"] == 0, summary
    assert result["sent_twice"] == 0, summary
    assert result["proxy_5xx_other"] == 0, summary
    assert [name for name, passed in result["checks"].items() if not passed] == [], summary


# Graceful shutdown: every request the proxy accepted gets its full response.

SHUTDOWN_CLIENTS = 40
UPSTREAM_DELAY = 0.5


def _slow_echo(request: RecordedRequest) -> Reply:
    """Echo the request's body after UPSTREAM_DELAY, so SIGTERM meets the request in flight."""
    return Reply(head_delay=UPSTREAM_DELAY, body=request.body)


async def _pay_until_stopped(url: str, worker: int, outcomes: dict[str, str]) -> None:
    """Send payments one after another until the proxy stops taking them (at most 50)."""
    tls = ssl.create_default_context()  # unused over plain HTTP; see benchmarks/load.py
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0), verify=tls) as client:
        for sequence in range(50):
            payment = f"payment {worker}-{sequence}"
            try:
                response = await client.post(f"{url}/token/payments", content=payment)
            except httpx.TransportError as exc:
                outcomes[payment] = type(exc).__name__
                return
            intact = response.status_code == 200 and response.text == payment
            outcomes[payment] = "ok" if intact else f"status {response.status_code}"


async def _shutdown_under_load(
    url: str, proxy: load.ProxyProcess, upstream: StandInUpstream
) -> tuple[dict[str, str], int]:
    """Return every payment's outcome, and how many were at the upstream when SIGTERM went out."""
    outcomes: dict[str, str] = {}
    clients = [
        asyncio.create_task(_pay_until_stopped(url, worker, outcomes))
        for worker in range(SHUTDOWN_CLIENTS)
    ]
    await asyncio.to_thread(upstream.wait_until, lambda: upstream.heads >= SHUTDOWN_CLIENTS)
    # The upstream delays each response by UPSTREAM_DELAY, so none of these has one yet.
    in_flight = upstream.heads
    proxy.process.terminate()
    await asyncio.gather(*clients)
    return outcomes, in_flight


@pytest.mark.timeout(60)
def test_shutdown_under_load_loses_nothing() -> None:
    with StandInUpstream(_slow_echo) as upstream:
        proxy = load.ProxyProcess(upstream.url, "--shutdown-timeout", "10")
        try:
            url = proxy.wait_listening()
            started = time.monotonic()
            outcomes, in_flight = asyncio.run(_shutdown_under_load(url, proxy, upstream))
            status = proxy.process.wait(15)
            stopped_after = time.monotonic() - started
        finally:
            proxy.stop()
        received = [request.body.decode() for request in upstream.requests]

    refused = {payment: kind for payment, kind in outcomes.items() if kind != "ok"}
    assert status == 0
    assert in_flight >= SHUTDOWN_CLIENTS
    assert stopped_after < 10
    assert [payment for payment in received if outcomes.get(payment) != "ok"] == []
    assert sorted(received) == sorted(payment for payment, kind in outcomes.items() if kind == "ok")
    assert set(refused.values()) <= {"ConnectError", "RemoteProtocolError"}, refused
    assert len(refused) == SHUTDOWN_CLIENTS
