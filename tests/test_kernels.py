"""Native block kernels against the gguf package's dequantisation (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.kernels import native
from edgellm.loading.gguf import read_gguf
from edgellm.quant.base import DECODE_MAX_ROWS
from edgellm.quant.gguf_weights import GGUFBlockWeight

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


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
@pytest.mark.parametrize("rows", [1, 3, DECODE_MAX_ROWS, 37])
def test_block_matmul_matches_dequantise_then_matmul(fmt, rows):
    raw, ref = _random_blocks(fmt, n=96, k=160, seed=rows)
    w = GGUFBlockWeight(raw, fmt, 160)
    x = torch.randn(rows, 160)
    expect = x.double() @ ref.double().T
    got = w.matmul(x)
    assert got.shape == (rows, 96)
    assert torch.allclose(got.double(), expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_rows_and_dequantise_are_exact(fmt):
    raw, ref = _random_blocks(fmt, n=64, k=96, seed=7)
    w = GGUFBlockWeight(raw, fmt, 96)
    assert torch.equal(w.dequantize(), ref)
    idx = torch.tensor([5, 0, 63, 5])
    assert torch.equal(w.rows(idx), ref[idx])


def _random_kquant(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random matrix in Q4_K / Q6_K (our quantiser: gguf-py has none for these types) and
    gguf-py's dequantisation of those bytes (the independent reference)."""
    from edgellm.quant import gguf_blocks

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    raw = gguf_blocks.quantize(w, fmt)
    ref = quants.dequantize(raw.reshape(n, -1), GGMLQuantizationType[fmt]).reshape(n, k)
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(n, -1)), torch.from_numpy(ref)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 3, DECODE_MAX_ROWS, 37])
def test_repacked_kquants_match_the_reference(fmt, rows):
    """K-quants repacked for the kernels: matmul within float32 rounding of gguf-py's weights,
    dequantised rows bit for bit (native and pure-PyTorch readers)."""
    from edgellm.quant import repack

    raw, ref = _random_kquant(fmt, n=40, k=512, seed=rows)
    packed = repack.repack(raw, fmt, 40, 512)
    w = GGUFBlockWeight(packed, repack.REPACKED[fmt], 512)
    x = torch.randn(rows, 512)
    got = w.matmul(x)
    assert got.shape == (rows, 40)
    assert torch.allclose(got.double(), x.double() @ ref.double().T, atol=1e-4, rtol=1e-4)
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(repack.dequantize(packed, repack.REPACKED[fmt], 512), ref)
    idx = torch.tensor([39, 0, 7])
    assert torch.equal(w.rows(idx), ref[idx])
    residual = torch.randn(rows, 40)
    assert torch.allclose(w.matmul_add(x, residual), residual + got, atol=1e-5)


@pytest.mark.parametrize("fmt", ["Q4_K", "Q6_K"])
def test_a_kquant_model_runs_natively_and_exactly(tmp_path, smollm2_path, fmt):
    """A small K-quant model: the native path (repacked weights, fused decode step) gives the
    greedy tokens and logits of the path that dequantises every matrix to float32 (gguf's math)."""
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / f"{fmt}.gguf", smollm2_path, matrix_type=fmt, hidden=256, ffn=512,
                            n_heads=4, n_kv_heads=2, context=128)
    fast, exact = LLM(str(path)), LLM(str(path), use_native=False)
    blocks = fast.loaded.model.weights.blocks
    assert {b.gate_up.format for b in blocks} == {fmt + "R"}
    assert fast.loaded.model.has_fused_decode                   # the fused decode step applies
    ids = list(range(100, 140))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
    a, b = fast.generate(ids, params), exact.generate(ids, params)
    assert a.token_ids == b.token_ids
    assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_mixed_q5_0_and_q8_0_parts_fuse_exactly():
    """q/k in Q5_0 and v in Q8_0 (as Q4_K_M files mix them) fuse into one native Q8_0 matrix."""
    from edgellm.loading.weights import _fused

    (rq, q), (rk, k), (rv, v) = (_random_blocks(f, n=n, k=64, seed=i)
                                 for i, (f, n) in enumerate([("Q5_0", 32), ("Q5_0", 16), ("Q8_0", 16)]))
    fused = _fused([GGUFBlockWeight(rq, "Q5_0", 64), GGUFBlockWeight(rk, "Q5_0", 64), GGUFBlockWeight(rv, "Q8_0", 64)])
    assert fused.format == "Q8_0"
    assert torch.equal(fused.dequantize(), torch.cat([q, k, v]))


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


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths", [[300], [5, 130, 257]])
def test_fused_decode_step_matches_the_per_op_path(smollm2_path, kv_dtype, lengths):
    """One decode step through the single native call (all blocks, attention split over position
    ranges when there are few sequences) against the model's per-op PyTorch path, on the same
    cache: same logits and the same keys/values written."""
    from edgellm.kv.cache import KVCache
    from edgellm.loading.load import load_model
    from edgellm.models.trace import Trace
    from edgellm.runtime.model_runner import ModelRunner, SeqChunk

    model = load_model(str(smollm2_path)).model
    assert model.has_fused_decode
    span = 320
    cache = KVCache(model.cfg, len(lengths) * span // 16, 16, kv_dtype)
    slots = [torch.arange(i * span, (i + 1) * span) for i in range(len(lengths))]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in lengths]
    ModelRunner(model, cache).run([SeqChunk(p, 0, s) for p, s in zip(prompts, slots)])
    step = [SeqChunk([1234 + i], n, s) for i, (n, s) in enumerate(zip(lengths, slots))]
    other = KVCache(model.cfg, cache.num_blocks, 16, kv_dtype)
    other.data.copy_(cache.data)
    per_op = ModelRunner(model, cache, trace=Trace(), fused_decode=False)
    fused = ModelRunner(model, other, trace=Trace())
    want = per_op.run(step)
    got = fused.run(step)
    # the trace says which path each runner took
    assert [op for op, _, _ in fused.trace.steps[0].ops] == ["embedding", "rope", "decode_blocks", "final_norm",
                                                            "lm_head"]
    assert "decode_blocks" not in per_op.trace.steps[0].totals()
    assert torch.allclose(got, want, atol=2e-3, rtol=0), (got - want).abs().max()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    # keys/values written: equal up to float32 rounding, or one float16 step of values up to ~20
    tol = 2e-2 if kv_dtype == torch.float16 else 2e-4
    diff = (other.data.float() - cache.data.float()).abs().max()
    assert diff <= tol, diff
