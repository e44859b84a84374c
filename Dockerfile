# One image for every Sluicegate role. The role is the command:
#   docker run IMAGE dispatcher | scheduler | worker | submit ACTION JSON --count N | demo
# The builder turns the source into a wheel and installs it, with its dependencies, into a
# virtual environment; the runtime stage copies only that environment, so no compiler, pip cache,
# source tree, pip or setuptools reaches the final image.
#
# No `# syntax=` line: BuildKit would pull that frontend image from a registry before building,
# and the classic builder needs none.

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
# system may be read-only). Then pip and setuptools leave the venv: nothing uses them at run time,
# and what is not there needs no security updates.
RUN python -m pip wheel --no-deps --wheel-dir /build/dist . \
 && python -m venv /opt/sluicegate \
 && /opt/sluicegate/bin/python -m pip install --no-cache-dir /build/dist/*.whl \
 && /opt/sluicegate/bin/python -m pip uninstall --yes pip setuptools


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="sluicegate" \
      org.opencontainers.image.description="RabbitMQ-backed task dispatcher: scheduler, dispatcher and demo worker in one image" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, unprivileged uid/gid, so Kubernetes can check runAsNonRoot and volumes can be chowned
# to it; no home directory and no login shell, since nothing runs interactively. The base image's
# own pip, setuptools and wheel go too: only its interpreter is needed, to run the venv.
RUN groupadd --system --gid 10001 sluicegate \
 && useradd --system --uid 10001 --gid sluicegate --no-create-home \
            --home-dir /nonexistent --shell /usr/sbin/nologin sluicegate \
 && python -m pip uninstall --yes --no-cache-dir pip setuptools wheel

COPY --from=builder /opt/sluicegate /opt/sluicegate
COPY deploy/docker/healthcheck.py /opt/sluicegate/healthcheck.py

# Container defaults: listen on every interface (the library default is loopback only; a dispatcher
# then needs TLS and credentials, or SLUICEGATE_DISPATCHER_INSECURE=true: README, Security), log JSON
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

# Liveness of whichever role runs; for a one-shot command (submit, demo) the script finds nothing
# to probe and passes, so such a container is never marked unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/sluicegate/bin/python", "/opt/sluicegate/healthcheck.py"]

ENTRYPOINT ["/opt/sluicegate/bin/sluicegate"]
CMD ["dispatcher"]
