"""Native block kernels against the gguf package's dequantisation (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.kernels import native
from edgellm.layers.weights import GGUFBlockWeight, NATIVE_MAX_ROWS
from edgellm.loading.gguf import read_gguf

ext = native()
pytestmark = pytest.mark.skipif(ext is None, reason="native kernels unavailable on this machine")


def _random_blocks(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random matrix quantised by gguf itself, and gguf's dequantisation of it."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    qtype = GGMLQuantizationType[fmt]
    raw = quants.quantize(w, qtype)
    ref = quants.dequantize(raw, qtype).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)), torch.from_numpy(ref)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, NATIVE_MAX_ROWS, 37])
def test_block_matmul_matches_dequantise_then_matmul(fmt, rows):
    raw, ref = _random_blocks(fmt, n=96, k=160, seed=rows)
    w = GGUFBlockWeight(raw, fmt, 160)
    x = torch.randn(rows, 160)
    expect = x.double() @ ref.double().T
    got = w.matmul(x)
    assert got.shape == (rows, 96)
    assert torch.allclose(got.double(), expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0"])
def test_rows_and_dequantise_are_exact(fmt):
    raw, ref = _random_blocks(fmt, n=64, k=96, seed=7)
    w = GGUFBlockWeight(raw, fmt, 96)
    assert torch.equal(w.dequantize(), ref)
    idx = torch.tensor([5, 0, 63, 5])
    assert torch.equal(w.rows(idx), ref[idx])


def test_real_weights_of_the_default_model(smollm2_path):
    gf = read_gguf(smollm2_path)
    for name in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"):
        t = gf.tensors[name]
        n, k = t.shape
        raw = torch.from_numpy(np.array(t.data)).view(n, -1)
        ref = torch.from_numpy(quants.dequantize(np.array(t.data), GGMLQuantizationType[t.ggml_type]).reshape(n, k))
        w = GGUFBlockWeight(raw, t.ggml_type, k)
        x = torch.randn(2, k)
        assert torch.allclose(w.matmul(x).double(), x.double() @ ref.double().T, atol=2e-4, rtol=1e-4)
