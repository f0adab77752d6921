# normserve container image: `normserve serve` on 0.0.0.0:50051 (gRPC) and 0.0.0.0:9464 (/metrics).
#
#   CPU (default):
#     docker build -t normserve:cpu .                     # or: podman build --format docker -t normserve:cpu .
#     scripts/make-token             # deploy/normserve.env (server) and deploy/client.token (clients)
#     docker run -d -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 \
#       --env-file deploy/normserve.env normserve:cpu
#     (the server listens on 0.0.0.0 in the container, so it runs authenticated: it refuses to
#     start there without tokens or mutual TLS; see docs/security.md. Health and /metrics need no
#     token.)
#   CUDA (a CUDA base image and a CUDA build of torch; run on a host with an NVIDIA GPU and driver):
#     docker build --build-arg VARIANT=cuda \
#       --build-arg BASE_IMAGE=docker.io/nvidia/cuda:12.8.1-runtime-ubuntu24.04 -t normserve:cuda .
#     (any CUDA runtime image whose python3 is >= 3.11: ubuntu24.04 has 3.12, 22.04's 3.10 is
#     too old; the CUDA torch wheel brings its own CUDA libraries, the host only the driver)
#     docker run --gpus all ... normserve:cuda                 # NORMSERVE_DEVICE=auto picks cuda:0
#
# Which torch build `torch==2.13.0` gives depends on the index pip uses: on PyPI the Linux x86_64
# wheel is the CUDA one (several GB). For a CPU image pass PyTorch's CPU wheel index:
#   --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index URL>
# (and for CUDA, the index of the CUDA version you want, or PyPI's default). The build checks that
# the torch it got matches VARIANT and fails otherwise.
#
# podman: build with `--format docker`, or the OCI format drops HEALTHCHECK. PID 1 is tini (no
# `--init` needed), which forwards SIGTERM to the server (it drains for NORMSERVE_GRACE_SECONDS=10
# and exits 0): give `stop -t` / compose's stop_grace_period more than that, e.g. 20 s.
#
# Layers, from the least to the most often rebuilt: base (+ tini) -> torch -> the dependencies in
# pyproject.toml -> normserve. A source edit rebuilds only the wheel and its install (seconds); the
# wheel comes in by COPY, whose cache key is the wheel's content, so a rebuild always ships the new
# code. The wheel is built in its own stage without torch; podman keeps that stage as a small
# untagged image (labelled io.normserve.stage=wheel): `podman image prune --filter
# label=io.normserve.stage` removes it and the images that earlier builds left untagged.

# In full (registry/name:tag): podman resolves short names only through its own configuration.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim

# ---- base: python3 (the CUDA base images have none) and tini, shared by all stages ----
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DEBIAN_FRONTEND=noninteractive
# Versions are not pinned: this RUN serves both the Debian slim base and the Ubuntu CUDA bases,
# whose package versions differ; the base image tag fixes them. apt's package caches (*.bin) go
# too: base images without a docker-clean apt setting would keep ~80 MB of them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && if ! command -v python3 >/dev/null 2>&1; then \
      apt-get install -y --no-install-recommends python3 python3-venv; \
    fi \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

# ---- wheel: normserve as a wheel, built with the build backend alone (no torch) ----
FROM base AS wheel
LABEL io.normserve.stage="wheel"
WORKDIR /src
COPY pyproject.toml ./
# The build backend (build-system.requires) in its own venv: a source edit reuses this layer and
# builds the wheel offline.
RUN python3 -m venv /opt/build \
 && /opt/build/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" > /tmp/build-requires.txt \
 && /opt/build/bin/pip install --no-compile -r /tmp/build-requires.txt \
 && rm /tmp/build-requires.txt
COPY README.md ./
COPY proto/ proto/
COPY server/ server/
COPY client/ client/
COPY wire/ wire/
# (into a folder of its own: a base image may have a /wheels of its own)
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /src/dist .

