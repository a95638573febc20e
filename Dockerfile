# syntax=docker/dockerfile:1
# labelmill images. Two targets, one file:
#
#   docker build --target worker -t REGISTRY/labelmill/worker:0.1.0 .
#   docker build --target export -t REGISTRY/labelmill/export:0.1.0 .
#
# worker: Celery workers, the producer, Flower and the model init container.
#   No TensorFlow. Dependencies come from deploy/requirements/worker.txt
#   (every version pinned, every file hashed), so a rebuild installs the same
#   bytes. Estimated size ~300 MB uncompressed (see docs/kubernetes.md).
# export: `serving export` (TensorFlow, the `serving` extra), used by the
#   model-export Job only. Locked by deploy/requirements/export.txt.
# Both run as the unprivileged user 10001 and hold no secrets.

# --------------------------------------------------------------------- base
FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 labelmill \
 && useradd --system --uid 10001 --gid labelmill --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin labelmill

# ------------------------------------------------------------ worker deps
FROM base AS worker-deps
COPY deploy/requirements/worker.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && pip install --no-deps --require-hashes -r /tmp/requirements.txt

# ------------------------------------------------------------ export deps
FROM base AS export-deps
COPY deploy/requirements/export.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
 && pip install --no-deps --require-hashes -r /tmp/requirements.txt

# ------------------------------------------------------------------ source
# The project itself, without dependencies (they are locked above).
FROM base AS source
COPY pyproject.toml README.md /src/
COPY labelmill /src/labelmill
COPY producer /src/producer
COPY workers /src/workers
COPY serving /src/serving
# Build isolation fetches setuptools (build-time only; nothing of it ships).
RUN pip wheel --no-deps --wheel-dir /wheels /src

# ------------------------------------------------------------------ worker
FROM base AS worker
COPY --from=worker-deps /opt/venv /opt/venv
COPY --from=source /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
COPY deploy/scripts/model_sync.py /opt/labelmill/model_sync.py
WORKDIR /tmp
USER 10001:10001
CMD ["celery", "-A", "workers", "worker", "-Q", "classify", "--prefetch-multiplier=1", "--loglevel=INFO"]

# ------------------------------------------------------------------ export
FROM base AS export
COPY --from=export-deps /opt/venv /opt/venv
COPY --from=source /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
COPY deploy/scripts/model_sync.py /opt/labelmill/model_sync.py
WORKDIR /tmp
USER 10001:10001
CMD ["serving", "export", "--help"]
