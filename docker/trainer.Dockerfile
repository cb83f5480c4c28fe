# fuseserve trainer: Ray Train + torch (CPU by default; TORCH_INDEX=.../cu128 for CUDA nodes).
# Build from the repository root: docker build -f docker/trainer.Dockerfile -t fuseserve-trainer .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
RUN /opt/venv/bin/pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md /src/
COPY services /src/services
RUN /opt/venv/bin/pip install "/src[trainer]"

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/home/fuseserve \
    FUSESERVE_CACHE=/home/fuseserve/.cache/fuseserve \
    FUSESERVE_TRAIN_STORAGE_PATH=/var/lib/fuseserve/runs
COPY --from=build /opt/venv /opt/venv
RUN useradd --uid 10001 --create-home --home-dir /home/fuseserve fuseserve \
    && mkdir -p /data/vocab-maps /data/runs && chown -R 10001:10001 /data \
    && mkdir -p /var/lib/fuseserve/runs \
    && chown -R 10001:10001 /var/lib/fuseserve
USER 10001
# a training job has no port: healthy while its Python process runs
HEALTHCHECK --interval=30s --timeout=5s --retries=3 \
    CMD ["python", "-c", "import fuseserve"]
ENTRYPOINT ["fuseserve"]
CMD ["train", "--help"]
