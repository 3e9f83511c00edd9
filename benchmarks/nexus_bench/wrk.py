"""Running wrk and reading the summary that wrk_report.lua prints."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .processes import HarnessError, child_env

BENCH_DIR = Path(__file__).resolve().parent.parent
REPORT_SCRIPT = BENCH_DIR / "wrk_report.lua"
POST_SCRIPT = BENCH_DIR / "post_16k.lua"

# wrk's own per-request timeout, long enough that a slow 1 MiB response at 50 connections
# does not count as an error.
REQUEST_TIMEOUT_S = 10


@dataclass
class WrkResult:
    """The summary of one wrk run. Latencies are in milliseconds."""

    requests: int
    duration_s: float
    bytes: int
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def run_wrk(url: str, *, connections: int, duration_s: int, script: Path = REPORT_SCRIPT,
            headers: Mapping[str, str] | None = None) -> WrkResult:
    """Run wrk with one thread against `url` and return its summary.

    wrk stops by itself after `duration_s`. The subprocess timeout is a second bound
    in case it hangs.
    """
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--latency",
            f"--timeout={REQUEST_TIMEOUT_S}s", "-s", str(script)]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    try:
        completed = subprocess.run(  # noqa: S603 - argv is built here
            argv, capture_output=True, text=True, env=child_env(),
            timeout=duration_s + REQUEST_TIMEOUT_S + 30, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"wrk did not finish in {exc.timeout:.0f} s: {' '.join(argv)}") from exc
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            data = json.loads(line[len("WRK_JSON "):])
            break
    else:
        raise HarnessError(
            f"wrk exited with status {completed.returncode} without a summary: {' '.join(argv)}\n"
            f"{completed.stdout[-2000:]}{completed.stderr[-2000:]}"
        )
    return WrkResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        bytes=data["bytes"],
        mean_ms=data["latency_mean_us"] / 1000,
        p50_ms=data["latency_p50_us"] / 1000,
        p99_ms=data["latency_p99_us"] / 1000,
        max_ms=data["latency_max_us"] / 1000,
        errors=data["errors"],
    )
