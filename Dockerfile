# syntax=docker/dockerfile:1
#
# One image for every jetmesh role; the command picks the role:
#
#   docker run jetmesh orchestrator
#   docker run jetmesh worker researcher      (a built-in agent, or package.module:attr)
#   docker run jetmesh memory
#   docker run jetmesh gateway
#
# Configuration comes only from the environment (NATS_URL, JETMESH_*, QDRANT_URL, model
# keys); nothing is baked in. The health check runs `jetmesh health`, which checks the
# role this container runs (JETMESH_ROLE / JETMESH_AGENT if set, else PID 1's command).

ARG PYTHON_IMAGE=python:3.11-slim

# ----------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# The repository root is the `jetmesh` package (setuptools package-dir), so the wheel is
# built from the root; .dockerignore keeps tests, benchmarks, .git and venvs out.
COPY . .
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/jetmesh \
 && /opt/jetmesh/bin/pip install --upgrade pip \
 && /opt/jetmesh/bin/pip install /wheels/jetmesh-*.whl \
 && /opt/jetmesh/bin/jetmesh --help > /dev/null

# ----------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="jetmesh" \
      org.opencontainers.image.description="Teams of AI agents as a distributed system on NATS JetStream" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 jetmesh \
 && useradd --system --uid 10001 --gid jetmesh --home-dir /home/jetmesh --create-home \
            --shell /usr/sbin/nologin jetmesh \
 && mkdir -p /data \
 && chown jetmesh:jetmesh /data

# Same base image and same path as the build stage, so the venv works as copied.
COPY --from=build /opt/jetmesh /opt/jetmesh

ENV PATH=/opt/jetmesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/jetmesh \
    JETMESH_DATA_DIR=/data \
    MEM0_TELEMETRY=False

WORKDIR /data
USER jetmesh:jetmesh

# Every role handles SIGTERM: it stops pulling work, finishes or hands back in-flight
# messages, and closes its connection. Exec form, so the signal reaches jetmesh itself.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=8s --start-period=30s --retries=3 \
    CMD ["jetmesh", "health"]

ENTRYPOINT ["jetmesh"]
CMD ["orchestrator"]
