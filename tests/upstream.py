"""Stand-in Nexus upstream for proxy tests.

A raw HTTP/1.1 server on asyncio streams that records each request exactly as it
arrived on the wire and can respond with slow, truncated, reset or invalid
responses. It runs its event loop in a background thread, so synchronous test
code can start it with ``with StandInUpstream(...) as upstream:``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import http
import ipaddress
import logging
import re
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

NEXUS_SUCCESS_BODY = b'{"message":"Successfully processed your request","errors":null,"values":{}}'

BEFORE_RESPONSE_FAILURES = frozenset(
    {"close_before_response", "reset_before_response", "hang", "invalid"}
)
# "hang_mid_body" sends `fail_after` body bytes, then keeps the connection open
# without sending more until the client closes it.
MID_BODY_FAILURES = frozenset({"close_mid_body", "reset_mid_body", "hang_mid_body"})
FAILURE_MODES = BEFORE_RESPONSE_FAILURES | MID_BODY_FAILURES

# Bytes sent for fail="invalid": no status line, so every HTTP client must reject it.
INVALID_RESPONSE = b"\x00\xffTHIS IS NOT HTTP\r\n\r\n"

# What the server does with a keep-alive connection that stayed idle for `idle_timeout`:
# "close" sends a FIN, as most servers do. "reset_on_request" sends nothing, and
# meets the next bytes that arrive with a TCP RST without reading them, as a server
# or middlebox does that dropped the connection without telling the peer.
IDLE_CLOSE_MODES = frozenset({"close", "reset_on_request"})

# Maximum length of one request line, header line or chunk-size line, and the
# StreamReader buffer size. A longer line gets 400 Bad Request.
MAX_LINE_BYTES = 1024 * 1024
MAX_HEADER_LINES = 1000
READ_SIZE = 1024 * 1024

# Before a reset, wait at most this long for the kernel to deliver the bytes
# already written, so the peer receives them before the RST.
RESET_FLUSH_TIMEOUT = 1.0
RESET_FLUSH_POLL = 0.005

THREAD_JOIN_TIMEOUT = 5.0

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
_HTTP_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

Header = tuple[bytes, bytes]


@dataclass
class RecordedRequest:
    """One request as the stand-in upstream received it."""

    method: str
    target: bytes
    http_version: str
    headers: list[Header]
    body: bytes
    body_size: int
    body_sha256: str
    chunked: bool
    raw_head: bytes
    trailers: list[Header] = field(default_factory=list)

    def header(self, name: str) -> list[str]:
        """Return every value of header `name` (case-insensitive), in arrival order."""
        return _header_values(self.headers, name)


def _default_reply_headers() -> list[tuple[str, str]]:
    return [("content-type", "application/json")]


@dataclass
class Reply:
    """The response, or failure, that the stand-in upstream sends for one request.

    Without `raw_framing`, the server adds `Transfer-Encoding: chunked` when
    `chunked` is set and `Content-Length` otherwise, unless `headers` already
    contain that header, and adds neither to 1xx, 204 and 304 responses. With
    `raw_framing`, the body is sent unframed after exactly `headers`, and the
    connection is closed afterwards unless `headers` give a Content-Length or
    Transfer-Encoding.

    `keep_body` takes effect only for a fixed Reply, because a callable handler
    returns its Reply after the whole body has arrived.

    NOTE: a generator passed as `chunks` is used up by the first response, so a
    Reply used for several requests needs a list, or a handler that
    returns a new Reply per request.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=_default_reply_headers)
    body: bytes = NEXUS_SUCCESS_BODY
    chunks: Iterable[bytes] | None = None
    chunked: bool = False
    chunk_delay: float = 0.0
    head_delay: float = 0.0
    fail: str | None = None
    fail_after: int = 0
    raw: bytes | None = None
    informational: list[int] = field(default_factory=list)
    keep_body: bool = True
    raw_framing: bool = False

    def __post_init__(self) -> None:
        """Reject field combinations that cannot be sent as described."""
        if not 100 <= self.status <= 999:
            raise ValueError(f"invalid status {self.status}: expected 100 to 999")
        for code in self.informational:
            if not 100 <= code <= 199:
                raise ValueError(f"invalid informational status {code}: expected 100 to 199")
        if self.fail is not None and self.fail not in FAILURE_MODES:
            raise ValueError(
                f"invalid fail mode {self.fail!r}: expected one of {sorted(FAILURE_MODES)}"
            )
        if self.fail_after < 0:
            raise ValueError(f"invalid fail_after {self.fail_after}: expected 0 or more")
        if isinstance(self.chunks, bytes | bytearray | str):
            raise ValueError(
                "invalid chunks: expected an iterable of bytes pieces, not one bytes object"
            )
        self._check_length_framing()

    def _check_length_framing(self) -> None:
        if self.raw_framing or self.chunked or self._has_header("content-length"):
            return
        length = self.body_length()
        if length is None:
            raise ValueError(
                "Content-Length of a `chunks` iterator is unknown: pass a list, "
                "set chunked=True, give a Content-Length header or set raw_framing=True"
            )
        if self.fail in MID_BODY_FAILURES and self.fail_after >= length:
            raise ValueError(
                f"invalid fail_after {self.fail_after}: the {length}-byte body would be complete, "
                "so fail_after must be smaller than the body length"
            )

    def _has_header(self, name: str) -> bool:
        return any(key.lower() == name for key, _ in self.headers)

    def body_length(self) -> int | None:
        """Return the total body length, or None when `chunks` is an iterator."""
        if self.chunks is None:
            return len(self.body)
        if isinstance(self.chunks, list | tuple):
            return sum(len(piece) for piece in self.chunks)
        return None

    def body_pieces(self) -> Iterator[bytes]:
        """Yield the non-empty body pieces to send."""
        pieces = [self.body] if self.chunks is None else self.chunks
        for piece in pieces:
            if piece:
                yield bytes(piece)


