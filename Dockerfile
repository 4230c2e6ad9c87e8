# syntax=docker/dockerfile:1
# One image for every Lethe service (docker-compose.yml picks the command: db upgrade, serve,
# worker, beat). CPU or CUDA torch is chosen at build time:
#   docker build -t lethe .                                   # CPU wheels
#   docker build --build-arg TORCH_FLAVOR=cu128 -t lethe .    # CUDA 12.8 wheels
# TORCH_FLAVOR is a wheel index of download.pytorch.org/whl/ (cpu, cu126, cu128, ...); the CUDA
# wheels carry their CUDA libraries, so the runtime stage needs only the host's NVIDIA driver
# (passed in by the NVIDIA Container Toolkit).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and Lethe, copied whole into the runtime --------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_FLAVOR=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/lethe \
    PATH=/opt/lethe/bin:$PATH
RUN python -m venv /opt/lethe
WORKDIR /src
# torch and torchvision first, at the versions pyproject.toml pins, from the flavour's index;
# the project install below then finds them satisfied (a layer that survives code changes).
COPY pyproject.toml ./
RUN python -c 'import tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if d.startswith(("torch==", "torchvision=="))))' > torch.txt \
    && grep -q '^torch==' torch.txt \
    && pip install --index-url "${TORCH_INDEX}/${TORCH_FLAVOR}" --requirement torch.txt
COPY README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY unlearning ./unlearning
COPY migrations ./migrations
RUN pip install . && python -c "import app.main, worker.cli, migrations"

# ---- runtime: the environment, a non-root user, nothing else -------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="Lethe" \
      org.opencontainers.image.description="Right-to-be-forgotten requests honoured against deployed models" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 lethe \
    && useradd --system --uid 10001 --gid lethe --create-home --home-dir /home/lethe lethe \
    && mkdir -p /data \
    && chown lethe:lethe /data
COPY --from=build /opt/lethe /opt/lethe
ENV PATH=/opt/lethe/bin:$PATH \
    VIRTUAL_ENV=/opt/lethe \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LETHE_DATA_DIR=/data
WORKDIR /data
USER 10001:10001
EXPOSE 8000
# The API's liveness; compose gives worker and beat probes of their own.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "app.observability.probes", "http", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["lethe"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
