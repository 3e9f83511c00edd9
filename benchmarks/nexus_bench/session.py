"""One benchmark session: start the servers, run every workload on every target, measure.

All servers listen on 127.0.0.1 and are stopped in `Session.close`, which `run.py`
calls from a `finally` block.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import nginx, targets
from .nginx import INJECTED_HEADERS, LARGE_PATH, SMALL_PATH, UPLOAD_PATH
from .processes import (
    LOOPBACK,
    HarnessError,
    ManagedProcess,
    MissingToolError,
    RssSampler,
    cpu_seconds,
    free_port,
    memory_mib,
    own_cpu_seconds,
    reset_peak_rss,
    system_cpu_seconds,
)
from .report import DIRECT, NEXUS, NEXUS_2W, NGINX, PEERS
from .transfer import TransferResult, download, small_gets, upload
from .wrk import POST_SCRIPT, REPORT_SCRIPT, WrkResult, run_wrk

MIB = 1024 * 1024

# A run is repeated when processes outside the benchmark used more than this many
# cores on average during it (from /proc/stat minus the benchmark's own processes).
BUSY_CORES = 0.25
# A workload is repeated when the direct row and a direct probe after the other rows
# differ by more than this fraction of req/s.
DRIFT_LIMIT = 0.20
TRANSFER_LIMIT_S = 600.0


@dataclass(frozen=True)
class Mode:
    """Durations and sizes of a full or a quick run."""

    quick: bool
    duration_s: int
    warmup_s: int
    transfer_bytes: int
    # Full runs warm up before every row, quick runs only before a target's first row.
    warmup_every_row: bool
    drift_probe_s: int | None
    max_attempts: int
    max_workload_attempts: int
    # Seconds of measurement that repeats may add to the whole run, so a machine that
    # stays busy cannot stretch the run without bound.
    repeat_budget_s: int


FULL = Mode(quick=False, duration_s=10, warmup_s=2, transfer_bytes=1024 * MIB,
            warmup_every_row=True, drift_probe_s=2, max_attempts=3, max_workload_attempts=2,
            repeat_budget_s=150)
QUICK = Mode(quick=True, duration_s=2, warmup_s=1, transfer_bytes=64 * MIB,
             warmup_every_row=False, drift_probe_s=None, max_attempts=2,
             max_workload_attempts=1, repeat_budget_s=2)


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    path: str
    connections: int
    script: Path


WORKLOADS = (
    Workload("small_get_c1", "small GET, 1 conn", SMALL_PATH, 1, REPORT_SCRIPT),
    Workload("small_get_c50", "small GET, 50 conns", SMALL_PATH, 50, REPORT_SCRIPT),
    Workload("get_1mib_c50", "1 MiB GET, 50 conns", LARGE_PATH, 50, REPORT_SCRIPT),
    Workload("post_16kib_c50", "16 KiB POST, 50 conns", UPLOAD_PATH, 50, POST_SCRIPT),
)
# The only workload the 2-worker goal compares; quick runs give 2 workers no other.
TWO_WORKER_GOAL_KEYS = frozenset({"small_get_c50"})


@dataclass
class Target:
    """A place wrk sends requests to: the upstream itself or a proxy in front of it."""

    key: str
    label: str
    port: int | None = None
    process: ManagedProcess | None = None
    # Headers wrk sends itself; only the direct row needs them.
    headers: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    reason: str = ""
    # Keys of the workloads this target runs, or None for all of them.
    workloads: frozenset[str] | None = None
    warmed: bool = False

    def runs(self, workload: Workload) -> bool:
        return self.workloads is None or workload.key in self.workloads

    def pids(self) -> list[int]:
        return self.process.tree() if self.process is not None else []


def wrk_binary() -> str:
    """Return the wrk path, or raise MissingToolError naming the Debian package."""
    found = shutil.which("wrk")
    if found is None:
        raise MissingToolError("wrk not found on PATH; install it with 'apt-get install -y wrk'")
    return found


def _command_version(argv: list[str]) -> str:
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10,  # noqa: S603
                                   check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (completed.stdout + completed.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Return the facts about this machine that docs/benchmarks.md lists."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    packages = {name: _package_version(name)
                for name in ("nexus-proxy", "uvicorn", "httpx", "starlette", "uvloop", "httptools")}
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _command_version([nginx.nginx_binary(), "-v"]),
        "wrk": _command_version([wrk_binary(), "-v"]),
        "packages": {name: version for name, version in packages.items() if version},
    }


def _peak_rss(pids: list[int], hwm_reset: bool, sampler: RssSampler) -> float | None:
    """Return the peak RSS in MiB since the reset, from VmHWM or else from the sampler."""
    if not pids:
        return None
    if hwm_reset:
        return memory_mib(pids, "VmHWM")
    return sampler.max_mib


class Session:
    """Servers, targets and results of one benchmark run."""

    def __init__(self, mode: Mode, tmp: Path, log: Callable[[str], None]) -> None:
        self.mode = mode
        self.tmp = tmp
        self.log = log
        self.servers: list[ManagedProcess] = []
        self.targets: list[Target] = []
        self.rows: list[dict[str, Any]] = []
        self.transfers: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.idle_rss_samples: list[float] = []
        self.upstream_port = 0
        self.peer_versions: dict[str, str] = {}
        self.nexus_workers_flag = False
        self.repeat_seconds_left = mode.repeat_budget_s
        # Flags passed to every nexus-proxy besides --workers, when its --help lists them.
        self.nexus_options: dict[str, str] = {}

    # -- servers ---------------------------------------------------------------

    def _start(self, process: ManagedProcess) -> ManagedProcess:
        self.servers.append(process)
        return process

    def _stop(self, process: ManagedProcess | None) -> None:
        if process is not None:
            process.stop()
            if process in self.servers:
                self.servers.remove(process)

    def close(self) -> None:
        """Stop every server, the most recently started first."""
        for process in reversed(list(self.servers)):
            process.stop()
        self.servers.clear()

    @property
    def upstream_url(self) -> str:
        return f"http://{LOOPBACK}:{self.upstream_port}"

    def start(self, peer_python: Path | None, peer_error: str | None) -> None:
        """Start the upstream and every target, then check that each one returns 200."""
        nginx.write_upstream_files(self.tmp, self.mode.transfer_bytes)
        self.upstream_port, sink_port = free_port(), free_port()
        upstream = self._start(nginx.start_upstream(self.tmp, self.upstream_port, sink_port))
        upstream.wait_for_port(self.upstream_port, 10)
        upstream.wait_for_port(sink_port, 10)

        direct = Target(DIRECT, "direct", port=self.upstream_port, headers=dict(INJECTED_HEADERS))
        proxy_port = free_port()
        proxy = Target(NGINX, "nginx proxy", port=proxy_port,
                       process=self._start(nginx.start_proxy(self.tmp, proxy_port,
                                                             self.upstream_port)))
        nexus_help = targets.nexus_help()
        self.nexus_workers_flag = "--workers" in nexus_help
        # Newer nexus-proxy versions cap request bodies at 100 MiB by default. The upload
        # transfer needs room for its whole body.
        if "--max-body-size" in nexus_help:
            self.nexus_options["--max-body-size"] = str(self.mode.transfer_bytes)
        one = self._nexus_target(NEXUS, "nexus-proxy 1w", workers=1)
        if self.nexus_workers_flag:
            two = self._nexus_target(NEXUS_2W, "nexus-proxy 2w", workers=2)
            if self.mode.quick:
                two.workloads = TWO_WORKER_GOAL_KEYS
        else:
            two = Target(NEXUS_2W, "nexus-proxy 2w", status="not supported",
                         reason="nexus-proxy --help has no --workers")
        self.targets = [direct, proxy, one, two]

        for name in PEERS:
            peer = Target(name, name)
            if self.mode.quick:
                peer.status, peer.reason = "skipped", "peers are skipped in --quick"
            elif peer_python is None:
                peer.status, peer.reason = "not available", peer_error or ""
            else:
                peer.port = free_port()
                peer.process = self._start(targets.start_peer(
                    self.tmp, name, peer_python, peer.port, self.upstream_url))
            self.targets.append(peer)

        for target in self.targets:
            self._check_ready(target)

    def _nexus_target(self, key: str, label: str, workers: int) -> Target:
        port = free_port()
        options = dict(self.nexus_options)
        if self.nexus_workers_flag:
            options["--workers"] = str(workers)
        process = self._start(targets.start_nexus(self.tmp, port, self.upstream_url, key, options))
        return Target(key, label, port=port, process=process)

    def _check_ready(self, target: Target) -> None:
        if target.status != "ok":
            return
        assert target.port is not None
        try:
            if target.process is not None:
                target.process.wait_for_port(target.port, targets.STARTUP_TIMEOUT_S)
            small_gets(target.port, 5, target.headers)
        except HarnessError as exc:
            # The upstream, nginx and the nexus-proxy under test must work. A peer or
            # the 2-worker variant that fails is reported in its row instead.
            if target.key in (DIRECT, NGINX, NEXUS):
                raise
            target.status, target.reason = "failed", str(exc).splitlines()[0]
            self.notes.append(f"{target.label} failed to start: {exc}")
            self._stop(target.process)
            target.process = None

    # -- wrk rows --------------------------------------------------------------

    def run_workloads(self) -> None:
        """Run every workload on every target, repeating a workload whose direct row drifted."""
        for workload in WORKLOADS:
            best: tuple[float, list[dict[str, Any]]] | None = None
            for attempt in range(1, self.mode.max_workload_attempts + 1):
                rows = [self._row(target, workload) for target in self.targets]
                drift = self._direct_drift(workload, rows)
                if best is None or drift < best[0]:
                    best = (drift, rows)
                if drift <= DRIFT_LIMIT:
                    break
                cost = self._workload_seconds(workload)
                repeat = (attempt < self.mode.max_workload_attempts
                          and self.repeat_seconds_left >= cost)
                action = "repeating it" if repeat else "keeping the steadiest attempt"
                self.notes.append(
                    f"{workload.label}: direct req/s moved {drift:.0%} between the direct row "
                    f"and a probe after the other rows (attempt {attempt}); {action}")
                self.log(self.notes[-1])
                if not repeat:
                    break
                self.repeat_seconds_left -= cost
            assert best is not None
            self.rows.extend(best[1])

    def _workload_seconds(self, workload: Workload) -> int:
        """Return the seconds of wrk runs that one more attempt at `workload` takes."""
        rows = sum(1 for target in self.targets if target.status == "ok" and target.runs(workload))
        warmup = self.mode.warmup_s if self.mode.warmup_every_row else 0
        return rows * (warmup + self.mode.duration_s) + (self.mode.drift_probe_s or 0)

    def _direct_drift(self, workload: Workload, rows: list[dict[str, Any]]) -> float:
        if self.mode.drift_probe_s is None:
            return 0.0
        direct = next(row for row in rows if row["target"] == DIRECT)
        probe = run_wrk(self._url(self.targets[0], workload), connections=workload.connections,
                        duration_s=self.mode.drift_probe_s, script=workload.script,
                        headers=self.targets[0].headers)
        return abs(probe.rps / direct["rps"] - 1) if direct["rps"] else 0.0

    @staticmethod
    def _url(target: Target, workload: Workload) -> str:
        return f"http://{LOOPBACK}:{target.port}{workload.path}"

    def _row(self, target: Target, workload: Workload) -> dict[str, Any]:
        row: dict[str, Any] = {"workload": workload.key, "workload_label": workload.label,
                               "target": target.key, "target_label": target.label}
        if target.status != "ok" or not target.runs(workload):
            status = target.status if target.status != "ok" else "skipped"
            reason = target.reason if target.status != "ok" else "not run in --quick"
            return {**row, "status": status, "reason": reason}

        url = self._url(target, workload)
        if self.mode.warmup_every_row or not target.warmed:
            run_wrk(url, connections=workload.connections, duration_s=self.mode.warmup_s,
                    script=workload.script, headers=target.headers)
            target.warmed = True

        for attempt in range(1, self.mode.max_attempts + 1):
            measured = self._measure(target, workload, url)
            measured["busy"] = measured["foreign_cpu_cores"] > BUSY_CORES
            if not measured["busy"]:
                break
            repeat = (attempt < self.mode.max_attempts
                      and self.repeat_seconds_left >= self.mode.duration_s)
            action = "repeating it" if repeat else "keeping it, marked *"
            self.notes.append(
                f"{workload.label} / {target.label}: other processes used "
                f"{measured['foreign_cpu_cores']:.2f} cores during attempt {attempt}; {action}")
            self.log(self.notes[-1])
            if not repeat:
                break
            self.repeat_seconds_left -= self.mode.duration_s
        row.update(measured, attempts=attempt)

        errors = measured["errors"]
        if sum(errors.values()):
            row["status"] = "errors"
            row["reason"] = ", ".join(f"{count} {kind}" for kind, count in errors.items() if count)
            self.notes.append(f"{workload.label} / {target.label}: wrk counted errors "
                              f"({row['reason']}); the row is left out of ratios and goals")
        elif workload.path == LARGE_PATH and measured["bytes"] < measured["requests"] * MIB:
            row["status"] = "errors"
            row["reason"] = "responses shorter than 1 MiB"
        else:
            row["status"] = "ok"
        self.log(f"{workload.label:<22} {target.label:<18} {measured['rps']:>9.0f} req/s  "
                 f"mean {measured['mean_ms']:.3f} ms  p99 {measured['p99_ms']:.3f} ms")
        return row

    def _measure(self, target: Target, workload: Workload, url: str) -> dict[str, Any]:
        pids = target.pids()
        hwm_reset = bool(pids) and reset_peak_rss(pids)
        with RssSampler(pids) as sampler:
            cpu_before, own_before = cpu_seconds(pids), own_cpu_seconds(self.servers)
            system_before, started = system_cpu_seconds(), time.monotonic()
            result: WrkResult = run_wrk(url, connections=workload.connections,
                                        duration_s=self.mode.duration_s, script=workload.script,
                                        headers=target.headers)
            elapsed = time.monotonic() - started
            system_used = system_cpu_seconds() - system_before
            own_used = own_cpu_seconds(self.servers) - own_before
            cpu_used = cpu_seconds(pids) - cpu_before
        peak = _peak_rss(pids, hwm_reset, sampler)
        return {
            "rps": result.rps,
            "mean_ms": result.mean_ms,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "max_ms": result.max_ms,
            "requests": result.requests,
            "bytes": result.bytes,
            "errors": result.errors,
            "duration_s": result.duration_s,
            "cpu_us_per_request": cpu_used / result.requests * 1e6 if pids and result.requests
            else None,
            "peak_rss_mib": peak,
            "foreign_cpu_cores": max(0.0, (system_used - own_used) / elapsed),
        }

    # -- transfers -------------------------------------------------------------

    def run_transfers(self) -> None:
        """Download and upload the transfer size through direct, nginx and fresh nexus-proxies."""
        for target in self.targets:
            if target.key not in (DIRECT, NGINX):
                self._stop(target.process)
                target.process = None
        direct, proxy = self.targets[0], self.targets[1]
        for direction in ("download", "upload"):
            self.transfers.append(self._transfer(direction, direct))
            self.transfers.append(self._transfer(direction, proxy))
            fresh = self._nexus_target(NEXUS, "nexus-proxy 1w", workers=1)
            try:
                self._check_ready(fresh)
                assert fresh.port is not None and fresh.process is not None
                small_gets(fresh.port, 20, {})
                time.sleep(0.5)
                idle = memory_mib(fresh.pids())
                if idle is not None:
                    self.idle_rss_samples.append(idle)
                self.transfers.append(self._transfer(direction, fresh))
            finally:
                self._stop(fresh.process)

    def _transfer(self, direction: str, target: Target) -> dict[str, Any]:
        assert target.port is not None
        size = self.mode.transfer_bytes
        pids = target.pids()
        rss_before = memory_mib(pids)
        hwm_reset = bool(pids) and reset_peak_rss(pids)
        move = download if direction == "download" else upload
        with RssSampler(pids) as sampler:
            cpu_before = cpu_seconds(pids)
            try:
                moved: TransferResult = move(target.port, size, target.headers, TRANSFER_LIMIT_S)
            except HarnessError as exc:
                # Direct and nginx must work. A failing nexus-proxy gets a failed row.
                if target.key != NEXUS:
                    raise
                self.notes.append(f"{direction} via {target.label} failed: {exc}")
                self.log(self.notes[-1])
                return {"direction": direction, "target": target.key,
                        "target_label": target.label, "status": "failed",
                        "reason": str(exc).splitlines()[0]}
            cpu_used = cpu_seconds(pids) - cpu_before
        peak = _peak_rss(pids, hwm_reset, sampler)
        self.log(f"{direction} {size // MIB} MiB via {target.label}: {moved.mib_per_s:.0f} MiB/s"
                 + (f", peak RSS {peak:.1f} MiB" if peak is not None else ""))
        return {
            "direction": direction, "target": target.key, "target_label": target.label,
            "status": "ok", "bytes": moved.bytes, "seconds": moved.seconds,
            "mib_per_s": moved.mib_per_s, "cpu_s": cpu_used if pids else None,
            "rss_before_mib": rss_before, "peak_rss_mib": peak,
            "rss_rise_mib": peak - rss_before if peak is not None and rss_before is not None
            else None,
        }

    # -- result ----------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        """Return everything measured, as plain data (the JSON written by --out)."""
        size = self.mode.transfer_bytes
        return {
            "quick": self.mode.quick,
            "settings": {
                "duration_s": self.mode.duration_s,
                "warmup_s": self.mode.warmup_s,
                "warmup_every_row": self.mode.warmup_every_row,
                "transfer_bytes": size,
                "busy_cores_limit": BUSY_CORES,
                "repeat_budget_s": self.mode.repeat_budget_s,
                "repeat_budget_left_s": self.repeat_seconds_left,
                "direct_drift_limit": DRIFT_LIMIT if self.mode.drift_probe_s else None,
                "wrk_threads": 1,
            },
            "workloads": [{"key": w.key, "label": w.label, "path": w.path,
                           "connections": w.connections} for w in WORKLOADS],
            "targets": [{"key": t.key, "label": t.label, "status": t.status, "reason": t.reason}
                        for t in self.targets],
            "peer_versions": self.peer_versions,
            "nexus_workers_flag": self.nexus_workers_flag,
            "rows": self.rows,
            "transfer_label": f"{size // (1024 * MIB)} GiB" if size >= 1024 * MIB
            else f"{size // MIB} MiB",
            "transfers": self.transfers,
            "idle_rss_samples_mib": self.idle_rss_samples,
            # The larger sample, so that the idle goal is never passed by luck.
            "idle_rss_mib": max(self.idle_rss_samples) if self.idle_rss_samples else None,
            "notes": self.notes,
            "python_executable": sys.executable,
        }
