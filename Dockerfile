# lorafleet server image: one frozen base model, many tenants' adapters, gRPC on 50051, /metrics on 9090.
#
#   docker build -t lorafleet .                                         # CPU torch (default)
#   docker build -t lorafleet:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .  # CUDA torch; run with --gpus all
#   docker run -p 50051:50051 -p 9090:9090 -v lorafleet-data:/data -v lorafleet-models:/models \
#       -v $PWD/keys.json:/etc/lorafleet/keys.json:ro lorafleet
#
# One install path: the build stage runs `make setup`, exactly what `make test` and `make serve` run
# (a .venv with torch==2.13.0 first, then `pip install -e '.[dev]'`). TORCH_INDEX only adds the
# PyTorch wheel index, so torch==2.13.0 resolves to its +cpu (or +cuXXX) build.
# Docker cannot run on the development machines; nothing here is exercised by `make test`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------ build: make setup into /app/.venv
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# only what the install needs (not a developer's .venv or reports)
COPY pyproject.toml README.md Makefile ./
COPY proto/ proto/
COPY client/ client/
COPY server/ server/
COPY trainer/ trainer/
RUN PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" PIP_NO_CACHE_DIR=1 make setup \
    && find /app/.venv -name '__pycache__' -prune -exec rm -rf {} +

# ------------------------------------------------------------------ runtime: the venv and the code, no compilers
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 lorafleet \
    && useradd --system --uid 10001 --gid lorafleet --create-home --home-dir /home/lorafleet lorafleet \
    && mkdir -p /data /models /etc/lorafleet \
    && chown lorafleet:lorafleet /data /models
WORKDIR /app
# the venv holds an editable install pointing at /app, so it keeps its path
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/lorafleet
USER lorafleet

# /data: the adapter store (uploads; durable). /models: the base model -- mount a Hugging Face
# directory and add `--model /models/<dir>`, or leave it empty and the embedded default model is
# built there on first start.
VOLUME ["/data", "/models"]
EXPOSE 50051 9090

# The standard grpc.health.v1 service: SERVING once the model is loaded, NOT_SERVING while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50051'); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

# Listening beyond loopback needs API keys (the server refuses otherwise): mount a keys file made
# with `lorafleet keys create` at /etc/lorafleet/keys.json. Flags after the image name replace CMD.
ENTRYPOINT ["python", "-m", "server"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", \
     "--data-dir", "/data", "--cache-dir", "/models", "--api-keys", "/etc/lorafleet/keys.json", \
     "--shutdown-grace-s", "20"]
