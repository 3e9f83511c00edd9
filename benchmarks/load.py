"""Load and soak test: many clients through nexus-proxy to a stand-in upstream that fails 1%.

    python benchmarks/load.py                         # 200 clients for 30 s
    python benchmarks/load.py --duration 600 --out soak.json

Everything runs on 127.0.0.1: the stand-in upstream from tests/upstream.py in a thread,
nexus-proxy as a subprocess (`python -m nexus_proxy`), and an asyncio httpx client pool.
Every POST carries its body's SHA-256 for the upstream to check, and every response
carries its body's SHA-256 for the client to check. The upstream fails a random share of
responses (reset, close or invalid bytes, before the response or in the middle of its
body), and the client must then see the proxy's 502 envelope or an aborted connection.

The exit status is 0 when every check passed, 1 when one failed and 2 when the harness
could not run. `run()` returns the same figures as a dict; tests/test_load.py calls it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gzip
import hashlib
import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.upstream import RecordedRequest, Reply, StandInUpstream  # noqa: E402

__all__ = ["HarnessError", "ProxyProcess", "run"]

KEY = "load-test-key-5b1e"
BEFORE_RESPONSE = ("reset_before_response", "close_before_response", "invalid")
MID_BODY = ("reset_mid_body", "close_mid_body")
# Request and response body sizes in bytes, drawn with equal weight. An empty response
# with Content-Length: 0 is left out: the proxy never completes it and uvicorn closes
# the connection (tests/test_faults.py, test_empty_response_keeps_connection).
POST_SIZES = (16, 300, 2_000, 16_384, 65_536)
REPLY_SIZES = (1, 300, 2_000, 16_384, 65_536)
RSS_TOLERANCE = 0.2
CLIENT_TIMEOUT = httpx.Timeout(30.0)
# Upper bound on requests per second of run time, so that no loop is unbounded.
MAX_RATE = 20_000


class HarnessError(Exception):
    """The harness could not run: the proxy did not start or did not respond."""


def _log(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


# The proxy under test.


class ProxyProcess:
    """nexus-proxy in a subprocess on 127.0.0.1, with its stderr drained and counted."""

    def __init__(self, upstream_url: str, *options: str) -> None:
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("NEXUS_PROXY_") and "PROXY" not in name.upper()
        }
        env["NEXUS_PROXY_API_KEY"] = KEY
        command = [sys.executable, "-m", "nexus_proxy", "--host", "127.0.0.1", "--port", "0"]
        # The "listening on" line, which names the port, is logged at INFO; the access
        # log is off, so that INFO adds no line per request.
        command += ["--upstream-url", upstream_url, "--log-level", "info", "--no-access-log"]
        command += options
        self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.pid = self.process.pid
        self.url = ""
        self.listening = threading.Event()
        self.messages: collections.Counter[str] = collections.Counter()
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line.rstrip())
            match = re.search(r"listening on (http://\S+?),", line)
            if match:
                self.url = match.group(1)
                self.listening.set()
            self.messages[_message_kind(line)] += 1

    def wait_listening(self, timeout: float = 15.0) -> str:
        """Return the proxy's URL once it logged that it listens; raise HarnessError if not."""
        if not self.listening.wait(timeout):
            raise HarnessError("nexus-proxy did not start:\n" + "\n".join(self.tail))
        return self.url

    def fd_count(self) -> int:
        """Open file descriptors of the proxy process."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        """Resident set size of the proxy process in bytes."""
        return _status_field(self.pid, "VmRSS")

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the proxy process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 30.0) -> int:
        """Send SIGTERM, wait for the exit status, and kill the process if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self._reader.join(5)
            assert self.process.stderr is not None
            self.process.stderr.close()


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise HarnessError(f"no {name} in /proc/{pid}/status")


def _message_kind(line: str) -> str:
    """Strip a log line of its variable parts, so that repeats count as one kind."""
    text = re.sub(r"^.*?(WARNING|ERROR|CRITICAL|INFO)\S*\s+", r"\1 ", line.strip())
    text = re.sub(r"\[[0-9a-f]{32}\]\s*", "", text)
    return re.sub(r"\d+", "N", text)[:160]


