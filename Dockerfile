# lorafleet server image. The same install path as the Makefile: `make setup` into /app/.venv.
# Docker cannot run on the development machines; the steps mirror what `make test` exercises.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 lorafleet
WORKDIR /app
COPY --chown=lorafleet . /app
USER lorafleet
RUN make setup
VOLUME ["/data", "/models"]
EXPOSE 50051 9090
ENTRYPOINT [".venv/bin/python", "-m", "server", "--host", "0.0.0.0", "--data-dir", "/data", "--cache-dir", "/models"]
