# normserve container image: `normserve serve` on 0.0.0.0:50051 (gRPC) and 0.0.0.0:9464 (/metrics).
#
#   CPU (default; the only variant that can be built on the project's machines):
#     podman build --format docker -t normserve:cpu .        # or: docker build -t normserve:cpu .
#     podman run -d -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 normserve:cpu
#   CUDA (needs a CUDA base image and a CUDA build of torch; not buildable here: no registry for
#   base images and no GPU on the build machines):
#     docker build --build-arg VARIANT=cuda \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 -t normserve:cuda .
#     (any CUDA runtime image whose python3 is >= 3.11: ubuntu24.04 has 3.12, 22.04's 3.10 is
#     too old; the CUDA torch wheel brings its own CUDA libraries, the host only the driver)
#     docker run --gpus all ... normserve:cuda                 # NORMSERVE_DEVICE=auto picks cuda:0
#
# `torch==2.13.0` is installed before the project so that the project's `torch>=2.4` is already met
# and nothing pulls another build. Which build that pin gives depends on the index pip uses: the
# project's machines (and the local python:3.11-slim stand-in of ../shared/tools/container-env)
# resolve it to the CPU wheel; on plain PyPI the Linux x86_64 wheel is the CUDA one, so for a CPU
# image built elsewhere pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index URL>. The
# build checks that the torch it got matches VARIANT and fails otherwise.
#
# Needs BuildKit (docker >= 23) or podman/buildah for RUN --mount. podman: build with
# `--format docker`, or the OCI format drops HEALTHCHECK. PID 1 is tini (no `--init` needed), which
# forwards SIGTERM to the server (it drains for NORMSERVE_GRACE_SECONDS=10 and exits 0): give
# `stop -t` / compose's stop_grace_period more than that, e.g. 20 s.

ARG BASE_IMAGE=python:3.11-slim

# ---- base: python3 (the CUDA base images have none) and tini, shared by all stages ----
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive
# Versions are not pinned: this RUN serves both the Debian slim base and the Ubuntu CUDA bases,
# whose package versions differ; the base image tag fixes them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && if ! command -v python3 >/dev/null 2>&1; then \
      apt-get install -y --no-install-recommends python3 python3-venv; \
    fi \
 && rm -rf /var/lib/apt/lists/*

# ---- deps: a venv at /opt/venv with torch and the dependencies (no normserve source) ----
FROM base AS deps
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1;; esac \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install "torch==${TORCH_VERSION}" \
 && python -c "import sys, torch; cuda = torch.version.cuda is not None; sys.exit(0 if cuda == ('$VARIANT' == 'cuda') else 'VARIANT=$VARIANT but got torch ' + torch.__version__)"
# Dependencies (and the build backend) from pyproject.toml alone: this layer, and the runtime's copy
# of the venv, are rebuilt only when pyproject.toml changes, not on every source edit.
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); print('\n'.join(p['project']['dependencies'] + p['build-system']['requires']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# ---- wheel: normserve itself, as a wheel (offline: the build backend is in the venv) ----
FROM deps AS wheel
COPY README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY wire/ wire/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---- runtime: the venv on the slim base, as an unprivileged user ----
FROM base AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="normserve" \
      org.opencontainers.image.description="Normalization as a service: batch-norm sessions over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.normserve.variant="${VARIANT}"
RUN groupadd --gid 10001 normserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin normserve
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    NORMSERVE_ADDRESS=0.0.0.0:50051 \
    NORMSERVE_METRICS_ADDRESS=0.0.0.0:9464 \
    TINI_SUBREAPER=1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/normserve-*.whl \
 && normserve --help >/dev/null
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9464
# The standard gRPC health service (grpc + grpc_health only; no torch import, so it is quick),
# on the port of NORMSERVE_ADDRESS.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; port = os.environ.get('NORMSERVE_ADDRESS', ':50051').rsplit(':', 1)[1]; ch = grpc.insecure_channel('127.0.0.1:' + port); s = hg.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=3).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "--", "normserve", "serve"]
