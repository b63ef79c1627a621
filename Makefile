# lorafleet: every command a person or CI needs. `make test` and `make serve`
# install everything from nothing (a .venv here) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PROTO_SRC := proto/lorafleet/v1/lorafleet.proto
PROTO_OUT := proto/lorafleet/v1/lorafleet_pb2.py

.PHONY: setup setup-ops proto serve test test-unit test-integration bench bench-smoke loadtest demo clean help gpu-wheels gpu-check

help:
	@echo "make serve   start the server on the embedded default model: gRPC :50051, OpenAI HTTP :8000 (ARGS='--port 6000' passes flags)"
	@echo "make test    install (first time) and run the whole test suite"
	@echo "make bench   run the benchmarks as the README quotes them (ratios against baselines measured in the same run; long)"
	@echo "make bench-smoke  every bench/*.py with --smoke: tiny model, a few steps, seconds each (make test runs it too)"
	@echo "make proto   regenerate the gRPC stubs from proto/"
	@echo "make demo    train two adapters for two tenants, serve both, send one mixed batch"
	@echo "make loadtest  run locust against a fresh server (ARGS='--duration 30 --users 32')"
	@echo "make setup-ops install Prometheus/promtool and HAProxy (Debian packages) for the metrics and fleet tests"
	@echo "make gpu-wheels  (with a network) fetch the wheels a GPU machine without one lacks into $(GPU_WHEELS)/"
	@echo "make gpu-check   (on the GPU machine) kernels, parity and benches on CUDA; report in \$$OUT or gpu-report/"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel of 2.13.0 is what every other package then accepts
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,gpu]'
	touch $(STAMP)

setup: $(STAMP)

# the real Prometheus server and promtool (the scrape test) and HAProxy (the fleet test): Debian's packages
setup-ops:
	@command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 && { command -v haproxy || test -x /usr/sbin/haproxy; } >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus haproxy; }

$(PROTO_OUT): $(PROTO_SRC) $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO_SRC)

proto: $(PROTO_OUT)

serve: $(STAMP) $(PROTO_OUT)
	$(PY) -m server --http-port 8000 $(ARGS)

test: $(STAMP) $(PROTO_OUT) setup-ops
	$(PY) -m pytest -q $(ARGS)

# fast unit tests only (under a minute); `make test` runs everything
test-unit: $(STAMP) $(PROTO_OUT)
	$(PY) -m pytest -q tests/unit -m "not slow" $(ARGS)

test-integration: $(STAMP) setup-ops
	$(PY) -m pytest -q tests/integration $(ARGS)

# the README's commands; mixed_adapters and profile_step without --quick take many minutes more on 2 cores
bench: $(STAMP) $(PROTO_OUT)
	$(PY) bench/engine_vs_hf.py
	$(PY) bench/adapter_kernels.py
	$(PY) bench/mixed_adapters.py --quick
	$(PY) bench/adapter_load.py
	$(PY) bench/fairness.py --model random-512
	$(PY) bench/profile_step.py --quick
	$(PY) bench/affinity_sim.py

# every bench end to end in seconds (tests/integration/test_benches.py, which `make test` runs)
bench-smoke: $(STAMP) $(PROTO_OUT)
	$(PY) -m pytest -q tests/integration/test_benches.py $(ARGS)

loadtest: $(STAMP) $(PROTO_OUT)
	$(PY) loadtest/run.py $(ARGS)

# trains two LoRA adapters on two synthetic tasks, serves both, sends one mixed batch (a few minutes)
demo: $(STAMP) $(PROTO_OUT)
	$(PY) trainer/examples/demo.py $(ARGS)

# The GPU check runs on a machine with one NVIDIA GPU and no network, with that machine's own
# python3 (torch 2.11 CUDA, triton 3.6, transformers, peft, pytest, hypothesis already there).
# gpu-wheels (here, with a network) fetches what it lacks as pure-Python wheels for its Python;
# gpu-check installs them from $(GPU_WHEELS)/ into $(GPU_SITE)/ (no index) and runs one script.
GPU_PY ?= python3
GPU_PY_VERSION ?= 3.12
GPU_WHEELS := .gpu-wheels
GPU_SITE := .gpu-site
GPU_WHEEL_REQS := grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 grpcio-status==1.85.1 googleapis-common-protos==1.76.0

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) $(GPU_WHEEL_REQS)
	ls $(GPU_WHEELS)

gpu-check:
	rm -rf $(GPU_SITE)
	if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then $(GPU_PY) -m pip install --quiet --no-index --no-deps \
	  --no-compile --target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(CURDIR):$(CURDIR)/proto:$(CURDIR)/$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PY) bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(GPU_SITE) gpu-report
