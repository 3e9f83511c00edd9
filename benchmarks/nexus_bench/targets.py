"""The proxies under test besides nginx: nexus-proxy and the two Python peers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .nginx import API_KEY
from .processes import HarnessError, ManagedProcess, child_env

BENCH_DIR = Path(__file__).resolve().parent.parent
PEERS_DIR = BENCH_DIR / "peers"
PEER_VENV = BENCH_DIR / ".venv-peers"
# Written after a successful install. The venv is rebuilt when the requirements differ from it.
PEER_STAMP = PEER_VENV / "bench-requirements.txt"

PEER_PACKAGES = ["asgiproxy==0.2.0", "fastapi-proxy-lib==0.3.0"]
# The peers run on the same server stack as nexus-proxy, so these packages are pinned
# to the versions installed next to the harness, where they are installed.
SHARED_STACK = ["uvicorn", "uvloop", "httptools", "httpx", "starlette"]

PEER_SCRIPTS = {
    "asgiproxy": PEERS_DIR / "asgiproxy_peer.py",
    "fastapi-proxy-lib": PEERS_DIR / "fastapi_proxy_lib_peer.py",
}

STARTUP_TIMEOUT_S = 30.0
VENV_TIMEOUT_S = 120
PIP_TIMEOUT_S = 600


class PeerSetupError(Exception):
    """The peers' virtual environment could not be created or installed."""


def nexus_executable() -> str:
    """Return the nexus-proxy console script next to this Python, else the one on PATH."""
    beside = Path(sys.executable).parent / "nexus-proxy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nexus-proxy")
    if found is None:
        raise HarnessError(
            "nexus-proxy not found next to this Python or on PATH; install the project with "
            "'pip install -e .' from the repository root"
        )
    return found


def nexus_env() -> dict[str, str]:
    """Return the environment for nexus-proxy: only the API key among its own variables."""
    env = {name: value for name, value in child_env().items()
           if not name.startswith("NEXUS_PROXY_")}
    env["NEXUS_PROXY_API_KEY"] = API_KEY
    return env


def nexus_help() -> str:
    """Return the output of `nexus-proxy --help`."""
    try:
        completed = subprocess.run(  # noqa: S603 - fixed argv
            [nexus_executable(), "--help"], capture_output=True, text=True, env=nexus_env(),
            timeout=30, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError("'nexus-proxy --help' did not finish in 30 s") from exc
    return completed.stdout + completed.stderr


def start_nexus(tmp: Path, port: int, upstream_url: str, name: str,
                options: dict[str, str]) -> ManagedProcess:
    """Start nexus-proxy on 127.0.0.1:`port` with extra `options` (flag to value)."""
    argv = [nexus_executable(), "--upstream-url", upstream_url, "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning"]
    for flag, value in options.items():
        argv += [flag, value]
    return ManagedProcess(name, argv, tmp / f"{name}.log", env=nexus_env())


def _peer_requirements() -> list[str]:
    requirements = list(PEER_PACKAGES)
    for name in SHARED_STACK:
        try:
            requirements.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            requirements.append(name)
    return requirements


def ensure_peer_venv() -> Path:
    """Create or update benchmarks/.venv-peers and return its Python.

    Raises PeerSetupError with pip's output when the venv or the install fails.
    """
    requirements = _peer_requirements()
    python = PEER_VENV / "bin" / "python"
    requirements_text = "\n".join(requirements) + "\n"
    if python.exists() and PEER_STAMP.exists() and PEER_STAMP.read_text() == requirements_text:
        return python

    steps = []
    if not python.exists():
        steps.append(([sys.executable, "-m", "venv", str(PEER_VENV)], VENV_TIMEOUT_S))
    steps.append(([str(python), "-m", "pip", "install", "--quiet", *requirements], PIP_TIMEOUT_S))
    for argv, timeout_s in steps:
        try:
            completed = subprocess.run(  # noqa: S603 - argv is built here
                argv, capture_output=True, text=True, env=child_env(), timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PeerSetupError(f"'{' '.join(argv)}' did not finish in {timeout_s} s") from exc
        if completed.returncode != 0:
            raise PeerSetupError(
                f"'{' '.join(argv)}' failed with status {completed.returncode}:\n"
                f"{completed.stderr[-2000:]}"
            )
    PEER_STAMP.write_text(requirements_text)
    return python


def peer_versions(python: Path) -> dict[str, str]:
    """Return the versions of the peer packages and their server stack in the venv."""
    names = ["asgiproxy", "fastapi-proxy-lib", "aiohttp", *SHARED_STACK]
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try: out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    completed = subprocess.run(  # noqa: S603 - argv is built here
        [str(python), "-c", code, *names], capture_output=True, text=True, timeout=60,
        check=False,
    )
    return json.loads(completed.stdout) if completed.returncode == 0 else {}


def start_peer(tmp: Path, name: str, python: Path, port: int, upstream_url: str) -> ManagedProcess:
    """Start one peer script under the venv's Python on 127.0.0.1:`port`."""
    argv = [str(python), str(PEER_SCRIPTS[name]), "--upstream-url", upstream_url,
            "--port", str(port)]
    return ManagedProcess(name, argv, tmp / f"{name}.log",
                          env=child_env({"BENCH_API_KEY": API_KEY}))
