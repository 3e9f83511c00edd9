"""Large single transfers (upload and download) through a target, with a byte-count check."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .nginx import DOWNLOAD_PATH, SMALL_PATH, UPLOAD_PATH
from .processes import LOOPBACK, HarnessError

CHUNK_BYTES = 1024 * 1024
# Socket timeout for each read or write. The `limit_s` argument bounds the whole transfer.
SOCKET_TIMEOUT_S = 60.0


@dataclass
class TransferResult:
    """One upload or download: bytes moved and wall-clock seconds."""

    bytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.bytes / (1024 * 1024) / self.seconds if self.seconds else 0.0


class _ZeroBody:
    """A file-like request body of `size` zero bytes, read by http.client in chunks."""

    def __init__(self, size: int, deadline: float) -> None:
        self.remaining = size
        self.deadline = deadline
        self.zeros = bytes(CHUNK_BYTES)

    def read(self, amount: int = -1) -> bytes:
        if time.monotonic() > self.deadline:
            raise HarnessError("upload exceeded its time limit")
        size = min(self.remaining, CHUNK_BYTES if amount < 0 else amount)
        self.remaining -= size
        return self.zeros if size == CHUNK_BYTES else self.zeros[:size]


def download(port: int, size: int, headers: Mapping[str, str], limit_s: float) -> TransferResult:
    """GET the download file through 127.0.0.1:`port`.

    Raises HarnessError unless every byte arrives within `limit_s`.
    """
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=SOCKET_TIMEOUT_S)
    buffer = bytearray(CHUNK_BYTES)
    received = 0
    started = time.monotonic()
    try:
        connection.request("GET", DOWNLOAD_PATH, headers=dict(headers))
        response = connection.getresponse()
        if response.status != 200:
            raise HarnessError(f"download through port {port} returned status {response.status}")
        while True:
            count = response.readinto(buffer)
            if not count:
                break
            received += count
            if time.monotonic() - started > limit_s:
                raise HarnessError(f"download through port {port} took over {limit_s:.0f} s")
    finally:
        connection.close()
    seconds = time.monotonic() - started
    if received != size:
        raise HarnessError(f"download through port {port} got {received} of {size} bytes")
    return TransferResult(received, seconds)


def upload(port: int, size: int, headers: Mapping[str, str], limit_s: float) -> TransferResult:
    """POST `size` zero bytes through 127.0.0.1:`port` and check that the upstream received them."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=SOCKET_TIMEOUT_S,
                                            blocksize=CHUNK_BYTES)
    started = time.monotonic()
    try:
        body = _ZeroBody(size, started + limit_s)
        request_headers = {**headers, "Content-Length": str(size),
                           "Content-Type": "application/octet-stream"}
        connection.request("POST", UPLOAD_PATH, body=body, headers=request_headers)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    seconds = time.monotonic() - started
    if response.status != 200:
        raise HarnessError(
            f"upload through port {port} returned status {response.status}: {answer[:200]!r}")
    # The upstream reports the whole request length, headers included.
    request_bytes = json.loads(answer)["request_bytes"]
    if request_bytes < size:
        raise HarnessError(
            f"upload through port {port}: upstream got {request_bytes} of {size} bytes")
    return TransferResult(size, seconds)


def small_gets(port: int, count: int, headers: Mapping[str, str]) -> None:
    """Send `count` small GETs on one keep-alive connection, to bring a proxy past startup."""
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=SOCKET_TIMEOUT_S)
    try:
        for _ in range(count):
            connection.request("GET", SMALL_PATH, headers=dict(headers))
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise HarnessError(
                    f"GET {SMALL_PATH} through port {port} returned status {response.status}")
    finally:
        connection.close()
