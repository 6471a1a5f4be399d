"""Low-precision KV cache: int8/fp8 with a scale per token and head against numpy references,
sizes, block export/import, and the real model's outputs with each KV dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgellm.config import ModelConfig
from edgellm.dtypes import kv_dtype_name
from edgellm.errors import InvalidParameterError
from edgellm.kv.cache import KVCache

CFG = ModelConfig(architecture="llama", vocab_size=100, hidden_size=192, n_layers=2, n_heads=3, n_kv_heads=3,
                  head_dim=64, ffn_size=256, context_length=256)


def _kv(t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, CFG.n_kv_heads, CFG.head_dim, generator=g)
    return x * torch.logspace(-3, 2, t)[:, None, None]         # magnitudes from 1e-3 to 1e2 per token


def _np_scale(amax: np.ndarray, qmax: float) -> np.ndarray:
    """float16 scale, rounded up (never clips), at least the smallest float16."""
    exact = amax / np.float32(qmax)
    s = exact.astype(np.float16)
    s = np.where(s.astype(np.float32) < exact, np.nextafter(s, np.float16(np.inf)), s)
    return np.maximum(s.astype(np.float32), np.float32(2.0 ** -24))


def test_int8_matches_numpy_reference():
    cache = KVCache(CFG, 4, 16, "int8")
    k, v = _kv(20, 0), _kv(20, 1)
    slots = torch.randperm(64)[:20]
    cache.write(1, slots, k, v)
    got_k, got_v = cache.read(1, slots, torch.float32)
    for x, got in ((k, got_k), (v, got_v)):
        x = x.numpy()
        scale = _np_scale(np.abs(x).max(-1), 127)
        q = np.clip(np.round(x / scale[..., None]), -127, 127)
        np.testing.assert_allclose(got.numpy(), q * scale[..., None], rtol=1e-6, atol=0)
        assert np.all(np.abs(got.numpy() - x) <= scale[..., None] / 2 * 1.0001)


@pytest.mark.parametrize("name,mant,fmax", [("fp8", 3, 448.0), ("fp8-e5m2", 2, 57344.0)])
def test_fp8_within_bound(name, mant, fmax):
    cache = KVCache(CFG, 2, 16, name)
    k, v = _kv(32, 2), _kv(32, 3)
    cache.write(0, slice(0, 32), k, v)
    got_k, _ = cache.read(0, slice(0, 32), torch.float32)
    x = k.numpy()
    scale = _np_scale(np.abs(x).max(-1), fmax)[..., None]
    err = np.abs(got_k.numpy() - x)
    # half an ulp: 2^-(mant+1) relative for normal numbers, plus the subnormal step near zero
    min_normal = 2.0 ** -6 if name == "fp8" else 2.0 ** -14
    bound = np.maximum(np.abs(x) * 2.0 ** -(mant + 1), min_normal * 2.0 ** -mant * scale / 2) * 1.001
    assert np.all(err <= bound)


def test_sizes_halve_and_quarter():
    fp32 = KVCache.bytes_per_block(CFG, 16, "fp32")
    assert KVCache.bytes_per_block(CFG, 16, "fp16") * 2 == fp32
    assert KVCache.bytes_per_block(CFG, 16, torch.bfloat16) * 2 == fp32
    # 64 one-byte codes and a 2-byte scale per head vector, against 256 bytes
    assert KVCache.bytes_per_block(CFG, 16, "int8") == fp32 * 66 // 256
    assert KVCache(CFG, 3, 16, "int8").nbytes == 3 * KVCache.bytes_per_block(CFG, 16, "int8")
    assert KVCache(CFG, 3, 16, "fp8").nbytes == 3 * KVCache.bytes_per_block(CFG, 16, "fp8")


@pytest.mark.parametrize("name", ["int8", "fp8", "bf16"])
def test_export_import_moves_blocks(name):
    cache = KVCache(CFG, 4, 16, name)
    k, v = _kv(32, 4), _kv(32, 5)
    cache.write(0, slice(0, 32), k, v)
    cache.write(1, slice(0, 32), v, k)
    before = [cache.read(layer, slice(0, 32), torch.float32) for layer in (0, 1)]
    saved = cache.export_blocks([0, 1])
    other = KVCache(CFG, 4, 16, name)
    other.import_blocks([3, 2], saved)
    for layer in (0, 1):
        ka, va = before[layer]
        kb, vb = other.read(layer, torch.cat([torch.arange(48, 64), torch.arange(32, 48)]), torch.float32)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    with pytest.raises(ValueError):
        KVCache(CFG, 4, 16, "fp16" if name != "fp16" else "int8").import_blocks([0, 1], saved)


def test_names():
    assert kv_dtype_name("float16") == "fp16" and kv_dtype_name(torch.bfloat16) == "bf16"
    assert kv_dtype_name("E4M3") == "fp8" and kv_dtype_name(torch.int8) == "int8"
    with pytest.raises(InvalidParameterError, match="unknown KV cache dtype"):
        kv_dtype_name("int4")


@pytest.fixture(scope="module")
def smollm2(smollm2_llm):
    return smollm2_llm.loaded      # the session's model: load_model's defaults, not changed by these tests


def test_real_model_with_each_kv_dtype(smollm2):
    """A prompt and 4 greedy steps with each cache dtype: the fp32 cache's tokens, and the
    prompt's last logits within a bound that grows with the format's step."""
    from edgellm.layers.attention import AttentionBatch
    from edgellm.quality import greedy_continuations

    m, cfg = smollm2.model, smollm2.config
    prompt = smollm2.tokenizer.encode("Once upon a time, in a small village by the sea, there lived an old "
                                      "fisherman who")
    n = len(prompt)

    def last_logits(kv):
        cache = KVCache(cfg, -(-n // 16), 16, kv)
        return m.forward(torch.tensor(prompt), torch.arange(n), AttentionBatch.build([(n, n, slice(0, n))]), cache,
                         torch.tensor([n - 1]))[0]

    ref_logits = last_logits("fp32")
    ref = greedy_continuations(smollm2, [prompt], 4, "fp32")
    # measured: 0.007, 0.05, 0.42, 0.61 (logits ~20)
    for name, tol in (("fp16", 0.03), ("bf16", 0.2), ("int8", 1.0), ("fp8", 1.5)):
        err = float((last_logits(name) - ref_logits).abs().max())
        assert err < tol, (name, err)
        assert greedy_continuations(smollm2, [prompt], 4, name) == ref, name
