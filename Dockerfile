# syntax=docker/dockerfile:1
# hadolint global ignore=DL3008,DL3013
# (no apt version pins: they differ between the two bases; pip installs the package from this tree)
# mcserve image. GPU (default): CUDA runtime base + the CUDA build of torch from PyPI.
#   docker build -t mcserve:cuda .
#   docker run --gpus all -p 8000:8000 -e MCSERVE_API_KEY=secret mcserve:cuda [MODEL_DIR] [engine flags]
# CPU: Ubuntu base + CPU torch 2.13.0.
#   docker build --build-arg DEVICE=cpu -t mcserve:cpu .
# Other torch builds: --build-arg TORCH_VERSION=... --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Both stages start from the same base so that the virtual environment built in the first runs
# unchanged (same Python at the same path) in the second, which has no build tools or caches.

ARG DEVICE=cuda
ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG CPU_BASE=ubuntu:24.04

FROM ${CUDA_BASE} AS base-cuda
FROM ${CPU_BASE} AS base-cpu

# hadolint ignore=DL3006
FROM base-${DEVICE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG DEVICE
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index that has the wanted build: PyPI's Linux wheels are the CUDA build.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$DEVICE" = cpu ]; then default_index=https://download.pytorch.org/whl/cpu; \
    else default_index=https://pypi.org/simple; fi; \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL:-$default_index}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server server
COPY kernels kernels
COPY clients clients
# The package (not editable; package data such as data/default_model/ is copied in); the GPU image
# adds the [gpu] extra (Triton, fla-core). The torch installed above satisfies `torch>=2.4`.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$DEVICE" = cuda ]; then pip install ".[gpu]"; else pip install .; fi \
    && python -c "import mcserve.server.cli, mcserve.clients.chat"

FROM base AS runtime
ARG DEVICE
# Triton compiles a small C launcher when it first runs a kernel: the GPU image needs a C compiler
# and Python's headers at run time.
RUN if [ "$DEVICE" = cuda ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev \
        && rm -rf /var/lib/apt/lists/*; \
    fi
RUN groupadd --gid 10001 mcserve \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin mcserve \
    && mkdir -p /home/mcserve/.cache /models \
    && chown mcserve:mcserve /home/mcserve/.cache
COPY --from=build /opt/venv /opt/venv
# CPU threads: the engine reads the container's real CPU allowance (cgroup quota from --cpus or a
# Kubernetes CPU limit, and the affinity mask from --cpuset-cpus), not the host's core count, and
# keeps one core of it for the HTTP side: `docker run --cpus 4` serves with 3 engine threads. Set
# MCSERVE_THREADS (or --threads) to choose yourself; see the README ("CPU threads").
ENV PATH=/opt/venv/bin:$PATH \
    MCSERVE_PORT=8000 \
    TRITON_CACHE_DIR=/home/mcserve/.cache/triton
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /home/mcserve
EXPOSE 8000
# /health is 200 once the model is loaded, 503 while it loads (start period) or if the engine died.
# urlopen raises on 503 (or no answer), so python exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MCSERVE_PORT', '8000') + '/health', timeout=4)"]
# Arguments given to `docker run` follow: a model directory (default: the embedded model) and flags.
ENTRYPOINT ["mcserve", "serve", "--host", "0.0.0.0"]
CMD []
