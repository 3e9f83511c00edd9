"""Benchmark nexus-proxy against nginx and two Python proxies, on loopback only.

    python benchmarks/run.py            # full run, 5.5 to 9 minutes
    python benchmarks/run.py --quick    # short run without the Python peers
    python benchmarks/run.py --out results.json

Needs nginx and wrk (`apt-get install -y nginx-light wrk`) and nexus-proxy installed
in the running Python (`pip install -e .`). The exit status is 0 whether or not the
goals pass; it is 1 only when the harness itself failed. See docs/benchmarks.md.

Tests can call `run(quick=True)`, which returns the results as a dict and raises
`HarnessError` (or its subclass `MissingToolError`) when it cannot measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nexus_bench import nginx, targets
from nexus_bench.processes import HarnessError, MissingToolError
from nexus_bench.report import (
    RATIO_METRICS,
    TRANSFER_RATIO_METRICS,
    add_ratios,
    evaluate_goals,
    format_report,
)
from nexus_bench.session import FULL, QUICK, Session, machine_info, wrk_binary

__all__ = ["HarnessError", "MissingToolError", "format_report", "main", "run"]


def _progress_logger(started: float) -> Callable[[str], None]:
    """Return a function that prints a progress line, with seconds since `started`, to stderr."""

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {message}", file=sys.stderr, flush=True)

    return log


def _scratch_parent(transfer_bytes: int) -> str | None:
    """Return /dev/shm when it has room, so that upload bodies nginx buffers never hit a disk.

    Returns None (the default temporary directory) otherwise.
    """
    # Only the parent: the directory itself comes from mkdtemp, unique and private.
    shm = Path("/dev/shm")  # noqa: S108
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    # Room for the upload nginx buffers, with margin for the other files.
    if shutil.disk_usage(shm).free < 3 * transfer_bytes:
        return None
    return str(shm)


def run(quick: bool) -> dict[str, Any]:
    """Run the whole benchmark and return the results; `quick` shortens it and skips peers.

    Raises MissingToolError when nginx or wrk is missing and HarnessError when a server
    of the harness, or nexus-proxy itself, cannot be started or does not respond.
    """
    mode = QUICK if quick else FULL
    started = time.monotonic()
    log = _progress_logger(started)
    nginx.nginx_binary()
    wrk_binary()
    targets.nexus_executable()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    peer_python, peer_error = None, None
    if not quick:
        log("preparing the peers' virtual environment in benchmarks/.venv-peers")
        try:
            peer_python = targets.ensure_peer_venv()
        except targets.PeerSetupError as exc:
            peer_error = str(exc)
            log(f"peers not available: {exc}")

    scratch_parent = _scratch_parent(mode.transfer_bytes)
    with tempfile.TemporaryDirectory(prefix="nexus-bench-", dir=scratch_parent) as tmp:
        session = Session(mode, Path(tmp), log)
        try:
            if peer_python is not None:
                session.peer_versions = targets.peer_versions(peer_python)
            session.start(peer_python, peer_error)
            log("servers ready; running wrk workloads")
            session.run_workloads()
            log("running transfers")
            session.run_transfers()
        finally:
            session.close()

    result = session.result()
    result["date"] = date
    result["settings"]["scratch_dir"] = scratch_parent or tempfile.gettempdir()
    result["machine"] = machine_info()
    add_ratios(result["rows"], "workload", RATIO_METRICS)
    add_ratios(result["transfers"], "direction", TRANSFER_RATIO_METRICS)
    result["goals"] = evaluate_goals(result)
    result["elapsed_s"] = time.monotonic() - started
    return result


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark nexus-proxy against nginx and Python peers on 127.0.0.1.")
    parser.add_argument("--quick", action="store_true",
                        help="2 s rows after a 1 s warm-up, 64 MiB transfers, no peers")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)

    # SIGTERM takes the same path as Ctrl-C, so the servers are stopped either way.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = run(quick=args.quick)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; all servers were stopped", file=sys.stderr)
        return 130

    print(format_report(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
