# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target operator -t kvcache-operator .          slim Python, no torch
#   docker build --target engine   -t kvcache-engine .            torch 2.13.0, CPU base (default)
#   docker build --target engine -t kvcache-engine:cuda \
#     --build-arg ENGINE_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Dependencies are installed in their own layers before the source is copied, so a source
# change rebuilds only the last layer. Final images hold a virtualenv, no compiler, no pip.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG ENGINE_BASE=python:3.11-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# --- requirements: dependency lists read from pyproject.toml (no source needed) -------------------
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml .
RUN python - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
base = project["dependencies"]
open("operator.txt", "w").write("\n".join(base + extras["operator"]) + "\n")
# torch is installed on its own (pinned, from the chosen index) before the rest.
engine = [d for d in extras["engine"] if not d.startswith("torch")]
open("engine.txt", "w").write("\n".join(base + engine) + "\n")
PY

# --- operator build ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY --from=requirements /src/operator.txt /tmp/operator.txt
RUN /opt/venv/bin/pip install -r /tmp/operator.txt
COPY pyproject.toml README.md setup.py /src/
COPY operator /src/operator
COPY engine_image /src/engine_image
RUN KVCACHE_BUILD_NATIVE=0 /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/pip uninstall -y pip setuptools wheel

# --- operator: slim Python, no torch ----------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="kvcache-operator" \
      org.opencontainers.image.source="https://github.com/kvcache-operator/kvcache-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin kvcache
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
ENTRYPOINT ["kvcache-operator"]
CMD ["run", "--all-namespaces", "--standalone"]

# --- engine base: Python on the chosen base (CUDA runtime images ship none) ----------------------
FROM ${ENGINE_BASE} AS engine-base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# python:* bases already have Python 3.11+; Ubuntu-based CUDA runtime images get the distro's.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# --- engine build ----------------------------------------------------------------------------------
FROM engine-base AS engine-build
ARG TORCH_INDEX_URL
ARG TORCH_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for the checksum kernel (setup.py, kvcache_engine/core/_wordsums.c); it stays in this
# stage: the engine image gets the built venv only.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# torch first and alone: the biggest, least often changing layer; the index picks CPU or CUDA.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=requirements /src/engine.txt /tmp/engine.txt
RUN /opt/venv/bin/pip install -r /tmp/engine.txt
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY engine_image /src/engine_image
COPY setup.py /src/
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/python -c 'from kvcache_engine.core import block_pool; assert block_pool.NATIVE_SUMS, "checksum kernel not built"' \
    && /opt/venv/bin/pip uninstall -y pip setuptools wheel

# --- engine: torch, the KV cache server ----------------------------------------------------------
FROM engine-base AS engine
LABEL org.opencontainers.image.title="kvcache-engine" \
      org.opencontainers.image.source="https://github.com/kvcache-operator/kvcache-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kvcache --shell /usr/sbin/nologin kvcache \
    && mkdir -p /data/cache && chown 10001:10001 /data/cache
COPY --from=engine-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/home/kvcache
USER 10001:10001
VOLUME ["/data/cache"]
EXPOSE 8000
ENTRYPOINT ["kvcache-engine"]
CMD ["serve", "--config", "/etc/kvcache/config.yaml", "--host", "0.0.0.0", "--port", "8000"]
