# syntax=docker/dockerfile:1
# One image for every role: `docker run IMAGE <role> [flags]` runs `monolith <role>` (the
# chart sets the role per workload). Two stages: the build stage installs the locked
# dependencies and the project into a virtual environment and generates the protobuf code;
# the runtime stage copies only that environment onto the same base, adds tini and runs as
# a non-root user.
#
# The base is pinned by digest, so a rebuild gets the same bytes. To move it: pick the new
# tag, resolve its digest (`docker buildx imagetools inspect python:<tag>`) and replace both.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/monolith
# Dependencies first, in their own layer: it is rebuilt only when the lock changes. Every file
# is checked against its hash, and --no-deps makes the lock the whole set (nothing unpinned
# sneaks in). requirements-image.lock is the runtime subset of requirements.lock, same pins.
COPY requirements-image.lock ./
RUN /opt/monolith/bin/pip install --require-hashes --no-deps -r requirements-image.lock
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY clients/python/ clients/python/
# Generated code is never committed: protoc (grpcio-tools, from the lock) writes it here, then
# the project installs as a regular (non-editable) package with the build tools already locked.
RUN PYTHONPATH=services /opt/monolith/bin/python -m monolith.protogen protos services \
    && /opt/monolith/bin/python clients/python/gen_protos.py \
    && /opt/monolith/bin/pip install --no-deps --no-build-isolation . \
    && /opt/monolith/bin/monolith --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
# tini is PID 1: it forwards SIGTERM to the role (whose handler drains gRPC and exits 0) and
# reaps zombies. Pinned to bookworm's build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 monolith \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/monolith --create-home \
       --shell /usr/sbin/nologin monolith
COPY --from=build /opt/monolith /opt/monolith
COPY clients/locust/ /opt/monolith/locust/
# The chart mounts the root filesystem read-only with an emptyDir at /tmp: numba's compiled
# kernel cache, matplotlib's config and the data-set cache go there, never into site-packages.
ENV PATH=/opt/monolith/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NUMBA_CACHE_DIR=/tmp/numba \
    MPLCONFIGDIR=/tmp/matplotlib \
    MONOLITH_CACHE_DIR=/tmp/monolith-cache
USER 10001:10001
WORKDIR /var/lib/monolith
# gRPC: model-serving 8500, joiner 8600, embedding-PS 50051, dense-PS 50060; /metrics 9090-9108.
EXPOSE 8500 8600 50051 50060
ENTRYPOINT ["/usr/bin/tini", "--", "monolith"]
CMD ["--help"]
