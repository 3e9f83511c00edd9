"""nginx as the upstream and as the reference injecting proxy, each with its own config.

Both run in the foreground (`daemon off`) as children of the harness, with every path
(pid file, logs, temp directories) inside the harness's temporary directory. When the
harness runs as root, nginx's workers drop to the default unprivileged user, so the
directory and the files it serves are made world-readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .processes import LOOPBACK, ManagedProcess, MissingToolError

SMALL_PATH = "/small.json"
LARGE_PATH = "/large.bin"
DOWNLOAD_PATH = "/download.bin"
UPLOAD_PATH = "/upload"

SMALL_BODY_BYTES = 300
LARGE_BODY_BYTES = 1024 * 1024

API_KEY = "bench-key"
# The two headers that every proxy under test adds. The upstream rejects any request
# without them, so a proxy that fails to inject them shows up as wrk status errors.
INJECTED_HEADERS = {"Authorization": f"Bearer {API_KEY}", "request_iso8601": "true"}

_COMMON_MAIN = """\
daemon off;
worker_processes 1;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
"""

_COMMON_HTTP = """\
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    underscores_in_headers on;
"""

_UPSTREAM_CONF = """\
http {{
{common_http}
    sendfile on;
    tcp_nopush on;

    upstream sink {{
        server {loopback}:{sink_port};
        keepalive 16;
        keepalive_requests 1000000;
    }}

    server {{
        listen {loopback}:{port} backlog=4096;
        root {tmp}/www;
        default_type application/octet-stream;

        if ($http_authorization != "Bearer {api_key}") {{ return 401; }}
        if ($http_request_iso8601 != "true") {{ return 400; }}

        location = {small} {{ default_type application/json; }}
        location = {large} {{ }}
        location = {download} {{ }}

        # proxy_pass reads the whole request body (into memory up to
        # client_body_buffer_size, then into a temp file) before it sends anything to
        # the sink, so the response can only start after the last byte arrived. The
        # sink gets no body, only the byte count.
        location = {upload} {{
            client_max_body_size 0;
            client_body_buffer_size 64k;
            proxy_pass http://sink/received;
            proxy_http_version 1.1;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header Connection "";
            proxy_set_header X-Request-Length $request_length;
        }}
    }}

    server {{
        listen {loopback}:{sink_port};
        location = /received {{
            default_type application/json;
            return 200 '{{"status":"received","request_bytes":$http_x_request_length}}';
        }}
    }}
}}
"""

# A plain streaming reverse proxy: keep-alive to the upstream, no request buffering,
# and responses relayed through memory buffers without spilling to temp files.
_PROXY_CONF = """\
http {{
{common_http}
    upstream nexus_upstream {{
        server {loopback}:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}

    server {{
        listen {loopback}:{port} backlog=4096;
        client_max_body_size 0;

        location / {{
            proxy_pass http://nexus_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {api_key}";
            proxy_set_header request_iso8601 "true";
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            proxy_read_timeout 120s;
            proxy_send_timeout 120s;
        }}
    }}
}}
"""


def nginx_binary() -> str:
    """Return the nginx path, or raise MissingToolError naming the Debian package."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise MissingToolError(
            "nginx not found on PATH or in /usr/sbin; install it with "
            "'apt-get install -y nginx-light' (or the 'nginx' package)"
        )
    return found


def _small_body() -> bytes:
    document = {"id": "bench", "status": "ok", "padding": ""}
    empty = len(json.dumps(document, separators=(",", ":")))
    document["padding"] = "x" * (SMALL_BODY_BYTES - empty)
    body = json.dumps(document, separators=(",", ":")).encode()
    assert len(body) == SMALL_BODY_BYTES
    return body


def write_upstream_files(tmp: Path, download_bytes: int) -> None:
    """Create the files the upstream serves; the download file is sparse (all zeros)."""
    www = tmp / "www"
    www.mkdir()
    (www / SMALL_PATH.lstrip("/")).write_bytes(_small_body())
    (www / LARGE_PATH.lstrip("/")).write_bytes(os.urandom(LARGE_BODY_BYTES))
    with open(www / DOWNLOAD_PATH.lstrip("/"), "wb") as file:
        file.truncate(download_bytes)
    # Reading the file once fills the page cache, which would otherwise slow down
    # whichever target downloads it first.
    with open(www / DOWNLOAD_PATH.lstrip("/"), "rb", buffering=0) as file:
        chunk = bytearray(1024 * 1024)
        while file.readinto(chunk):
            pass
    # nginx workers started by root run as an unprivileged user and must read these.
    os.chmod(tmp, 0o755)  # noqa: S103
    os.chmod(www, 0o755)  # noqa: S103
    for path in www.iterdir():
        os.chmod(path, 0o644)


def _write_conf(tmp: Path, name: str, http_block: str) -> Path:
    main = _COMMON_MAIN.format(tmp=tmp, name=name)
    path = tmp / f"{name}.conf"
    path.write_text(main + http_block)
    return path


def start_upstream(tmp: Path, port: int, sink_port: int) -> ManagedProcess:
    """Start the upstream nginx on `port`, with its body sink on `sink_port`."""
    common = _COMMON_HTTP.format(tmp=tmp, name="upstream")
    conf = _write_conf(tmp, "upstream", _UPSTREAM_CONF.format(
        common_http=common, loopback=LOOPBACK, port=port, sink_port=sink_port, tmp=tmp,
        api_key=API_KEY, small=SMALL_PATH, large=LARGE_PATH, download=DOWNLOAD_PATH,
        upload=UPLOAD_PATH,
    ))
    return _start(tmp, "upstream", conf)


def start_proxy(tmp: Path, port: int, upstream_port: int) -> ManagedProcess:
    """Start nginx as the injecting reverse proxy on `port`."""
    common = _COMMON_HTTP.format(tmp=tmp, name="nginx-proxy")
    conf = _write_conf(tmp, "nginx-proxy", _PROXY_CONF.format(
        common_http=common, loopback=LOOPBACK, port=port, upstream_port=upstream_port,
        api_key=API_KEY,
    ))
    return _start(tmp, "nginx-proxy", conf)


def _start(tmp: Path, name: str, conf: Path) -> ManagedProcess:
    # -e sends the messages nginx writes before reading its config to our log too.
    argv = [nginx_binary(), "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")]
    return ManagedProcess(name, argv, tmp / f"{name}.log")
