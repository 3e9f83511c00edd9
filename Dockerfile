# nexus-proxy container image. Build from the repository root:
#   docker build -t nexus-proxy:local .
# docs/deployment.md shows how to run it with the key mounted as a secret.
#
# Python 3.11 on Debian bookworm is the interpreter and distribution the test
# suite runs on. For reproducible builds, pin the base image by digest as well
# (python:3.11-slim-bookworm@sha256:...).

FROM python:3.11-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY nexus_proxy ./nexus_proxy

# Build the wheel from the source tree, then install it with its dependencies
# into a virtual environment, which the runtime stage copies as a whole.
# tests/test_deploy.py runs these two commands to rebuild the runtime outside Docker.
RUN python -m pip wheel --no-deps --wheel-dir /wheels .
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install /wheels/nexus_proxy-*.whl


FROM python:3.11-slim-bookworm

# A fixed numeric UID, so that Kubernetes can check runAsNonRoot without a
# passwd lookup and a secret file can be given to this UID on the host.
RUN groupadd --system --gid 10001 nexus \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin nexus

COPY --from=build /opt/venv /opt/venv

# Container defaults. Listening on 0.0.0.0 is what makes a published port work,
# so the proxy needs access tokens (NEXUS_PROXY_ACCESS_TOKEN_FILE) or a
# loopback-only host (NEXUS_PROXY_HOST=127.0.0.1, the sidecar case).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NEXUS_PROXY_HOST=0.0.0.0 \
    NEXUS_PROXY_PORT=8080

# The key is never part of the image: this is only the path where the secret is
# mounted. DL3064 flags the name because it contains API_KEY.
# hadolint ignore=DL3064
ENV NEXUS_PROXY_API_KEY_FILE=/run/secrets/nexus_api_key

USER 10001:10001
EXPOSE 8080

# The slim image has no curl. ProxyHandler({}) keeps an HTTP_PROXY set for the
# upstream from capturing the check, and any error (refused connection, timeout,
# a status other than 2xx) makes python exit 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:%s/_proxy/health' % os.environ.get('NEXUS_PROXY_PORT', '8080'), timeout=3)"]

ENTRYPOINT ["nexus-proxy"]
