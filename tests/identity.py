"""Stand-in OAuth2 token endpoint for the credential tests.

`StandInIdentity` serves `POST /connect/token` (the client credentials grant) with
uvicorn on 127.0.0.1 in a background thread. A test sets the token lifetime,
scripts failed responses, holds responses back until it releases them, and counts the
token requests that arrived. `accepting_upstream` makes a stand-in upstream
handler that accepts only the token the identity server issued last.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import uvicorn

from tests.upstream import RecordedRequest, Reply

CLIENT_ID = "nexus-proxy-test"
CLIENT_SECRET = "cs-test-6d1f0b"
TOKEN_PATH = "/connect/token"
UNAUTHORIZED_BODY = b'{"message":"Unauthorized","errors":["Unauthorized"],"values":null}'

_STOP_TIMEOUT = 5.0

Receive = Callable[[], Coroutine[Any, Any, dict[str, Any]]]
Send = Callable[[dict[str, Any]], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class TokenRequest:
    """One request as the token endpoint received it."""

    method: str
    path: str
    content_type: str
    form: dict[str, str]


@dataclass(frozen=True)
class ScriptedResponse:
    """A scripted response that the token endpoint sends in place of a token."""

    status: int = 503
    body: bytes = b'{"error":"temporarily_unavailable"}'


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self.ready.set()


class StandInIdentity:
    """A token endpoint on loopback that issues one new token per successful request.

    `clock` dates the tokens: a token expires `expires_in` seconds after it was
    issued, as `clock` counts them, so a test can share a fake clock with the proxy.
    """

    def __init__(
        self,
        *,
        expires_in: float = 3600,
        clock: Callable[[], float] = time.monotonic,
        port: int = 0,
    ) -> None:
        self.expires_in = expires_in
        self.client_secret = CLIENT_SECRET
        self.requests: list[TokenRequest] = []
        self.issued: list[str] = []
        self._clock = clock
        self._port = port
        self._current: tuple[str, float] | None = None
        self._script: list[ScriptedResponse] = []
        self._always: ScriptedResponse | None = None
        self._condition = threading.Condition()
        self._gate: asyncio.Event | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    def __enter__(self) -> StandInIdentity:
        config = uvicorn.Config(
            self._app,
            host="127.0.0.1",
            port=self._port,
            interface="asgi3",
            lifespan="off",
            log_config=None,
        )
        self._socket = config.bind_socket()
        self._server = _Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._socket]},
            name="stand-in-identity",
            daemon=True,
        )
        self._thread.start()
        if not self._server.ready.wait(_STOP_TIMEOUT):
            raise RuntimeError("the stand-in identity server did not start")
        port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}{TOKEN_PATH}"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._thread is not None
        assert self._socket is not None
        self.release()
        self._server.should_exit = True
        self._thread.join(_STOP_TIMEOUT)
        self._socket.close()
        if self._thread.is_alive():
            raise RuntimeError("the stand-in identity server did not stop")

    # Scripting, from the test's thread.

    def fail(self, *responses: ScriptedResponse) -> None:
        """Send `responses`, one per request in order, before issuing tokens again."""
        with self._condition:
            self._script.extend(responses)

    def fail_always(self, response: ScriptedResponse | None) -> None:
        """Send `response` to every request from now on; None issues tokens again."""
        with self._condition:
            self._always = response

    def hold(self) -> None:
        """Hold every response back, after its request was recorded, until `release()`."""
        self._run_on_loop(self._close_gate)

    def release(self) -> None:
        """Send the responses held back, and respond at once from now on."""
        self._run_on_loop(self._open_gate)

    def revoke(self) -> None:
        """Make the current token invalid, as if Nexus had revoked it."""
        with self._condition:
            self._current = None

    def accepts(self, authorization: str) -> bool:
        """Whether `authorization` is `Bearer` and the latest token, unexpired and not revoked."""
        with self._condition:
            current = self._current
        if current is None:
            return False
        token, expires_at = current
        return authorization == f"Bearer {token}" and self._clock() < expires_at

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[TokenRequest]:
        """Wait until `count` token requests arrived and return all recorded so far."""
        self.wait_until(lambda: len(self.requests) >= count, timeout)
        with self._condition:
            return list(self.requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until `predicate()` is true, re-checking after every request and token."""
        with self._condition:
            if not self._condition.wait_for(predicate, timeout):
                raise TimeoutError(
                    f"condition still false after {timeout} s: {len(self.requests)} token "
                    f"requests, {len(self.issued)} tokens issued"
                )

    def _run_on_loop(self, action: Callable[[], None]) -> None:
        assert self._server is not None and self._server.loop is not None
        if self._server.loop.is_closed():
            return

        async def run() -> None:
            action()

        asyncio.run_coroutine_threadsafe(run(), self._server.loop).result(_STOP_TIMEOUT)

    def _close_gate(self) -> None:
        self._gate = asyncio.Event()

    def _open_gate(self) -> None:
        if self._gate is not None:
            self._gate.set()
            self._gate = None

    # The ASGI application, on the server's thread.

    async def _app(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        request = TokenRequest(
            method=scope["method"],
            path=scope["path"],
            content_type=headers.get("content-type", ""),
            form=dict(parse_qsl(body.decode("utf-8"))),
        )
        with self._condition:
            self.requests.append(request)
            self._condition.notify_all()

        gate = self._gate
        if gate is not None:
            await gate.wait()
        status, payload = self._respond(request)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _respond(self, request: TokenRequest) -> tuple[int, bytes]:
        with self._condition:
            scripted = self._script.pop(0) if self._script else self._always
        if scripted is not None:
            return scripted.status, scripted.body
        if request.method != "POST" or request.path != TOKEN_PATH:
            return 404, b'{"error":"not_found"}'
        form = request.form
        if form.get("grant_type") != "client_credentials":
            return 400, b'{"error":"unsupported_grant_type"}'
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != self.client_secret:
            return 400, b'{"error":"invalid_client"}'
        return 200, self._issue()

    def _issue(self) -> bytes:
        with self._condition:
            token = f"at-{len(self.issued) + 1}-{secrets.token_hex(8)}"
            self.issued.append(token)
            self._current = (token, self._clock() + self.expires_in)
            self._condition.notify_all()
        body = {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        return json.dumps(body).encode()


def accepting_upstream(identity: StandInIdentity) -> Callable[[RecordedRequest], Reply]:
    """A stand-in upstream handler: 200 for the identity server's current token, else 401."""

    def handle(request: RecordedRequest) -> Reply:
        values = request.header("authorization")
        if len(values) == 1 and identity.accepts(values[0]):
            return Reply()
        return Reply(status=401, body=UNAUTHORIZED_BODY)

    return handle
