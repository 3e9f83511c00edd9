"""The command line, run as real subprocesses: `nexus-proxy` and `python -m nexus_proxy`.

`check` never contacts anything. Every test that serves passes `--upstream-url` of a
stand-in on loopback, because the default environment is a public host.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from nexus_proxy import __version__
from tests.conftest import KEY, PROXY_VARS
from tests.upstream import StandInUpstream

SCRIPT = Path(sysconfig.get_path("scripts")) / "nexus-proxy"
MODULE = (sys.executable, "-m", "nexus_proxy")
ENTRY_POINTS = [
    pytest.param((str(SCRIPT),), id="script"),
    pytest.param(MODULE, id="module"),
]

RUN_TIMEOUT = 20.0
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")

CONFIG_ERROR_EXIT = 2


def subprocess_environment(**variables: str) -> dict[str, str]:
    """Copy os.environ without proxy or NEXUS_PROXY_* variables, then add `variables`."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("NEXUS_PROXY_") and name.upper() not in PROXY_VARS
    }
    environment.update(variables)
    return environment


def key_fingerprint(key: str) -> str:
    """Format a key the way the proxy shows it: the first 8 hex digits of its SHA-256."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _run(
    args: Sequence[str],
    cwd: Path,
    environment: Mapping[str, str] | None = None,
    command: Sequence[str] = (str(SCRIPT),),
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=subprocess_environment(**(environment or {})),
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=RUN_TIMEOUT,
        check=False,
    )


def _check(
    args: Sequence[str], cwd: Path, environment: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run `nexus-proxy check` and return the settings it printed."""
    result = _run(["check", *args], cwd, environment)
    assert result.returncode == 0, result.stderr
    settings: dict[str, Any] = json.loads(result.stdout)
    return settings


class ProxyProcess:
    """A `nexus-proxy` subprocess whose output lines a background thread collects."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.port = 0
        self.startup_line = ""
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="proxy-output", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """Process id of the proxy."""
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for an output line that matches `pattern`, failing at the deadline or at EOF."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                status = self.process.wait()
                raise AssertionError(
                    f"the proxy exited with status {status} before logging "
                    f"{pattern.pattern!r}; output: {self.lines}"
                )
            match = pattern.search(line)
            if match is not None:
                return match
        raise AssertionError(
            f"no line matched {pattern.pattern!r} within {timeout} s: {self.lines}"
        )

    def wait_until_listening(self) -> None:
        """Wait for the startup line and store it and the port it names."""
        match = self.wait_for_line(LISTENING, STARTUP_TIMEOUT)
        self.port = int(match[1])
        self.startup_line = match.string

    @property
    def url(self) -> str:
        """Base URL the proxy listens on."""
        return f"http://127.0.0.1:{self.port}"

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """Send SIGTERM, wait for the exit status and for the last output line."""
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout)
        self._reader.join(timeout)
        return status

    def close(self) -> None:
        """Kill the process if it still runs and release its pipe."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()