# The upstream: checks every request and fails a random share of responses.


@dataclass
class UpstreamLedger:
    """Record of the requests the upstream saw, written only on its event loop thread."""

    failure_rate: float
    seed: int
    seen: collections.Counter[int] = field(default_factory=collections.Counter)
    failed: dict[int, str] = field(default_factory=dict)
    changed_uploads: list[int] = field(default_factory=list)
    wrong_credentials: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)  # noqa: S311 - test data, not a secret

    def reply_to(self, request: RecordedRequest) -> Reply:
        """Check the request, note it, and return its reply or a random failure.

        Requests with a negative id are the harness's probes: served, never counted.
        """
        request_id = int(request.header("x-load-id")[0])
        if request_id < 0:
            return _reply_for(request, request_id)
        self.seen[request_id] += 1
        if request.header("authorization") != [f"Bearer {KEY}"]:
            self.wrong_credentials += 1
        if request.method == "POST" and request.header("x-load-body-sha256") != [
            request.body_sha256
        ]:
            self.changed_uploads.append(request_id)

        reply = _reply_for(request, request_id)
        if self._random.random() < self.failure_rate:
            mode = self._random.choice(BEFORE_RESPONSE + MID_BODY)
            self.failed[request_id] = mode
            reply.fail = mode
            reply.fail_after = len(reply.body) // 2
        return reply


def _reply_for(request: RecordedRequest, request_id: int) -> Reply:
    size = int(request.header("x-load-reply-size")[0])
    body = random.Random(request_id).randbytes(size)  # noqa: S311 - test data
    headers = [("Content-Type", "application/octet-stream")]
    if request.header("x-load-reply-gzip") == ["1"]:
        body = gzip.compress(body, compresslevel=1, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("X-Load-Reply-SHA256", hashlib.sha256(body).hexdigest()))
    chunked = request.header("x-load-reply-chunked") == ["1"]
    return Reply(headers=headers, body=body, chunked=chunked)


# The clients.


@dataclass
class Outcome:
    """The end of one request at the client: its method, kind and status."""

    method: str
    kind: str  # "ok", "corrupted", "aborted", "no-response", "envelope <status> <code>"
    status: int | None = None


async def _upload(body: bytes) -> Any:
    for start in range(0, len(body), 8192):
        yield body[start : start + 8192]


def _plan(request_id: int) -> tuple[str, bytes, dict[str, str], bool]:
    plan = random.Random(request_id)  # noqa: S311 - test data
    method = plan.choice(("GET", "POST"))
    body = plan.randbytes(plan.choice(POST_SIZES)) if method == "POST" else b""
    headers = {
        "x-load-id": str(request_id),
        "x-load-reply-size": str(plan.choice(REPLY_SIZES)),
        "x-load-reply-chunked": str(plan.randint(0, 1)),
        "x-load-reply-gzip": "1" if plan.random() < 0.1 else "0",
    }
    if method == "POST":
        headers["x-load-body-sha256"] = hashlib.sha256(body).hexdigest()
    return method, body, headers, plan.random() < 0.25


async def _one(client: httpx.AsyncClient, url: str, request_id: int) -> Outcome:
    method, body, headers, chunked = _plan(request_id)
    content = _upload(body) if chunked else body
    target = f"{url}/token/payments/{request_id}" if body else f"{url}/customer/{request_id}"
    status = None
    try:
        async with client.stream(method, target, content=content, headers=headers) as response:
            status = response.status_code
            digest = hashlib.sha256()
            async for piece in response.aiter_raw():
                digest.update(piece)
    except httpx.TransportError:
        return Outcome(method, "no-response" if status is None else "aborted", status)

    code = response.headers.get("x-nexus-proxy-error")
    if code is not None:
        return Outcome(method, f"envelope {status} {code}", status)
    if response.headers.get("x-load-reply-sha256") != digest.hexdigest():
        return Outcome(method, "corrupted", status)
    return Outcome(method, "ok" if status == 200 else f"status {status}", status)


