"""fastapi-proxy-lib 0.3.0 as a reverse proxy to the benchmark upstream, adding the API key headers.

Runs under uvicorn in the peers' virtual environment. benchmarks/run.py starts it with
--upstream-url and --port and passes the key in BENCH_API_KEY. The headers are the
httpx client's default headers, which httpx merges into every request it builds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi_proxy_lib.core.http import ReverseHttpProxy
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# The same pool as nexus-proxy's default (--max-connections 100, all kept alive). httpx's
# own default keeps only 20 idle connections, which would make the peer reconnect at
# 50 concurrent requests.
POOL_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


def build_app(upstream_url: str, api_key: str) -> Starlette:
    """Return the Starlette proxy app for `upstream_url` that injects the two Nexus headers."""
    client = httpx.AsyncClient(
        headers={"Authorization": f"Bearer {api_key}", "request_iso8601": "true"},
        timeout=httpx.Timeout(60.0),
        limits=POOL_LIMITS,
    )
    proxy = ReverseHttpProxy(client, base_url=upstream_url.rstrip("/") + "/")

    async def forward(request: Request) -> Response:
        return await proxy.proxy(request=request, path=request.path_params["path"])

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await proxy.aclose()

    return Starlette(routes=[Route("/{path:path}", forward, methods=METHODS)],
                     lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-url", required=True, help="upstream base URL")
    parser.add_argument("--port", type=int, required=True, help="port to listen on, on 127.0.0.1")
    args = parser.parse_args()
    app = build_app(args.upstream_url, os.environ["BENCH_API_KEY"])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
