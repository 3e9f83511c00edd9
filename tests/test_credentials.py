"""API keys: key file rotation, an upstream 401, and expiry warnings.

Rotation is tested through real sockets, with the proxy under uvicorn and a
stand-in upstream; time moves only when a test advances a fake clock. One test
sends a real SIGHUP to the `nexus-proxy` command.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from nexus_proxy.credentials import RepeatLimit, build_credential, fingerprint
from nexus_proxy.keyfile import ApiKey, KeyExpiry
from nexus_proxy.settings import Settings
from tests.conftest import KEY, PROXY_VARS, RunningProxy
from tests.identity import UNAUTHORIZED_BODY
from tests.upstream import RecordedRequest, Reply, StandInUpstream

NEW_KEY = "nx-rotated-key-8e21d4"
EXPIRES = date(2030, 6, 30)
STARTUP_TIMEOUT = 10.0


class FakeClock:
    """A monotonic clock that moves only when the test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeToday:
    """A date source for expiry checks."""

    def __init__(self, today: date) -> None:
        self.today = today

    def __call__(self) -> date:
        return self.today


def fp(key: str) -> str:
    return fingerprint(SecretStr(key))


def accepting(keys: list[str]) -> Callable[[RecordedRequest], Reply]:
    """An upstream handler that accepts only the last key in `keys`."""

    def handle(request: RecordedRequest) -> Reply:
        if request.header("authorization") == [f"Bearer {keys[-1]}"]:
            return Reply()
        return Reply(status=401, body=UNAUTHORIZED_BODY)

    return handle


def sent_keys(upstream: StandInUpstream) -> list[str]:
    return [
        request.header("authorization")[0].removeprefix("Bearer ") for request in upstream.requests
    ]


def start_with_file(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, path: Path, clock: FakeClock
) -> tuple[RunningProxy, ApiKey]:
    settings = Settings(api_key_file=path)
    credential = ApiKey.from_settings(settings, clock=clock)
    running = make_proxy(upstream.url, credential=credential, api_key=None, api_key_file=path)
    return running, credential


def proxy_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "nexus_proxy"]


def get(running: RunningProxy) -> httpx.Response:
    return httpx.get(running.url + "/customer")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "nexus.key"
    path.write_text(KEY + "\n")
    return path


