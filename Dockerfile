# syntax=docker/dockerfile:1.7
#
# The two optrun images, from one source tree:
#
#   docker build --target operator -t ghcr.io/optrun/optrun-operator:0.1.0 .
#   docker build --target runtime  -t ghcr.io/optrun/optrun-runtime:0.1.0  .
#
# operator  the Kubernetes operator: slim Python, the `operator` extra, no torch and no triton
#           (docs/architecture.md: the operator carries no torch). Entry point `optrun operator`.
# runtime   what each run's pod executes: a CUDA base with torch and triton (the `runtime`
#           extra) and a C compiler, which triton needs at run time to build its GPU launcher.
#           Entry point `optrun`; the operator's pods run `optrun runtime --spec ...`.
#
# Both run as the numeric non-root user 65532 (the distroless "nonroot" id that
# optrun/operator/builders.py sets as runAsUser), so `runAsNonRoot: true` can be verified by
# the kubelet, and both work with a read-only root filesystem (HOME and caches point at /tmp,
# which the pods mount as an emptyDir).
#
# The bases are pinned to exact release tags. For production builds, pin them by digest as
# well (`python:3.11.13-slim-bookworm@sha256:...`), e.g. through the build arguments below.
#
# Dependencies: each image installs its lock (requirements/operator.txt, runtime.txt: exact
# versions, written by hack/lock.sh from pyproject.toml) in a layer of its own, before the code is
# copied, so a code change rebuilds only the small layer of the optrun package. pip's downloads
# stay in a BuildKit cache mount (not in the image), so a changed lock downloads only what
# changed. Each image keeps `pip freeze` of what it got in /opt/optrun/installed.txt.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- operator ---------------------------------------------------------------------------------

FROM ${PYTHON_IMAGE} AS operator-build
WORKDIR /src
# The operator's lock alone: exactly its versions and nothing else (--no-deps), for the same
# CPython minor and platform the lock was resolved on; `pip check` fails the build on a gap.
COPY requirements/operator.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/optrun \
    && /opt/optrun/bin/pip install --no-deps -r /tmp/requirements.txt \
    && /opt/optrun/bin/pip check
# Only what the package build reads: a change under tests/ or examples/ does not rebuild.
COPY pyproject.toml README.md ./
COPY optrun ./optrun
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/optrun/bin/pip install --no-deps . \
    && /opt/optrun/bin/pip check \
    && /opt/optrun/bin/pip freeze --exclude optrun >/opt/optrun/installed.txt

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="optrun-operator" \
      org.opencontainers.image.description="The optrun Kubernetes operator (kopf); no torch." \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=operator-build /opt/optrun /opt/optrun
ENV PATH=/opt/optrun/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 65532:65532
ENTRYPOINT ["optrun", "operator"]

# ---- runtime ----------------------------------------------------------------------------------

FROM ${CUDA_IMAGE} AS runtime-base
# Python from the base's own release (3.12 on Ubuntu 24.04), its headers and a C compiler:
# triton compiles a small C launcher against Python.h the first time it runs a kernel.
# Versions are those of the pinned base's release; pinning each package version as well would
# break the build whenever the archive replaces a package with its security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS runtime-build
WORKDIR /src
# The runtime's lock says torch==2.13.0, which on the developers' machines is satisfied by a
# local CPU wheel (2.13.0+cpu). Here pip finds PyPI's linux/amd64 build of that version, the
# CUDA 13 one, which brings the CUDA runtime as wheels: cuda-toolkit and nvidia-* libraries,
# pinned exactly by torch's own metadata (==), cuda-bindings by a range. So this install lets pip
# add torch's dependencies (no --no-deps): every locked package keeps its locked version, the
# CUDA wheels come on top, and installed.txt records the whole set. The base needs only the
# driver the NVIDIA container toolkit mounts (CUDA 13 wheels: driver 580 or newer).
# triton==3.7.1 in the lock is what this torch build requires.
COPY requirements/runtime.txt /tmp/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/optrun \
    && /opt/optrun/bin/pip install -r /tmp/requirements.txt \
    && /opt/optrun/bin/pip check
COPY pyproject.toml README.md ./
COPY optrun ./optrun
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/optrun/bin/pip install --no-deps . \
    && /opt/optrun/bin/pip check \
    && /opt/optrun/bin/pip freeze --exclude optrun >/opt/optrun/installed.txt

FROM runtime-base AS runtime
LABEL org.opencontainers.image.title="optrun-runtime" \
      org.opencontainers.image.description="The optrun runtime: CUDA, torch, triton; runs one OptimizationRun." \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=runtime-build /opt/optrun /opt/optrun
ENV PATH=/opt/optrun/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/.triton \
    MPLCONFIGDIR=/tmp/.config/matplotlib
USER 65532:65532
# The metrics port of `optrun runtime` (OperatorConfig.runtime_metrics_port).
EXPOSE 9090
ENTRYPOINT ["optrun"]
CMD ["--help"]