@contextmanager
def start_proxy(upstream_url: str, *args: str) -> Iterator[ProxyProcess]:
    """Start `nexus-proxy` on an ephemeral loopback port in front of `upstream_url`.

    Yields once the proxy has logged the port it listens on. The key is KEY, from
    NEXUS_PROXY_API_KEY. Stdout and stderr are merged, so every line the proxy
    writes is collected.
    """
    process = subprocess.Popen(
        [str(SCRIPT), "--upstream-url", upstream_url, "--port", "0", *args],
        env=subprocess_environment(NEXUS_PROXY_API_KEY=KEY),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    proxy = ProxyProcess(process)
    try:
        proxy.wait_until_listening()
        yield proxy
    finally:
        proxy.close()


# --version


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_version_prints_package_version(command: tuple[str, ...], tmp_path: Path) -> None:
    result = _run(["--version"], tmp_path, command=command)

    assert result.returncode == 0
    assert result.stdout.strip() == f"nexus-proxy {__version__}"


# check


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_check_prints_key_only_as_fingerprint(command: tuple[str, ...], tmp_path: Path) -> None:
    result = _run(["check"], tmp_path, {"NEXUS_PROXY_API_KEY": KEY}, command=command)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["api_key"] == key_fingerprint(KEY)
    assert KEY not in result.stdout
    assert KEY not in result.stderr


def test_check_prints_effective_upstream(tmp_path: Path) -> None:
    settings = _check(
        ["--upstream-url", "http://127.0.0.1:9/base/"], tmp_path, {"NEXUS_PROXY_API_KEY": KEY}
    )

    assert settings["upstream"] == "http://127.0.0.1:9/base"


def test_check_key_file_is_stripped(tmp_path: Path) -> None:
    (tmp_path / "nexus.key").write_text(f"  \n\t{KEY}  \n\n")

    settings = _check(["--api-key-file", "nexus.key"], tmp_path)

    assert settings["api_key"] == key_fingerprint(KEY)


# Precedence: flag > NEXUS_PROXY_<FIELD> > TOML file > default.

PRECEDENCE_FIELDS = ("port", "environment", "read_timeout", "iso8601")
DEFAULT_VALUES = {"port": 8080, "environment": "test", "read_timeout": 60.0, "iso8601": True}
TOML_VALUES = {"port": 9001, "environment": "production", "read_timeout": 11.5, "iso8601": False}
OTHER_TOML_VALUES = {"port": 9004, "environment": "dcts", "read_timeout": 14.5, "iso8601": True}
ENV_VALUES = {"port": 9002, "environment": "dcts", "read_timeout": 12.5, "iso8601": True}
FLAG_VALUES = {"port": 9003, "environment": "test", "read_timeout": 13.5, "iso8601": False}
ENV_SETTINGS = {
    "NEXUS_PROXY_PORT": "9002",
    "NEXUS_PROXY_ENVIRONMENT": "dcts",
    "NEXUS_PROXY_READ_TIMEOUT": "12.5",
    "NEXUS_PROXY_ISO8601": "true",
}
FLAG_SETTINGS = (
    "--port",
    "9003",
    "--environment",
    "test",
    "--read-timeout",
    "13.5",
    "--no-iso8601",
)


def _toml(values: Mapping[str, Any]) -> str:
    return (
        f"port = {values['port']}\n"
        f'environment = "{values["environment"]}"\n'
        f"read_timeout = {values['read_timeout']}\n"
        f"iso8601 = {str(values['iso8601']).lower()}\n"
    )


@pytest.mark.parametrize(
    ("config_from", "with_env", "with_flags", "expected"),
    [
        pytest.param(None, False, False, DEFAULT_VALUES, id="defaults"),
        pytest.param("flag", False, False, TOML_VALUES, id="toml-via-config-flag"),
        pytest.param("env", False, False, TOML_VALUES, id="toml-via-config-env"),
        pytest.param("both", False, False, TOML_VALUES, id="config-flag-over-config-env"),
        pytest.param(None, True, False, ENV_VALUES, id="env-over-default"),
        pytest.param("flag", True, False, ENV_VALUES, id="env-over-toml"),
        pytest.param(None, False, True, FLAG_VALUES, id="flag-over-default"),
        pytest.param("flag", False, True, FLAG_VALUES, id="flag-over-toml"),
        pytest.param(None, True, True, FLAG_VALUES, id="flag-over-env"),
        pytest.param("env", True, True, FLAG_VALUES, id="flag-over-env-and-toml"),
    ],
)
def test_check_applies_precedence(
    config_from: str | None,
    with_env: bool,
    with_flags: bool,
    expected: dict[str, Any],
    tmp_path: Path,
) -> None:
    (tmp_path / "proxy.toml").write_text(_toml(TOML_VALUES))
    (tmp_path / "other.toml").write_text(_toml(OTHER_TOML_VALUES))
    args: list[str] = []
    environment = {"NEXUS_PROXY_API_KEY": KEY}
    if config_from in ("flag", "both"):
        args += ["--config", "proxy.toml"]
    if config_from == "env":
        environment["NEXUS_PROXY_CONFIG"] = "proxy.toml"
    if config_from == "both":
        environment["NEXUS_PROXY_CONFIG"] = "other.toml"
    if with_env:
        environment.update(ENV_SETTINGS)
    if with_flags:
        args += FLAG_SETTINGS

    settings = _check(args, tmp_path, environment)

    assert {field: settings[field] for field in PRECEDENCE_FIELDS} == expected


# Configuration errors: exit 2, name the setting and the fix, never echo a secret.

SECRET = "s3cret-value-81b2"
SPACE_KEY = "nx-inner-4c1e space-key-77d0"
CONTROL_KEY = "nx-control-5a2f\x07bell-key-90e3"
FILE_KEY = "nx-from-file-2d6b"
WITH_KEY = {"NEXUS_PROXY_API_KEY": KEY}


@pytest.mark.parametrize(
    ("args", "environment", "files", "expected", "secrets"),
    [
        pytest.param(
            ["--config", "missing.toml"],
            WITH_KEY,
            {},
            ["config", "missing.toml", "no such file"],
            [KEY],
            id="config-flag-missing-file",
        ),
        pytest.param(
            [],
            {**WITH_KEY, "NEXUS_PROXY_CONFIG": "missing.toml"},
            {},
            ["config", "missing.toml", "no such file"],
            [KEY],
            id="config-env-missing-file",
        ),
        pytest.param(
            ["--config", "proxy.toml"],
            WITH_KEY,
            {"proxy.toml": "port = 9001\nbogus_key = 1\n"},
            ["bogus_key", "unknown setting"],
            [KEY],
            id="unknown-toml-key",
        ),
        pytest.param(
            ["--port=70000", "--environment", SECRET],
            WITH_KEY,
            {},
            ["port", "--port", "NEXUS_PROXY_PORT", "environment", "--environment"],
            [KEY, SECRET],
            id="bad-port-and-environment",
        ),
        pytest.param(
            ["--port=70000", "--config", "proxy.toml"],
            {**WITH_KEY, "NEXUS_PROXY_ENVIRONMENT": SECRET},
            {"proxy.toml": "read_timeout = -1\n"},
            [
                "port",
                "--port",
                "environment",
                "NEXUS_PROXY_ENVIRONMENT",
                "read_timeout",
                "NEXUS_PROXY_READ_TIMEOUT",
            ],
            [KEY, SECRET],
            id="bad-values-from-every-source",
        ),
        pytest.param(
            [f"--foo={SECRET}"],
            WITH_KEY,
            {},
            ["--foo", "--help"],
            [KEY, SECRET],
            id="unknown-flag-with-equals",
        ),
        pytest.param(
            ["--foo", SECRET],
            WITH_KEY,
            {},
            ["--foo", "--help"],
            [KEY, SECRET],
            id="unknown-flag-with-value",
        ),
        pytest.param(
            ["--api-key", SECRET],
            {},
            {},
            ["api_key", "NEXUS_PROXY_API_KEY", "--api-key-file"],
            [SECRET],
            id="api-key-flag",
        ),
        pytest.param(
            [f"--api-key={SECRET}"],
            {},
            {},
            ["api_key", "NEXUS_PROXY_API_KEY", "--api-key-file"],
            [SECRET],
            id="api-key-flag-with-equals",
        ),
        pytest.param(
            [],
            {},
            {},
            ["api_key", "NEXUS_PROXY_API_KEY", "api_key_file"],
            [],
            id="missing-key",
        ),
        pytest.param(
            [],
            {"NEXUS_PROXY_API_KEY": "  \n"},
            {},
            ["api_key", "empty", "NEXUS_PROXY_API_KEY"],
            [],
            id="blank-key",
        ),
        pytest.param(
            ["--api-key-file", "nexus.key"],
            {},
            {"nexus.key": " \n\t\n"},
            ["api_key", "empty", "api_key_file"],
            [],
            id="blank-key-file",
        ),
        pytest.param(
            [],
            {"NEXUS_PROXY_API_KEY": SPACE_KEY},
            {},
            ["api_key", "NEXUS_PROXY_API_KEY", "spaces"],
            SPACE_KEY.split(),
            id="key-with-inner-space",
        ),
        pytest.param(
            [],
            {"NEXUS_PROXY_API_KEY": CONTROL_KEY},
            {},
            ["api_key", "NEXUS_PROXY_API_KEY", "control"],
            CONTROL_KEY.split("\x07"),
            id="key-with-control-character",
        ),
        pytest.param(
            ["--api-key-file", "nexus.key"],
            WITH_KEY,
            {"nexus.key": FILE_KEY},
            ["api_key", "NEXUS_PROXY_API_KEY", "api_key_file", "not both"],
            [KEY, FILE_KEY],
            id="key-and-key-file",
        ),
        pytest.param(
            ["--api-key-file", "missing.key"],
            {},
            {},
            ["api_key_file", "missing.key", "no such file"],
            [],
            id="key-file-missing",
        ),
    ],
)
def test_check_rejects_bad_configuration(
    args: list[str],
    environment: dict[str, str],
    files: dict[str, str],
    expected: list[str],
    secrets: list[str],
    tmp_path: Path,
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)

    result = _run(["check", *args], tmp_path, environment)

    assert result.returncode == CONFIG_ERROR_EXIT
    assert result.stdout == ""
    for fragment in expected:
        assert fragment in result.stderr
    for secret in secrets:
        assert secret not in result.stderr
        assert secret not in result.stdout


# Error reporting edge cases


def test_check_key_conflict_suggests_real_options(tmp_path: Path) -> None:
    (tmp_path / "nexus.key").write_text(FILE_KEY)

    result = _run(["check", "--api-key-file", "nexus.key"], tmp_path, WITH_KEY)

    assert result.returncode == CONFIG_ERROR_EXIT
    assert "--configuration" not in result.stderr
    assert "NEXUS_PROXY_CONFIGURATION" not in result.stderr


def test_check_flag_without_value_exits_2(tmp_path: Path) -> None:
    result = _run(["check", "--port"], tmp_path, WITH_KEY)

    assert result.returncode == CONFIG_ERROR_EXIT
    assert "Traceback" not in result.stderr
    assert "--port" in result.stderr


def test_check_negative_value_names_its_setting(tmp_path: Path) -> None:
    result = _run(["check", "--read-timeout", "-1"], tmp_path, WITH_KEY)

    assert result.returncode == CONFIG_ERROR_EXIT
    assert "read_timeout" in result.stderr
    assert "unknown option" not in result.stderr


# Serving


@pytest.mark.timeout(20)
def test_serve_sends_key_upstream(upstream: StandInUpstream) -> None:
    with start_proxy(upstream.url) as proxy:
        response = httpx.get(f"{proxy.url}/customer", timeout=10)

    assert response.status_code == 200
    assert upstream.requests[0].header("authorization") == [f"Bearer {KEY}"]


@pytest.mark.timeout(20)
def test_serve_startup_line_names_upstream_and_fingerprint(upstream: StandInUpstream) -> None:
    with start_proxy(upstream.url) as proxy:
        line = proxy.startup_line

    assert proxy.port > 0
    assert upstream.url in line
    assert "environment test" in line
    assert key_fingerprint(KEY).removeprefix("sha256:") in line


@pytest.mark.timeout(20)
@pytest.mark.parametrize("level", ["info", "debug"])
def test_serve_logs_omit_key(level: str, upstream: StandInUpstream) -> None:
    with start_proxy(upstream.url, "--log-level", level) as proxy:
        httpx.get(f"{proxy.url}/customer?page=1", timeout=10)
        proxy.terminate()

    assert len(upstream.requests) == 1
    for line in proxy.lines:
        assert KEY not in line


@pytest.mark.timeout(20)
def test_serve_sigterm_exits_0(upstream: StandInUpstream) -> None:
    with start_proxy(upstream.url) as proxy:
        httpx.get(f"{proxy.url}/customer", timeout=10)

        status = proxy.terminate(timeout=STOP_TIMEOUT)

    assert status == 0


@pytest.mark.timeout(20)
def test_serve_accepts_once_listening_is_logged(upstream: StandInUpstream) -> None:
    # The client is built before the proxy starts, because building it loads CA
    # certificates, which can take long enough to hide a line logged before listen().
    with httpx.Client(timeout=10) as client, start_proxy(upstream.url) as proxy:
        response = client.get(f"{proxy.url}/customer")

    assert response.status_code == 200
