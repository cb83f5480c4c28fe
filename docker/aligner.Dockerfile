# fuseserve aligner: REST (8080) + gRPC (50061). No torch in this image.
# Build from the repository root: docker build -f docker/aligner.Dockerfile -t fuseserve-aligner .
# Build arguments: PYTHON_IMAGE (a Debian-based Python 3.11+ image with `python` on PATH).
# Optional build inputs (a CA bundle for pip): docker/build-context/README.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/build-context /build-context
RUN if [ -f /build-context/ca.pem ]; then printf '[global]\ncert = /build-context/ca.pem\n' > /etc/pip.conf; fi \
    && python -m venv /opt/venv
# dependencies first, in their own layer; the source last, so a code change rebuilds one layer
COPY pyproject.toml docker/pyproject_requirements.py /src/
RUN python /src/pyproject_requirements.py /src/pyproject.toml aligner > /src/requirements.txt \
    && /opt/venv/bin/pip install -r /src/requirements.txt
COPY README.md setup.py /src/
COPY services /src/services
RUN /opt/venv/bin/pip install --no-deps /src

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