Handler = Callable[[RecordedRequest], Reply] | Reply


class _BadRequest(Exception):
    """The request is not valid HTTP/1.1, so the server responds with 400 and closes."""


class _PeerClosed(Exception):
    """The client closed the connection in the middle of a request."""


class _BodySink:
    """Accumulate a request body: its size, its SHA-256 and, if kept, its bytes."""

    def __init__(self, keep: bool, started: threading.Event) -> None:
        self.size = 0
        self._sha256 = hashlib.sha256()
        self._data = bytearray() if keep else None
        self._started = started

    def add(self, data: bytes) -> None:
        """Record one piece of de-framed body."""
        if not data:
            return
        self._started.set()
        self.size += len(data)
        self._sha256.update(data)
        if self._data is not None:
            self._data += data

    @property
    def body(self) -> bytes:
        """Kept body bytes, or b"" when the body is not kept."""
        return bytes(self._data) if self._data is not None else b""

    @property
    def hexdigest(self) -> str:
        """Hex SHA-256 of the body received so far."""
        return self._sha256.hexdigest()


@dataclass
class _Head:
    method: str
    target: bytes
    http_version: str
    headers: list[Header]
    raw: bytes


class StandInUpstream:
    """Raw HTTP/1.1 server on loopback that records requests and sends scripted replies.

    Attributes set by the server thread:
        url, port: where the server listens, set by ``__enter__``.
        requests: every complete request, in arrival order.
        incomplete: requests whose body was cut short because the client closed
            the connection or the server stopped. Their body fields contain what arrived.
        heads: request heads received so far, counted before the body is read, so
            it includes requests whose body never completed.
        connections: TCP connections accepted so far.
        closed_connections: connections that have ended, for either side's reason.
        idle_closed: keep-alive connections the server ended while they waited for a
            request: after ``idle_timeout`` (closed, or dropped with
            ``idle_close="reset_on_request"``), or by ``close_idle_connections``.
        body_started: set when the first de-framed body byte of any request arrives.

    A callable handler runs on the server's event loop thread, so it must not
    block. It receives the full request, so only a fixed Reply with
    ``keep_body=False`` makes the server drop body bytes as they arrive.

    With ``idle_timeout`` (seconds), a keep-alive connection that waits longer than
    that for its next request is ended as ``idle_close`` selects (see IDLE_CLOSE_MODES),
    so a client meets stale pooled connections. With ``keep_records=False`` the
    ``requests`` and ``incomplete`` lists stay empty, for long runs whose handler
    does its own accounting.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        idle_timeout: float | None = None,
        idle_close: str = "close",
        keep_records: bool = True,
    ) -> None:
        """Configure the server, which listens only inside the `with` block."""
        _check_loopback(host)
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"invalid idle_timeout {idle_timeout}: expected seconds above 0")
        if idle_close not in IDLE_CLOSE_MODES:
            raise ValueError(
                f"invalid idle_close {idle_close!r}: expected one of {sorted(IDLE_CLOSE_MODES)}"
            )
        self._idle_timeout = idle_timeout
        self._idle_close = idle_close
        self._keep_records = keep_records
        self._handler: Handler = Reply() if handler is None else handler
        self._ssl_context = ssl_context
        self._host = host
        self.port = 0
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.incomplete: list[RecordedRequest] = []
        self.connections = 0
        self.closed_connections = 0
        self.idle_closed = 0
        self.heads = 0
        self.body_started = threading.Event()
        self._condition = threading.Condition()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._startup_error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._idle_writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> StandInUpstream:
        """Start listening on an ephemeral port and return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("StandInUpstream was already started; create a new instance")
        self._thread = threading.Thread(
            target=self._run_thread, name="stand-in-upstream", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise RuntimeError(
                f"stand-in upstream failed to listen on {self._host}"
            ) from self._startup_error
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the server, abort every connection and join the thread."""
        if self._thread is None or self._loop is None or self._stop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(THREAD_JOIN_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError(
                f"stand-in upstream thread did not stop within {THREAD_JOIN_TIMEOUT} s; "
                "a handler callable may be blocking its event loop"
            )

    def reply_with(self, handler: Handler) -> None:
        """Set the handler or fixed Reply used for requests that arrive from now on."""
        with self._condition:
            self._handler = handler

    def close_idle_connections(self) -> None:
        """Close, with a FIN, every keep-alive connection now waiting for its next request."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_idle)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until `count` complete requests arrived and return all recorded so far."""
        self.wait_until(lambda: len(self.requests) >= count, timeout)
        with self._condition:
            return list(self.requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` is true, re-checking whenever the server records something."""
        with self._condition:
            if not self._condition.wait_for(predicate, timeout):
                raise TimeoutError(
                    f"condition still false after {timeout} s: {len(self.requests)} requests, "
                    f"{self.connections} connections, {self.closed_connections} closed"
                )

    # Event loop thread.

    def _run_thread(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # handed to __enter__ or logged
            if self._ready.is_set():
                logger.exception("stand-in upstream: event loop failed on port %s", self.port)
                return
            self._startup_error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(
            self._serve_connection, self._host, 0, limit=MAX_LINE_BYTES
        )
        self.port = server.sockets[0].getsockname()[1]
        self.url = self._format_url()
        self._ready.set()
        await self._stop.wait()
        server.close()
        await self._abort_connections()

    def _format_url(self) -> str:
        if self._ssl_context is not None:
            return f"https://localhost:{self.port}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def _abort_connections(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _count_connection(self, opened: bool) -> None:
        with self._condition:
            if opened:
                self.connections += 1
            else:
                self.closed_connections += 1
            self._condition.notify_all()

    def _count_idle_close(self) -> None:
        with self._condition:
            self.idle_closed += 1
            self._condition.notify_all()

    def _count_head(self) -> None:
        with self._condition:
            self.heads += 1
            self._condition.notify_all()

    def _append(self, records: list[RecordedRequest], request: RecordedRequest) -> None:
        with self._condition:
            if self._keep_records:
                records.append(request)
            self._condition.notify_all()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self._count_connection(opened=True)
        try:
            await self._serve_requests(reader, writer)
        except asyncio.CancelledError:
            # On Python 3.11 the start_server callback calls task.exception() and
            # logs the CancelledError of a cancelled task, so a connection task
            # that the server's stop cancelled ends normally instead.
            if self._stop is None or not self._stop.is_set():
                raise
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.transport.abort()
            self._count_connection(opened=False)

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        try:
            if self._ssl_context is not None:
                await writer.start_tls(self._ssl_context)
            first_line = None
            while await self._serve_one(reader, writer, first_line):
                first_line = await self._next_request_line(reader, writer)
                if first_line is None:
                    return
            await _close(writer)
        except _BadRequest as error:
            logger.warning("stand-in upstream: bad request from %s: %s", peer, error)
            await _send_bad_request(writer, str(error))
        except (ConnectionError, ssl.SSLError, _PeerClosed) as error:
            logger.info("stand-in upstream: connection from %s ended: %r", peer, error)
        except Exception:  # for example a `chunks` generator that raised
            logger.exception("stand-in upstream: failed serving %s, aborting the connection", peer)

    async def _next_request_line(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes | None:
        """Wait for the next request on a keep-alive connection and return its first line.

        Returns None when the connection ended instead: closed by the client, by
        `close_idle_connections`, or by the server after `idle_timeout`.
        """
        self._idle_writers.add(writer)
        try:
            # A cancelled readline leaves a partial line in the reader's buffer.
            line = await asyncio.wait_for(_read_line(reader), self._idle_timeout)
        except TimeoutError:
            pass
        else:
            return line if line else None
        finally:
            self._idle_writers.discard(writer)

        self._count_idle_close()
        if self._idle_close == "close":
            await _close(writer)
        elif await reader.read(1):
            await _reset(writer)
        return None

    def _close_idle(self) -> None:
        for writer in list(self._idle_writers):
            self._count_idle_close()
            writer.close()  # the waiting readline then reads the end of the stream

    async def _serve_one(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first_line: bytes | None = None,
    ) -> bool:
        """Serve one request and return True when the connection stays open for another.

        `first_line` is the request's first line when the caller has already read it.
        """
        request = await self._read_request(reader, writer, first_line)
        if request is None:
            return False
        self._append(self.requests, request)
        reply = self._reply_for(request)
        return await self._send_reply(request, reply, reader, writer)

    def _reply_for(self, request: RecordedRequest) -> Reply:
        with self._condition:
            handler = self._handler
        if isinstance(handler, Reply):
            return handler
        try:
            return handler(request)
        except Exception as error:  # the client gets a 500 response and the error is logged
            logger.exception(
                "stand-in upstream: handler failed on %s %r", request.method, request.target
            )
            message = f"stand-in upstream handler failed: {error!r}".encode()
            return Reply(status=500, headers=[("content-type", "text/plain")], body=message)

    def _keeps_body(self) -> bool:
        # A callable handler reads the request body, so only a fixed Reply can drop it.
        with self._condition:
            handler = self._handler
        return handler.keep_body if isinstance(handler, Reply) else True

    async def _read_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        first_line: bytes | None = None,
    ) -> RecordedRequest | None:
        """Read one request, or return None when the client closed the connection."""
        head = await _read_head(reader, first_line)
        if head is None:
            return None
        self._count_head()
        chunked, length = _body_framing(head.headers)
        if _expects_continue(head) and (chunked or length > 0):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        sink = _BodySink(self._keeps_body(), self.body_started)
        trailers: list[Header] = []
        try:
            if chunked:
                trailers = await _read_chunked_body(reader, sink)
            else:
                await _read_fixed_body(reader, length, sink)
        except (_PeerClosed, ConnectionError, asyncio.CancelledError):
            partial = _record(head, sink, chunked, trailers)
            self._append(self.incomplete, partial)
            raise
        return _record(head, sink, chunked, trailers)

    async def _send_reply(
        self,
        request: RecordedRequest,
        reply: Reply,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Send `reply` and return True when the connection stays open for another request."""
        if reply.head_delay:
            await asyncio.sleep(reply.head_delay)
        if reply.raw is not None:
            writer.write(reply.raw)
            await writer.drain()
            return False
        for code in reply.informational:
            writer.write(_status_line(code) + b"\r\n")
        if reply.fail in BEFORE_RESPONSE_FAILURES:
            await _fail_before_response(reply.fail, reader, writer)
            return False
        writer.write(_response_head(request, reply))
        if _has_no_body(request, reply):
            await writer.drain()
        elif not await _send_body(reply, writer):
            return False
        if reply.fail in MID_BODY_FAILURES:
            await _fail(reply.fail, writer, reader)
            return False
        return _keeps_alive(request, reply)


def _check_loopback(host: str) -> None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"invalid host {host!r}: expected a loopback IP literal such as 127.0.0.1 or ::1"
        ) from None
    if not address.is_loopback:
        raise ValueError(
            f"invalid host {host!r}: the stand-in upstream listens only on loopback addresses"
        )


def _header_values(headers: list[Header], name: str) -> list[str]:
    key = name.lower().encode("latin-1")
    return [value.decode("latin-1") for header_name, value in headers if header_name.lower() == key]


def _header_tokens(headers: list[Header], name: str) -> list[str]:
    values = ",".join(_header_values(headers, name))
    return [token.strip().lower() for token in values.split(",") if token.strip()]


def _record(head: _Head, sink: _BodySink, chunked: bool, trailers: list[Header]) -> RecordedRequest:
    return RecordedRequest(
        method=head.method,
        target=head.target,
        http_version=head.http_version,
        headers=head.headers,
        body=sink.body,
        body_size=sink.size,
        body_sha256=sink.hexdigest,
        chunked=chunked,
        raw_head=head.raw,
        trailers=trailers,
    )


# Request parsing.


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError as error:  # StreamReader raises ValueError for a line over its limit
        raise _BadRequest(f"line longer than {MAX_LINE_BYTES} bytes") from error


async def _read_head(reader: asyncio.StreamReader, first_line: bytes | None = None) -> _Head | None:
    """Read a request line and header block, or return None when the client closed first.

    `first_line`, when given, is the head's first line, already read from `reader`.
    """
    raw = bytearray()
    lines: list[bytes] = []
    pending = first_line
    while True:
        if pending is not None:
            line, pending = pending, None
        else:
            line = await _read_line(reader)
        if not line.endswith(b"\n"):
            if raw or line:
                raise _PeerClosed(
                    f"connection closed inside a request head after {len(raw) + len(line)} bytes"
                )
            return None
        if not raw and line in (b"\r\n", b"\n"):
            continue  # RFC 9112 section 2.2: ignore empty lines before a request line
        raw += line
        if line in (b"\r\n", b"\n"):
            return _parse_head(lines, bytes(raw))
        lines.append(line.rstrip(b"\r\n"))
        if len(lines) > MAX_HEADER_LINES:
            raise _BadRequest(f"more than {MAX_HEADER_LINES} header lines")


def _parse_head(lines: list[bytes], raw: bytes) -> _Head:
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise _BadRequest(f"invalid request line {lines[0][:200]!r}")
    version = _HTTP_VERSION.fullmatch(parts[2])
    if version is None:
        raise _BadRequest(f"invalid HTTP version {parts[2][:50]!r}")
    return _Head(
        method=parts[0].decode("ascii"),
        target=parts[1],
        http_version=f"{version[1].decode()}.{version[2].decode()}",
        headers=[_parse_field(line) for line in lines[1:]],
        raw=raw,
    )


def _parse_field(line: bytes) -> Header:
    if line[:1] in (b" ", b"\t"):
        raise _BadRequest(f"obsolete line folding in {line[:200]!r}")
    name, colon, value = line.partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise _BadRequest(f"invalid header line {line[:200]!r}")
    return name, value.strip(b" \t")


def _body_framing(headers: list[Header]) -> tuple[bool, int]:
    """Determine the request body framing as (chunked, Content-Length), per RFC 9112 section 6.3."""
    codings = _header_tokens(headers, "transfer-encoding")
    if codings:
        if codings[-1] != "chunked":
            raise _BadRequest(f"Transfer-Encoding {codings} does not end with chunked")
        return True, 0
    lengths = set(_header_tokens(headers, "content-length"))
    if not lengths:
        return False, 0
    if len(lengths) > 1 or not next(iter(lengths)).isdigit():
        raise _BadRequest(f"invalid Content-Length {sorted(lengths)}")
    return False, int(lengths.pop())


def _expects_continue(head: _Head) -> bool:
    # RFC 9110 section 10.1.1: a server ignores 100-continue in an HTTP/1.0 request.
    return head.http_version != "1.0" and "100-continue" in _header_tokens(head.headers, "expect")


async def _read_fixed_body(reader: asyncio.StreamReader, length: int, sink: _BodySink) -> None:
    remaining = length
    while remaining:
        data = await reader.read(min(remaining, READ_SIZE))
        if not data:
            raise _PeerClosed(f"connection closed after {sink.size} of {length} body bytes")
        sink.add(data)
        remaining -= len(data)


async def _read_chunked_body(reader: asyncio.StreamReader, sink: _BodySink) -> list[Header]:
    """Read chunks into `sink` and return the trailer fields."""
    while True:
        size = _parse_chunk_size(await _read_line(reader))
        if size == 0:
            return await _read_trailers(reader)
        await _read_fixed_body(reader, size, sink)
        if (await _read_line(reader)) not in (b"\r\n", b"\n"):
            raise _BadRequest("chunk data is not followed by CRLF")


def _parse_chunk_size(line: bytes) -> int:
    if not line.endswith(b"\n"):
        raise _PeerClosed("connection closed inside a chunk-size line")
    size = line.split(b";", 1)[0].strip(b" \t\r\n")  # drop chunk extensions
    if not _CHUNK_SIZE.fullmatch(size):
        raise _BadRequest(f"invalid chunk-size line {line[:200]!r}")
    return int(size, 16)


async def _read_trailers(reader: asyncio.StreamReader) -> list[Header]:
    trailers: list[Header] = []
    while True:
        line = await _read_line(reader)
        if not line.endswith(b"\n"):
            raise _PeerClosed("connection closed inside the chunked trailer section")
        if line in (b"\r\n", b"\n"):
            return trailers
        trailers.append(_parse_field(line.rstrip(b"\r\n")))
        if len(trailers) > MAX_HEADER_LINES:
            raise _BadRequest(f"more than {MAX_HEADER_LINES} trailer lines")


# Response writing.


def _status_line(status: int) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n".encode("ascii")


def _response_head(request: RecordedRequest, reply: Reply) -> bytes:
    headers = list(reply.headers)
    if not reply.raw_framing and not _status_forbids_body(reply.status):
        names = {name.lower() for name, _ in headers}
        if reply.chunked and "transfer-encoding" not in names:
            headers.append(("Transfer-Encoding", "chunked"))
        elif not reply.chunked and "content-length" not in names:
            headers.append(("Content-Length", str(reply.body_length())))
    lines = b"".join(f"{name}: {value}\r\n".encode("latin-1") for name, value in headers)
    return _status_line(reply.status) + lines + b"\r\n"


def _status_forbids_body(status: int) -> bool:
    return status < 200 or status in (204, 304)


def _has_no_body(request: RecordedRequest, reply: Reply) -> bool:
    return request.method == "HEAD" or _status_forbids_body(reply.status)


def _uses_chunked_framing(reply: Reply) -> bool:
    return reply.chunked and not reply.raw_framing


async def _send_body(reply: Reply, writer: asyncio.StreamWriter) -> bool:
    """Send the body, stopping after `fail_after` bytes for a mid-body failure.

    Return False when the connection was already closed because the body was
    delimited by closing it.
    """
    chunked = _uses_chunked_framing(reply)
    limit = reply.fail_after if reply.fail in MID_BODY_FAILURES else None
    sent = 0
    for index, piece in enumerate(reply.body_pieces()):
        if index and reply.chunk_delay:
            await asyncio.sleep(reply.chunk_delay)
        if limit is not None and sent + len(piece) >= limit:
            await _write_piece(writer, piece[: limit - sent], chunked)
            return True
        await _write_piece(writer, piece, chunked)
        sent += len(piece)
    if limit is not None:
        return True
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    if reply.raw_framing and not _declares_length(reply):
        await _close(writer)
        return False
    return True


async def _write_piece(writer: asyncio.StreamWriter, piece: bytes, chunked: bool) -> None:
    if not piece:
        return  # an empty chunk would end a chunked body
    if chunked:
        writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
    else:
        writer.write(piece)
    await writer.drain()


def _declares_length(reply: Reply) -> bool:
    return any(name.lower() in ("content-length", "transfer-encoding") for name, _ in reply.headers)


def _keeps_alive(request: RecordedRequest, reply: Reply) -> bool:
    if "close" in _header_tokens(request.headers, "connection"):
        return False
    if request.http_version == "1.0" and "keep-alive" not in _header_tokens(
        request.headers, "connection"
    ):
        return False
    reply_headers = [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in reply.headers
    ]
    return "close" not in _header_tokens(reply_headers, "connection")


async def _send_bad_request(writer: asyncio.StreamWriter, message: str) -> None:
    body = f"stand-in upstream: bad request: {message}\n".encode("latin-1", "replace")
    head = f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    with contextlib.suppress(ConnectionError):
        writer.write(_status_line(400) + head.encode("ascii") + body)
        await _close(writer)


# Failures.


async def _fail_before_response(
    mode: str | None, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    if mode == "hang":
        await writer.drain()
        await _discard_until_eof(reader)
    elif mode == "invalid":
        writer.write(INVALID_RESPONSE)
        await _close(writer)
    else:
        await _fail(mode, writer)


async def _discard_until_eof(reader: asyncio.StreamReader) -> None:
    # Hang without responding: read and drop whatever the client sends until it
    # closes. The server's stop cancels this wait.
    while await reader.read(READ_SIZE):
        pass


async def _fail(
    mode: str | None, writer: asyncio.StreamWriter, reader: asyncio.StreamReader | None = None
) -> None:
    if mode is not None and mode.startswith("reset_"):
        await _reset(writer)
    elif mode == "hang_mid_body" and reader is not None:
        await writer.drain()
        await _discard_until_eof(reader)
        await _close(writer)
    else:
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush and close with a FIN."""
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


async def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the kernel sends a TCP RST instead of a FIN."""
    await writer.drain()
    sock: Any = writer.get_extra_info("socket")
    await _wait_for_send_queue(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _wait_for_send_queue(sock: Any) -> None:
    """Wait until the kernel send queue is empty, up to RESET_FLUSH_TIMEOUT.

    With SO_LINGER 0 the kernel drops unsent bytes, so without this wait the
    peer might not receive the body bytes written just before the reset.
    TIOCOUTQ (SIOCOUTQ on Linux) reports unsent plus unacknowledged bytes.
    """
    deadline = time.monotonic() + RESET_FLUSH_TIMEOUT
    while time.monotonic() < deadline:
        try:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[
                0
            ]
        except OSError:
            return
        if queued == 0:
            return
        await asyncio.sleep(RESET_FLUSH_POLL)
