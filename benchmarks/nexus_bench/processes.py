"""Child processes of the harness: start, readiness, stop, and /proc accounting.

Every server the harness starts listens on 127.0.0.1 only. Each one runs in its own
session, so a Ctrl-C in the terminal reaches only the harness, which then stops the
servers itself in its `finally` blocks.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Variables that would make httpx, aiohttp or pip send traffic through another host.
_PROXY_VARIABLES = (
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "all_proxy", "no_proxy",
)


class HarnessError(Exception):
    """The harness itself failed, as opposed to a target missing a goal."""


class MissingToolError(HarnessError):
    """A program the harness needs (nginx, wrk) is not installed."""


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a server: no outbound proxy, loopback exempted."""
    env = {name: value for name, value in os.environ.items() if name not in _PROXY_VARIABLES}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost,::1"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 15) -> str:
    """Return the last lines of a log file, or a note that it is empty."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


class ManagedProcess:
    """A server started by the harness, with its output going to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.popen = subprocess.Popen(  # noqa: S603 - argv is built by the harness
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else child_env(), cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for_port(self, port: int, timeout_s: float) -> None:
        """Poll a TCP connect to `port` until it succeeds.

        Raises HarnessError when the process exits or the timeout passes first.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.popen.poll() is not None:
                raise HarnessError(
                    f"{self.name} exited with status {self.popen.returncode} before listening "
                    f"on port {port}; command: {' '.join(self.argv)}\n{log_tail(self.log_path)}"
                )
            try:
                with socket.create_connection((LOOPBACK, port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"{self.name} did not accept connections on port {port} within "
                    f"{timeout_s:.0f} s\n{log_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def tree(self) -> list[int]:
        """Return the PIDs of this process and all its live descendants."""
        return process_tree(self.pid) if self.popen.poll() is None else []

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the process, wait, then kill its process group if anything is left."""
        if self.popen.poll() is None:
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout_s)
        # The process leads its own group (start_new_session), so this reaches
        # workers that outlived their parent and nothing else.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=timeout_s)


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> list[int]:
    """Return `root` and all its live descendants, found through /proc."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_map().items():
        children.setdefault(parent, []).append(pid)
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """Return user plus system CPU seconds of the processes and their reaped children."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # utime, stime, cutime, cstime are fields 14 to 17 of proc(5).
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_mib(pids: Iterable[int], field: str = "VmRSS") -> float | None:
    """Return the sum of a /proc/PID/status memory field (VmRSS, VmHWM) in MiB."""
    values = [_status_kib(pid, field) for pid in pids]
    known = [value for value in values if value is not None]
    return sum(known) / 1024 if known else None


def reset_peak_rss(pids: Iterable[int]) -> bool:
    """Reset VmHWM to the current RSS by writing 5 to clear_refs.

    Returns whether every reset worked.
    """
    done = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            done = False
    return done


class RssSampler:
    """Samples the summed VmRSS of a process tree on a thread and keeps the maximum."""

    def __init__(self, pids: Sequence[int], interval_s: float = 0.02) -> None:
        self.pids = list(pids)
        self.interval_s = interval_s
        self.max_mib = memory_mib(self.pids) or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = memory_mib(self.pids)
            if value is not None and value > self.max_mib:
                self.max_mib = value


def system_cpu_seconds() -> float:
    """Return CPU seconds all processes of the machine spent in user and system mode.

    Interrupt and softirq time is left out because loopback traffic is accounted
    there and no process can be charged with it. Steal time is kept, because it is
    time that other guests of the host took from this machine's cores.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + steal) / CLOCK_TICKS


def own_cpu_seconds(servers: Iterable[ManagedProcess]) -> float:
    """Return CPU seconds of the harness, its reaped children (wrk) and its live servers."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + reaped.ru_utime + reaped.ru_stime
    for server in servers:
        total += cpu_seconds(server.tree())
    return total
