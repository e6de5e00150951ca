# syntax=docker/dockerfile:1
#
# The meds service image. One Dockerfile, two variants:
#
#   docker build -t meds:0.1.0 .                                  # CPU (default): python:3.11-slim, faiss-cpu
#   docker build -t meds:0.1.0-cuda --build-arg VARIANT=cuda .    # CUDA 12 base, faiss-gpu (GPU kNN index)
#
# Run it:  docker run -p 8000:8000 -v meds-data:/data meds:0.1.0            (`meds serve`, the default)
#          docker run -e MEDS_REDIS_URL=redis://... meds:0.1.0 worker       (`meds worker`)
# The CUDA variant needs the NVIDIA Container Toolkit (`docker run --gpus all ...`) and runs anywhere
# without a GPU too (MEDS_INDEX_DEVICE=auto falls back to the CPU index).
#
# Builds with BuildKit (the default builder since Docker 23): only the stages the chosen VARIANT needs
# are built, so a CPU build never pulls the CUDA base image.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The faiss-gpu wheel brings its own CUDA runtime and cuBLAS (nvidia-*-cu12 wheels); the CUDA base adds the
# NVIDIA container settings. `--build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu22.04` gives a smaller image.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04

# ---- interpreter per variant. The builder and the runtime derive from the same one, so the virtualenv
# ---- built in the builder (its `python` is a symlink to the base's interpreter) works when copied over.
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's python3.11 tracks security updates within 3.11; pinning a patch release would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

# The stage name comes from VARIANT; the images behind both stages are tagged above.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# ---- builder: the service and its dependencies in /opt/meds (a virtualenv). Every dependency has an
# ---- x86_64 wheel; the compiler is only for platforms without one (e.g. hdbscan on arm64).
FROM base AS builder
ARG VARIANT
ARG FAISS_GPU_VERSION=1.15.1
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && if [ "$VARIANT" = cuda ]; then apt-get install -y --no-install-recommends python3.11-dev; fi \
    && rm -rf /var/lib/apt/lists/*
# The pip a new virtualenv gets can be old (Ubuntu's python3.11-venv): update it first.
RUN python3.11 -m venv /opt/meds \
    && /opt/meds/bin/pip install --no-cache-dir --upgrade "pip>=24"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# faiss-cpu and faiss-gpu both install the module `faiss`: exactly one may be present, so the CUDA variant
# removes faiss-cpu before installing faiss-gpu (removing it afterwards would delete shared files).
RUN /opt/meds/bin/pip install --no-cache-dir . \
    && if [ "$VARIANT" = cuda ]; then \
         /opt/meds/bin/pip uninstall -y faiss-cpu \
         && /opt/meds/bin/pip install --no-cache-dir "faiss-gpu==${FAISS_GPU_VERSION}"; \
       fi \
    && /opt/meds/bin/python -c "import faiss, meds_service.cli; print('faiss', faiss.__version__)"

# ---- runtime: the virtualenv on a clean base, a non-root user, nothing else.
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="meds" \
      org.opencontainers.image.description="MEDS reward shaping service: an error memory that penalises recurring mistakes in RL of LLMs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.meds.variant="${VARIANT}"
RUN groupadd --system --gid 10001 meds \
    && useradd --system --uid 10001 --gid meds --home-dir /data --no-create-home --shell /usr/sbin/nologin meds \
    && mkdir -p /data \
    && chown meds:meds /data
COPY --from=builder /opt/meds /opt/meds
ENV PATH="/opt/meds/bin:${PATH}" \
    MEDS_HOST=0.0.0.0 \
    MEDS_PORT=8000 \
    MEDS_DATA_DIR=/data
WORKDIR /data
# The embedded SQLite store (used when MEDS_REDIS_URL is not set) lives here: mount a volume on it.
VOLUME ["/data"]
USER 10001:10001
EXPOSE 8000
# Liveness of `meds serve` (no curl in the slim image). `meds worker` has no HTTP port: disable this check
# for it (compose: `healthcheck: {disable: true}`; Kubernetes ignores image health checks).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('MEDS_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["meds"]
CMD ["serve"]