class SecretMount:
    """A Kubernetes-style secret volume: `nexus.key -> ..data/nexus.key`, `..data -> ..v1`."""

    def __init__(self, root: Path, key: str) -> None:
        self.root = root
        self.version = 0
        self.write(key)
        (root / "nexus.key").symlink_to("..data/nexus.key")

    @property
    def path(self) -> Path:
        return self.root / "nexus.key"

    def write(self, content: str) -> None:
        """Swap in a new version directory atomically, as the kubelet does, and drop the old one."""
        old = self.root / f"..v{self.version}"
        self.version += 1
        new = self.root / f"..v{self.version}"
        new.mkdir()
        (new / "nexus.key").write_text(content)
        (self.root / "..data_tmp").symlink_to(new.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")
        if old.exists():
            (old / "nexus.key").unlink()
            old.rmdir()

    def remove_data(self) -> None:
        """Leave `..data` dangling, as between the steps of a non-atomic update."""
        (self.root / "..data").unlink()
        (self.root / "..data").symlink_to("..missing")


# Rotation.


@pytest.mark.timeout(10)
def test_key_file_rewrite_picked_up_after_interval(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    running, credential = start_with_file(make_proxy, upstream, key_file, clock)

    get(running)
    key_file.write_text(f"  {NEW_KEY}\n")
    get(running)
    clock.advance(1.0)
    get(running)

    assert sent_keys(upstream) == [KEY, KEY, NEW_KEY]
    assert credential.reloads == 1
    assert f"changed: fingerprint {fp(NEW_KEY)} replaces {fp(KEY)}" in caplog.text
    assert KEY not in caplog.text
    assert NEW_KEY not in caplog.text


@pytest.mark.timeout(10)
def test_key_file_loose_mode_not_reloaded(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    running, credential = start_with_file(make_proxy, upstream, key_file, clock)

    key_file.write_text(NEW_KEY)
    key_file.chmod(0o666)
    clock.advance(1.0)
    get(running)

    # A file anyone may write is no source for a key that moves money.
    assert sent_keys(upstream) == [KEY]
    assert credential.reloads == 0
    assert f"run 'chmod 600 {key_file}'" in caplog.text


@pytest.mark.timeout(10)
def test_key_file_symlink_swap_picked_up(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, tmp_path: Path
) -> None:
    mount = SecretMount(tmp_path, KEY + "\n")
    clock = FakeClock()
    running, credential = start_with_file(make_proxy, upstream, mount.path, clock)

    get(running)
    mount.write(NEW_KEY + "\n")
    clock.advance(1.0)
    get(running)

    assert sent_keys(upstream) == [KEY, NEW_KEY]
    assert credential.fingerprint == fp(NEW_KEY)


@pytest.mark.timeout(10)
def test_key_file_missing_or_empty_keeps_key(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    mount = SecretMount(tmp_path, KEY + "\n")
    clock = FakeClock()
    running, credential = start_with_file(make_proxy, upstream, mount.path, clock)

    mount.remove_data()
    clock.advance(1.0)
    get(running)
    mount.write("\n")
    clock.advance(60.0)  # past the one-minute limit on repeated warnings
    get(running)
    mount.write(NEW_KEY + "\n")
    clock.advance(1.0)
    get(running)

    assert sent_keys(upstream) == [KEY, KEY, NEW_KEY]
    assert "No such file or directory; keeping the last good secret" in caplog.text
    assert f"is empty; keeping the last good secret (fingerprint {fp(KEY)})" in caplog.text
    assert "contains a valid secret again" in caplog.text
    assert credential.reloads == 1


@pytest.mark.timeout(10)
def test_key_file_checked_at_most_once_a_second(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, key_file: Path
) -> None:
    clock = FakeClock()
    running, _ = start_with_file(make_proxy, upstream, key_file, clock)

    key_file.write_text(NEW_KEY)
    clock.advance(0.9)
    get(running)
    clock.advance(0.1)
    get(running)

    assert sent_keys(upstream) == [KEY, NEW_KEY]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"nx key with spaces", id="inner-space"),
        pytest.param(b"nx-key\x07bell", id="control-character"),
        pytest.param(b"\xff\xfe\x00", id="not-utf-8"),
        pytest.param(b"k" * (64 * 1024 + 1), id="too-large"),
    ],
)
def test_key_file_invalid_content_keeps_key(
    content: bytes, key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    credential = ApiKey.from_settings(Settings(api_key_file=key_file), clock=clock)
    key_file.write_bytes(content)
    clock.advance(1.0)

    authorization = asyncio.run(credential.authorization())

    assert authorization == f"Bearer {KEY}".encode()
    assert "keeping the last good secret" in caplog.text
    assert content[:6].decode("latin-1") not in caplog.text


@pytest.mark.timeout(10)
def test_key_file_reload_reads_at_once(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    running, _ = start_with_file(make_proxy, upstream, key_file, FakeClock())

    key_file.write_text(NEW_KEY)
    running.app.credential.reload()  # what SIGHUP calls, from another thread
    get(running)
    running.app.credential.reload()

    assert sent_keys(upstream) == [NEW_KEY]
    # The second reload runs on the proxy's loop; a request after it proves it ran.
    get(running)
    assert f"still contains the key with fingerprint {fp(NEW_KEY)}" in caplog.text


@pytest.mark.timeout(30)
def test_sighup_rereads_key_file(upstream: StandInUpstream, key_file: Path) -> None:
    key_file.chmod(0o600)
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NEXUS_PROXY_") and name.upper() not in PROXY_VARS
    }
    command = [sys.executable, "-m", "nexus_proxy", "--api-key-file", str(key_file)]
    command += ["--upstream-url", upstream.url, "--port", "0", "--egress-proxy", ""]
    with subprocess.Popen(
        command, env=environment, stderr=subprocess.PIPE, text=True, encoding="utf-8"
    ) as process:
        lines = _stream_lines(process)
        try:
            listening = _wait_for_line(lines, "listening on http://")
            url = listening.split("listening on ", 1)[1].split(",", 1)[0]
            key_file.write_text(NEW_KEY + "\n")
            process.send_signal(signal.SIGHUP)
            _wait_for_line(lines, f"fingerprint {fp(NEW_KEY)} replaces")
            response = httpx.get(url + "/customer")
        finally:
            process.send_signal(signal.SIGTERM)
            returncode = process.wait(STARTUP_TIMEOUT)

    assert response.status_code == 200
    assert sent_keys(upstream) == [NEW_KEY]
    assert returncode == 0


def _stream_lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue[str], fragment: str) -> str:
    seen = []
    while True:
        try:
            line = lines.get(timeout=STARTUP_TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no log line with {fragment!r}; got {seen}") from None
        seen.append(line)
        if fragment in line:
            return line


# An upstream 401.


@pytest.mark.timeout(10)
def test_key_401_rereads_file_and_repeats_get(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = [KEY]
    upstream.reply_with(accepting(keys))
    running, credential = start_with_file(make_proxy, upstream, key_file, FakeClock())
    key_file.write_text(NEW_KEY)
    keys.append(NEW_KEY)

    response = get(running)

    assert response.status_code == 200
    assert sent_keys(upstream) == [KEY, NEW_KEY]
    assert credential.unauthorized == 1
    assert f"401 Unauthorized for the API key with fingerprint {fp(KEY)}" in caplog.text


@pytest.mark.timeout(10)
def test_key_401_post_not_repeated(
    make_proxy: Callable[..., RunningProxy], upstream: StandInUpstream, key_file: Path
) -> None:
    keys = [KEY]
    upstream.reply_with(accepting(keys))
    running, _ = start_with_file(make_proxy, upstream, key_file, FakeClock())
    key_file.write_text(NEW_KEY)
    keys.append(NEW_KEY)

    response = httpx.post(running.url + "/token/payments", content=b'{"amount": "1.5"}')
    after = get(running)

    assert response.status_code == 401
    assert response.content == UNAUTHORIZED_BODY
    assert after.status_code == 200
    assert sent_keys(upstream) == [KEY, NEW_KEY]


@pytest.mark.timeout(10)
def test_key_401_without_file_is_final(
    make_proxy: Callable[..., RunningProxy],
    upstream: StandInUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.reply_with(Reply(status=401, body=UNAUTHORIZED_BODY))
    running = make_proxy(upstream.url)

    response = get(running)

    assert response.status_code == 401
    assert len(upstream.requests) == 1
    assert running.app.credential.unauthorized == 1
    assert f"401 Unauthorized for the API key with fingerprint {fp(KEY)}" in caplog.text
    assert KEY not in caplog.text


def test_key_401_warnings_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    credential = ApiKey(SecretStr(KEY), clock=clock)
    authorization = f"Bearer {KEY}".encode()

    async def reject(times: int) -> None:
        for _ in range(times):
            await credential.rejected(authorization)

    asyncio.run(reject(3))
    first = proxy_messages(caplog)
    clock.advance(60.0)
    asyncio.run(reject(1))
    warnings = proxy_messages(caplog)

    assert len(first) == 1
    assert len(warnings) == 2
    assert warnings[1].endswith("(2 more since the last warning)")
    assert credential.unauthorized == 4


def test_repeat_limit_counts_suppressed() -> None:
    clock = FakeClock()
    limit = RepeatLimit(60.0, clock)

    allowed = [limit.allow() for _ in range(4)]
    clock.advance(60.0)

    assert allowed == [0, None, None, None]
    assert limit.allow() == 3
    assert limit.allow() is None


# Expiry warnings.


@pytest.mark.parametrize(
    ("days_left", "level", "fragment"),
    [
        pytest.param(15, None, None, id="before-window"),
        pytest.param(14, logging.WARNING, "(in 14 days)", id="window-starts"),
        pytest.param(1, logging.WARNING, "(in 1 day)", id="last-day"),
        pytest.param(0, logging.WARNING, "(today)", id="expiry-day"),
        pytest.param(-1, logging.ERROR, "expired on 2030-06-30 (1 day ago)", id="expired"),
    ],
)
def test_expiry_check_logs(
    days_left: int,
    level: int | None,
    fragment: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expiry = KeyExpiry(EXPIRES, FakeToday(EXPIRES - timedelta(days=days_left)))

    expiry.check()

    assert expiry.days_left() == days_left
    assert [record.levelno for record in caplog.records] == ([level] if level else [])
    if fragment is not None:
        assert fragment in caplog.text


def test_expiry_logged_once_a_day(caplog: pytest.LogCaptureFixture) -> None:
    today = FakeToday(EXPIRES - timedelta(days=3))
    expiry = KeyExpiry(EXPIRES, today)

    expiry.check()
    expiry.check()
    today.today += timedelta(days=1)
    expiry.check()
    today.today += timedelta(days=5)
    expiry.check()
    expiry.check()

    messages = proxy_messages(caplog)
    assert len(messages) == 3
    assert "in 3 days" in messages[0]
    assert "in 2 days" in messages[1]
    assert "(3 days ago)" in messages[2]


def test_expiry_warned_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    credential = ApiKey(
        SecretStr(KEY), expires=EXPIRES, today=FakeToday(EXPIRES - timedelta(days=5))
    )

    async def run() -> None:
        await credential.start()
        await credential.aclose()

    asyncio.run(run())

    assert "the API key expires on 2030-06-30 (in 5 days)" in caplog.text
    assert credential.expiry_days() == 5


def test_expiry_days_none_after_rotation(key_file: Path) -> None:
    clock = FakeClock()
    settings = Settings(api_key_file=key_file, api_key_expires=EXPIRES)
    credential = ApiKey.from_settings(settings, clock=clock, today=FakeToday(EXPIRES))

    before = credential.expiry_days()
    key_file.write_text(NEW_KEY)
    clock.advance(1.0)
    asyncio.run(credential.authorization())

    assert before == 0
    assert credential.expiry_days() is None


def test_expiry_days_none_without_date() -> None:
    assert ApiKey(SecretStr(KEY)).expiry_days() is None


# Building the credential.


def test_build_credential_from_key_file(key_file: Path) -> None:
    key_file.write_text(f"\n\t{KEY}  \n")

    credential = build_credential(Settings(api_key_file=key_file))

    assert credential.kind == "api_key"
    assert credential.fingerprints() == {"api_key": fp(KEY)}
    assert KEY not in repr(credential)
