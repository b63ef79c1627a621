"""Shared fixtures: the tiny embedded model (hidden 64, 2 layers), built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.config import set_thread_env

set_thread_env()            # OpenMP defaults before torch loads libgomp, as the server's entry point does

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from server.model.default import resolve_model
    return resolve_model("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from server.model.loader import load_model
    return load_model(tiny_model_dir, torch.device("cpu"), torch.float32)


# Markers (registered in pyproject.toml): every test under tests/integration is `integration`;
# these unit modules (real PEFT/transformers oracles, training, hypothesis kernel sweeps,
# subprocesses) are `slow`. `make test-unit` runs the rest in well under a minute.
SLOW_UNIT_MODULES = {"test_trainer", "test_trainer_dist", "test_trainer_cli", "test_mixed_adapters", "test_kernels",
                     "test_kernels_triton", "test_llama_vs_hf", "test_layering", "test_adapter_formats"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = item.path.parts
        if "integration" in parts:
            item.add_marker(pytest.mark.integration)
        elif item.path.stem in SLOW_UNIT_MODULES:
            item.add_marker(pytest.mark.slow)
