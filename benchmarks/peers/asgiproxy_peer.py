"""asgiproxy 0.2.0 as a reverse proxy to the benchmark upstream, adding the API key headers.

Runs under uvicorn in the peers' virtual environment. benchmarks/run.py starts it with
--upstream-url and --port and passes the key in BENCH_API_KEY.
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
from asgiproxy.context import ProxyContext
from asgiproxy.simple_proxy import make_simple_proxy_app
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import Scope

# asgiproxy holds a semaphore around each upstream request, 20 by default. At 128 it
# does not queue the benchmark's 50 connections, and neither do the other proxies' pools.
MAX_CONCURRENCY = 128


def build_app(upstream_url: str, api_key: str):
    """Return the ASGI proxy app for `upstream_url` that injects the two Nexus headers."""

    class InjectingConfig(BaseURLProxyConfigMixin, ProxyConfig):
        upstream_base_url = upstream_url
        rewrite_host_header = upstream_url.split("://", 1)[1].rstrip("/")

        def process_client_headers(self, *, scope: Scope, headers: Headers) -> MutableHeaders:
            headers = super().process_client_headers(scope=scope, headers=headers)
            # The mixin already returns a copy when it rewrites Host.
            mutable = headers if isinstance(headers, MutableHeaders) else headers.mutablecopy()
            mutable["authorization"] = f"Bearer {api_key}"
            mutable["request_iso8601"] = "true"
            return mutable

    context = ProxyContext(InjectingConfig(), max_concurrency=MAX_CONCURRENCY)
    return make_simple_proxy_app(context)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-url", required=True, help="upstream base URL")
    parser.add_argument("--port", type=int, required=True, help="port to listen on, on 127.0.0.1")
    args = parser.parse_args()
    app = build_app(args.upstream_url, os.environ["BENCH_API_KEY"])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