async def _drive(
    url: str, clients: int, deadline: float, ids: Iterator[int], outcomes: dict[int, Outcome]
) -> None:
    """Run `clients` workers, each with its own connection, until `deadline`.

    Each finished request's outcome goes into `outcomes` as soon as it is known.
    """
    # One client per worker, because httpcore 1.0's pool does work quadratic in its
    # connection count on every request: one shared pool of 200 connections managed
    # about 150 requests/s here. The TLS context is shared so that each client does not
    # load the CA bundle again; the proxy is reached over plain HTTP anyway.
    tls = ssl.create_default_context()

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT, verify=tls) as client:
            for request_id in ids:
                if time.monotonic() >= deadline:
                    return
                outcomes[request_id] = await _one(client, url, request_id)

    await asyncio.gather(*(worker() for _ in range(clients)))


def _sample(
    proxy: ProxyProcess,
    outcomes: dict[int, Outcome],
    samples: list[tuple[float, int, int]],
    stop: threading.Event,
) -> None:
    started = time.monotonic()
    while not stop.wait(1.0):
        with contextlib.suppress(OSError, HarnessError):
            seconds = round(time.monotonic() - started, 1)
            samples.append((seconds, proxy.rss(), len(outcomes)))


# Checking the outcomes.


def _expected_kind(mode: str | None, method: str, seen: bool) -> tuple[str, ...]:
    envelope = "envelope 502 ProxyUpstreamProtocolError"
    if not seen and method == "POST":
        # Lost on a pooled connection the upstream had just closed: a payment may be
        # reported as failed, never sent again. A GET should have been sent again.
        return (envelope,)
    if mode is None:
        return ("ok",)
    if mode in BEFORE_RESPONSE:
        # RFC 9112 section 9.3.1 lets a GET that got no response be sent again.
        return (envelope, "ok") if method == "GET" else (envelope,)
    return ("aborted",)


def _judge(outcomes: dict[int, Outcome], ledger: UpstreamLedger) -> dict[str, Any]:
    """Match every client outcome against what the upstream saw and did."""
    kinds = collections.Counter(outcome.kind for outcome in outcomes.values())
    unexpected = collections.Counter()
    examples: list[str] = []
    for request_id, outcome in outcomes.items():
        mode = ledger.failed.get(request_id)
        seen = request_id in ledger.seen
        if outcome.kind not in _expected_kind(mode, outcome.method, seen):
            upstream_did = mode or ("answered" if seen else "never received it")
            unexpected[f"{outcome.method} {outcome.kind} (upstream: {upstream_did})"] += 1
            if len(examples) < 10:
                examples.append(f"request {request_id} {outcome.method}: {outcome.kind}, {mode}")
    sent_ids = set(outcomes)
    return {
        "requests": len(outcomes),
        "by_method": dict(collections.Counter(outcome.method for outcome in outcomes.values())),
        "outcomes": dict(kinds),
        "upstream_failures": dict(collections.Counter(ledger.failed.values())),
        "unexpected": dict(unexpected),
        "unexpected_examples": examples,
        "corrupted_downloads": kinds["corrupted"],
        "changed_uploads": len(ledger.changed_uploads),
        "sent_twice": sum(
            1 for i, count in ledger.seen.items() if count > 1 and _method(outcomes, i) == "POST"
        ),
        "get_sent_again": sum(
            1 for i, count in ledger.seen.items() if count > 1 and _method(outcomes, i) == "GET"
        ),
        "never_sent": sum(
            1 for i, outcome in outcomes.items() if outcome.kind == "ok" and i not in ledger.seen
        ),
        "unknown_at_client": len(set(ledger.seen) - sent_ids),
        "proxy_5xx_other": sum(
            1
            for outcome in outcomes.values()
            if outcome.status is not None
            and outcome.status >= 500
            and not outcome.kind.startswith("envelope")
        ),
        "wrong_credentials": ledger.wrong_credentials,
    }


