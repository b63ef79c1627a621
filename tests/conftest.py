"""Shared fixtures: the tiny embedded model (hidden 64, 2 layers), built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from server.model.default import resolve_model
    return resolve_model("tiny", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from server.model.loader import load_model
    return load_model(tiny_model_dir, torch.device("cpu"), torch.float32)