# ---- deps: a venv at /opt/venv with torch and the dependencies (no normserve source) ----
FROM base AS deps
LABEL io.normserve.stage="deps"
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch in a layer of its own, so that a change to pyproject.toml does not reinstall it. Installed
# without bytecode (pip would compile ~150 MB of .pyc for modules the server never imports; the
# ones it imports are compiled below) and without what only building or testing torch itself uses:
# C++ headers (torch/include: for C++ extensions, and the image has no compiler), the C++ test
# programs (torch/test, torch/bin/test_* and *Test) and protoc, and the Python packages' tests.
# torch/bin/torch_shm_manager stays (torch.multiprocessing uses it).
# Before downloading anything, pip is asked what the pin resolves to: a CPU image whose index offers
# only the CUDA build (the standard index, on Linux x86_64) stops at once, saying what to pass.
RUN case "$VARIANT" in cpu|cuda) ;; *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1;; esac \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && pip install --quiet --dry-run --ignore-installed --report /tmp/torch.json "torch==${TORCH_VERSION}" \
 && if [ "$VARIANT" = cpu ] && python -c "import json, sys; r = json.load(open('/tmp/torch.json')); sys.exit(0 if any(i['metadata']['name'].startswith('nvidia-') for i in r['install']) else 1)"; then \
      echo "VARIANT=cpu, but this package index gives the CUDA build of torch==${TORCH_VERSION}: pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> (compose: NORMSERVE_TORCH_INDEX_URL=... docker compose build)" >&2; exit 1; \
    fi \
 && rm /tmp/torch.json \
 && pip install --no-compile "torch==${TORCH_VERSION}" \
 && site=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
 && rm -rf "$site/torch/include" "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/*Test "$site"/torch/bin/protoc* \
 && find "$site" \( -path "$site/torch" -o -name "*.dist-info" \) -prune -o -type d -name tests -prune -exec rm -rf {} +
# The dependencies from pyproject.toml alone: rebuilt only when pyproject.toml changes. numpy is
# among them, and torch is imported only after it is there (imported before, torch warns "Failed
# to initialize NumPy"). That import checks the torch build against VARIANT, proves torch sees
# numpy, and writes the bytecode of what it imports.
COPY pyproject.toml /tmp/build/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/build/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/build/requirements.txt \
 && pip install --no-compile -r /tmp/build/requirements.txt \
 && rm -rf /tmp/build \
 && site=$(python -c "import sysconfig; print(sysconfig.get_path('purelib'))") \
 && find "$site" \( -path "$site/torch" -o -name "*.dist-info" \) -prune -o -type d -name tests -prune -exec rm -rf {} + \
 && env -u PYTHONDONTWRITEBYTECODE python -c "import sys, torch; torch.zeros(1).numpy(); cuda = torch.version.cuda is not None; sys.exit(0 if cuda == ('$VARIANT' == 'cuda') else 'VARIANT=$VARIANT but got torch ' + torch.__version__)"

# ---- runtime: deps + normserve, as an unprivileged user ----
FROM deps AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="normserve" \
      org.opencontainers.image.description="Normalization as a service: batch-norm sessions over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.normserve.variant="${VARIANT}" \
      io.normserve.stage="runtime"
RUN groupadd --gid 10001 normserve \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin normserve
ENV NORMSERVE_ADDRESS=0.0.0.0:50051 \
    NORMSERVE_METRICS_ADDRESS=0.0.0.0:9464 \
    TINI_SUBREAPER=1
COPY --from=wheel /src/dist/normserve-*.whl /tmp/dist/
# Then the bytecode of what the server and the client import (the unprivileged user cannot write
# it at start-up: without it every start would compile them again).
RUN pip install --no-deps /tmp/dist/normserve-*.whl \
 && rm -rf /tmp/dist \
 && env -u PYTHONDONTWRITEBYTECODE python -c "import normserve.server, normserve.client" \
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