def _method(outcomes: dict[int, Outcome], request_id: int) -> str | None:
    outcome = outcomes.get(request_id)
    return None if outcome is None else outcome.method


def _checks(result: dict[str, Any]) -> dict[str, bool]:
    memory, fds = result["rss"], result["fds"]
    return {
        "no lost, corrupted or repeated bodies": result["corrupted_downloads"]
        + result["changed_uploads"]
        + result["sent_twice"]
        + result["never_sent"]
        + result["unknown_at_client"]
        == 0,
        "every failure shown as an envelope or an abort, nothing else": not result["unexpected"],
        "no proxy-made 5xx besides envelopes": result["proxy_5xx_other"] == 0,
        "only the key reached the upstream": result["wrong_credentials"] == 0,
        "no exception in the proxy's log": result["proxy_exceptions"] == 0,
        f"RSS at the end within {RSS_TOLERANCE:.0%} of after warm-up": memory["end"]
        <= memory["after_warmup"] * (1 + RSS_TOLERANCE),
        "open fds back to the starting count": fds["end"] <= fds["start"],
        "clean exit on SIGTERM": result["exit_status"] == 0,
    }


# The run.


def _probe(url: str) -> None:
    """One GET on a connection the proxy closes itself, so its fd is gone when this returns."""
    response = httpx.get(f"{url}/_proxy/health", headers={"Connection": "close"}, timeout=10)
    if response.status_code != 200:
        raise HarnessError(f"nexus-proxy health check responded {response.status_code}")
    with httpx.Client(timeout=10) as client:
        response = client.get(
            f"{url}/customer/probe",
            headers={"Connection": "close", "x-load-id": "-1", "x-load-reply-size": "10"},
        )
    if response.status_code != 200:
        raise HarnessError(f"nexus-proxy responded {response.status_code} to a probe request")


def _lowest(read: Callable[[], int], seconds: float) -> int:
    """The lowest value `read` returns while polled for `seconds`."""
    deadline = time.monotonic() + seconds
    lowest = read()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        lowest = min(lowest, read())
    return lowest


