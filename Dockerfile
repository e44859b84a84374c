# syntax=docker/dockerfile:1
#
# One image for every Sluicegate role. The role is the command:
#   docker run IMAGE dispatcher | scheduler | worker | submit ACTION JSON --count N | demo
# The builder turns the source into a wheel and installs it, with its dependencies, into a
# virtual environment; the runtime stage copies only that environment, so no compiler, pip cache
# or source tree reaches the final image.

# Both stages must use the same base: the venv links to the interpreter of the stage that built it.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build

# Only what the wheel is made of (.dockerignore keeps the rest of the tree out of the context).
COPY pyproject.toml README.md ./
COPY src/ src/
COPY services/ services/

# pip byte-compiles on install, so the runtime never has to write .pyc files (its root file
# system may be read-only).
RUN python -m pip wheel --no-deps --wheel-dir /build/dist . \
 && python -m venv /opt/sluicegate \
 && /opt/sluicegate/bin/python -m pip install --no-cache-dir /build/dist/*.whl


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="sluicegate" \
      org.opencontainers.image.description="RabbitMQ-backed task dispatcher: scheduler, dispatcher and demo worker in one image" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, unprivileged uid/gid, so Kubernetes can check runAsNonRoot and volumes can be chowned
# to it; no home directory and no login shell, since nothing runs interactively.
RUN groupadd --system --gid 10001 sluicegate \
 && useradd --system --uid 10001 --gid sluicegate --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin sluicegate

COPY --from=builder /opt/sluicegate /opt/sluicegate
COPY deploy/docker/healthcheck.py /opt/sluicegate/healthcheck.py

# Container defaults: listen on every interface (the library default is loopback only), log JSON
# lines for the log collector, and serve metrics and health on the port the HEALTHCHECK probes.
ENV PATH="/opt/sluicegate/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SLUICEGATE_DISPATCHER_LISTEN=0.0.0.0:50051 \
    SLUICEGATE_METRICS_PORT=9100 \
    SLUICEGATE_LOG_JSON=true

USER 10001:10001

# 50051: the dispatcher's gRPC (workers and grpc.health.v1); 9100: /metrics, /healthz, /readyz.
EXPOSE 50051 9100

# Liveness of whichever role runs; one-shot commands (submit) should disable it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/sluicegate/bin/python", "/opt/sluicegate/healthcheck.py"]

ENTRYPOINT ["/opt/sluicegate/bin/sluicegate"]
CMD ["dispatcher"]
