# fuseserve aligner: REST (8080) + gRPC (50061). No torch in this image.
# Build from the repository root: docker build -f docker/aligner.Dockerfile -t fuseserve-aligner .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
COPY pyproject.toml README.md /src/
COPY services /src/services
RUN /opt/venv/bin/pip install "/src[aligner]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/fuseserve \
    FUSESERVE_CACHE=/home/fuseserve/.cache/fuseserve \
    FUSESERVE_ALIGNER_HOST=0.0.0.0 \
    FUSESERVE_ALIGNER_REST_PORT=8080 \
    FUSESERVE_ALIGNER_GRPC_PORT=50061 \
    FUSESERVE_ALIGNER_VOCAB_MAP_DIR=/var/lib/fuseserve/vocab-maps
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --home-dir /home/fuseserve fuseserve \
    && mkdir -p /data/vocab-maps /data/runs && chown -R 10001:10001 /data \
    && mkdir -p /var/lib/fuseserve/vocab-maps \
    && chown -R 10001:10001 /var/lib/fuseserve
USER 10001
EXPOSE 8080 50061
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["fuseserve", "probe", "--http", "http://127.0.0.1:8080/readyz"]
ENTRYPOINT ["fuseserve", "aligner"]