def _settle(read: Callable[[], int], target: int, timeout: float) -> int:
    """Poll `read` until it is at most `target` or `timeout` passes; return the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while value > target and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def run(
    duration: float,
    clients: int,
    *,
    warmup: float | None = None,
    failure_rate: float = 0.01,
    seed: int = 1,
    max_connections: int = 100,
    upstream_idle_timeout: float | None = None,
) -> dict[str, Any]:
    """Drive `clients` concurrent clients through a new proxy for `duration` seconds.

    RSS is read `warmup` seconds in (default: a quarter of the run, at most 5 s) and
    again after the run. With `upstream_idle_timeout`, the upstream closes keep-alive
    connections idle that long, so the proxy meets stale pooled connections under load.
    Returns the figures and a `checks` dict of named pass/fail results; raises
    HarnessError when the proxy cannot be started.
    """
    if warmup is None:
        warmup = min(5.0, duration / 4)
    ledger = UpstreamLedger(failure_rate, seed)
    upstream = StandInUpstream(
        ledger.reply_to, idle_timeout=upstream_idle_timeout, keep_records=False
    )
    with upstream:
        proxy = ProxyProcess(upstream.url, "--max-connections", str(max_connections))
        try:
            result = _measure(proxy, upstream, ledger, duration, clients, warmup)
        finally:
            proxy.stop()
    result["max_connections"] = max_connections
    return result


def _measure(
    proxy: ProxyProcess,
    upstream: StandInUpstream,
    ledger: UpstreamLedger,
    duration: float,
    clients: int,
    warmup: float,
) -> dict[str, Any]:
    url = proxy.wait_listening()
    _probe(url)
    # The proxy closes the probe's client socket a moment after the response ends.
    fds_start = _lowest(proxy.fd_count, seconds=0.5)
    _log(f"proxy pid {proxy.pid} at {url}: {clients} clients for {duration:g} s")

    # Every second: seconds since the start, the proxy's RSS, requests finished so far.
    samples: list[tuple[float, int, int]] = []
    outcomes: dict[int, Outcome] = {}
    stop_sampling = threading.Event()
    sampler = threading.Thread(target=_sample, args=(proxy, outcomes, samples, stop_sampling))
    sampler.start()
    rss_warm: list[int] = []
    warm_timer = threading.Timer(warmup, lambda: rss_warm.append(proxy.rss()))
    warm_timer.start()
    started, cpu_started = time.monotonic(), proxy.cpu_seconds()
    ids = iter(range(int(duration * MAX_RATE)))
    try:
        asyncio.run(_drive(url, clients, started + duration, ids, outcomes))
    finally:
        elapsed = time.monotonic() - started
        proxy_cpu = proxy.cpu_seconds() - cpu_started
        warm_timer.cancel()
        stop_sampling.set()
        sampler.join(5)

    # The upstream closes every idle pooled connection. The probe's request then makes
    # the proxy's pool drop them, as any next request would, and leaves one pooled.
    upstream.close_idle_connections()
    upstream.wait_until(lambda: upstream.closed_connections == upstream.connections)
    _probe(url)
    fds_end = _settle(proxy.fd_count, fds_start, timeout=5)
    rss_end = proxy.rss()
    peak = _status_field(proxy.pid, "VmHWM")
    exit_status = proxy.stop()

    result = _judge(outcomes, ledger)
    result.update(
        clients=clients,
        duration_s=round(elapsed, 1),
        requests_per_s=round(len(outcomes) / elapsed),
        proxy_cpu_s=round(proxy_cpu, 1),
        rss={
            "after_warmup": rss_warm[0] if rss_warm else rss_end,
            "end": rss_end,
            "peak": peak,
            "samples": samples,
        },
        fds={"start": fds_start, "end": fds_end},
        exit_status=exit_status,
        proxy_log=dict(proxy.messages.most_common(12)),
        proxy_exceptions=sum(
            count
            for kind, count in proxy.messages.items()
            if "Traceback" in kind or "Exception in ASGI" in kind
        ),
    )
    result["checks"] = _checks(result)
    return result


def format_summary(result: dict[str, Any]) -> str:
    """Format a short human-readable report of one run."""
    mib = 1024 * 1024
    rss, fds = result["rss"], result["fds"]
    lines = [
        f"{result['requests']} requests from {result['clients']} clients in "
        f"{result['duration_s']} s ({result['requests_per_s']} req/s, proxy CPU "
        f"{result['proxy_cpu_s']} s), by method {result['by_method']}",
        f"client outcomes: {result['outcomes']}",
        f"upstream failures injected: {result['upstream_failures']}",
        f"unexpected outcomes: {result['unexpected'] or 'none'}",
        f"GETs the proxy sent again after an upstream failure: {result['get_sent_again']}",
        f"RSS: {rss['after_warmup'] / mib:.1f} MiB after warm-up, {rss['end'] / mib:.1f} MiB "
        f"at the end, {rss['peak'] / mib:.1f} MiB peak",
        f"open fds: {fds['start']} at the start, {fds['end']} at the end",
    ]
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in result["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run once, print the summary and return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients")
    parser.add_argument("--warmup", type=float, help="seconds before the first RSS reading")
    parser.add_argument("--failure-rate", type=float, default=0.01, help="share of failures")
    parser.add_argument("--seed", type=int, default=1, help="seed of the upstream's failures")
    parser.add_argument(
        "--max-connections", type=int, default=100, help="the proxy's upstream pool size"
    )
    parser.add_argument(
        "--upstream-idle-timeout",
        type=float,
        help="seconds after which the upstream closes an idle keep-alive connection",
    )
    parser.add_argument("--out", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        result = run(
            args.duration,
            args.clients,
            warmup=args.warmup,
            failure_rate=args.failure_rate,
            seed=args.seed,
            max_connections=args.max_connections,
            upstream_idle_timeout=args.upstream_idle_timeout,
        )
    except HarnessError as exc:
        _log(f"could not run: {exc}")
        return 2
    print(format_summary(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
