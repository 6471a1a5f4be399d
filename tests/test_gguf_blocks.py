"""GGUF block formats: our torch/numpy implementation against gguf.quants (the independent
reference) on random blocks and on the real SmolLM2 tensors."""

from __future__ import annotations

import hashlib
import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from edgellm.errors import ModelFormatError, UnsupportedModelError
from edgellm.loading.gguf import read_gguf
from edgellm.quant import gguf_blocks as gb

QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of the float16 fields in each block.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
              "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
# Types gguf.quants can quantise (bit-exactness reference).
GGUF_QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "BF16", "F16", "F32"]


def random_blocks(rng: np.random.Generator, ggml_type: str, n_rows: int, n_cols: int) -> np.ndarray:
    """Random bytes for an [n_rows, n_cols] tensor whose float16 fields are finite."""
    nblk = n_rows * n_cols // gb.BLOCK_ELEMS[ggml_type]
    raw = rng.integers(0, 256, (nblk, gb.BLOCK_BYTES[ggml_type]), dtype=np.uint8)
    for off in F16_FIELDS[ggml_type]:
        vals = (rng.standard_normal(nblk) * np.exp(rng.uniform(-8, 2, nblk))).astype(np.float16)
        raw[:, off:off + 2] = vals.reshape(-1, 1).view(np.uint8)
    return raw.reshape(-1)


def bits(a) -> np.ndarray:
    a = a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def gguf_ref(raw: np.ndarray, ggml_type: str, n_rows: int) -> np.ndarray:
    return gguf.quants.dequantize(np.asarray(raw).reshape(n_rows, -1), T[ggml_type])


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------

def test_block_tables_match_gguf():
    for name in gb.BLOCK_ELEMS:
        assert (gb.BLOCK_ELEMS[name], gb.BLOCK_BYTES[name]) == GGML_QUANT_SIZES[T[name]], name


def test_nbytes():
    assert gb.nbytes("Q4_1", 576 * 1536) == 576 * 1536 // 32 * 20
    assert gb.nbytes("Q6_K", 256) == 210
    assert gb.nbytes("F32", 10) == 40
    assert gb.nbytes("BF16", 3) == 6
    with pytest.raises(ModelFormatError, match="block"):
        gb.nbytes("Q8_0", 33)
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        gb.nbytes("IQ2_XXS", 256)


# ---------------------------------------------------------------------------------------------
# dequantize against gguf.quants
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_dequantize_random_blocks_bit_exact(ggml_type):
    rng = np.random.default_rng(100 + QUANT_TYPES.index(ggml_type))
    n_rows, n_cols = 6, 1024
    raw = random_blocks(rng, ggml_type, n_rows, n_cols)
    ours = gb.dequantize(raw, ggml_type, (n_rows, n_cols))
    assert ours.dtype == torch.float32 and ours.shape == (n_rows, n_cols)
    np.testing.assert_array_equal(bits(ours), bits(gguf_ref(raw, ggml_type, n_rows)))


@pytest.mark.parametrize("ggml_type", QUANT_TYPES)
def test_dequantize_large_tensor_chunked(ggml_type, monkeypatch):
    """Tensors bigger than one chunk go through the chunked path and give the same values."""
    rng = np.random.default_rng(7)
    raw = random_blocks(rng, ggml_type, 16, 2048)
    whole = gb.dequantize(raw, ggml_type, (16, 2048))
    monkeypatch.setattr(gb, "_CHUNK_ELEMS", 3 * 256)   # not a divisor of the block count
    chunked = gb.dequantize(raw, ggml_type, (16, 2048))
    np.testing.assert_array_equal(bits(chunked), bits(whole))


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16"])
def test_dequantize_float_types(ggml_type):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(x, T[ggml_type])).view(np.uint8).reshape(-1)
    ref_in = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint8}[ggml_type]).reshape(5, -1)
    ours = gb.dequantize(raw, ggml_type, (5, 64))
    np.testing.assert_array_equal(bits(ours), bits(gguf.quants.dequantize(ref_in, T[ggml_type])))
    if ggml_type == "F32":
        np.testing.assert_array_equal(ours.numpy(), x)


def test_dequantize_accepts_bytes_tensors_and_readonly_arrays():
    rng = np.random.default_rng(11)
    raw = random_blocks(rng, "Q4_1", 2, 64)
    ref = gb.dequantize(raw, "Q4_1", (2, 64))
    ro = raw.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = [gb.dequantize(ro, "Q4_1", (2, 64)), gb.dequantize(raw.tobytes(), "Q4_1", (2, 64)),
               gb.dequantize(torch.from_numpy(raw.copy()), "Q4_1", (2, 64)),
               gb.dequantize(raw.reshape(2, -1), "Q4_1", [2, 64])]
    for g in got:
        assert torch.equal(g, ref)
    # misaligned buffers (float views need aligned storage) are copied, not rejected
    x = np.arange(10, dtype=np.float32)
    buf = np.zeros(41, np.uint8)
    buf[1:] = x.view(np.uint8)
    np.testing.assert_array_equal(gb.dequantize(buf[1:], "F32", (10,)).numpy(), x)
    np.testing.assert_array_equal(gb.dequantize(buf[1:21], "F16", (2, 5)).numpy(),
                                  buf[1:21].copy().view(np.float16).astype(np.float32).reshape(2, 5))
    # the result never aliases the input
    f32 = np.arange(8, dtype=np.float32)
    out = gb.dequantize(f32.view(np.uint8), "F32", (8,))
    out[0] = 99
    assert f32[0] == 0


def test_dequantize_rejects_bad_input():
    with pytest.raises(ModelFormatError, match="bytes"):
        gb.dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(ModelFormatError, match="block"):
        gb.dequantize(np.zeros(34, np.uint8), "Q8_0", (31,))
    with pytest.raises(UnsupportedModelError):
        gb.dequantize(np.zeros(34, np.uint8), "Q3_K", (256,))


# ---------------------------------------------------------------------------------------------
# real tensors from SmolLM2
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.7.ffn_down.weight",
                                  "blk.29.ffn_up.weight"])
def test_dequantize_real_q4_1_tensors(smollm2, name):
    t = smollm2.tensors[name]
    assert t.ggml_type == "Q4_1"
    ours = t.dequantize()
    assert ours.shape == t.shape
    np.testing.assert_array_equal(bits(ours), bits(gguf_ref(t.data, "Q4_1", t.shape[0])))


def test_dequantize_real_q8_0_embedding_rows(smollm2):
    t = smollm2.tensors["token_embd.weight"]
    assert t.ggml_type == "Q8_0" and t.shape == (49152, 576)
    row_bytes = 576 // 32 * 34
    rows = t.data.reshape(49152, row_bytes)
    for sel in (slice(0, 700), slice(30000, 30300), slice(49152 - 500, 49152)):
        part = rows[sel]
        ours = gb.dequantize(part, "Q8_0", (part.shape[0], 576))
        np.testing.assert_array_equal(bits(ours), bits(gguf_ref(part, "Q8_0", part.shape[0])))
    # the whole-tensor path agrees with the row subsets
    full = t.dequantize()
    np.testing.assert_array_equal(bits(full[30000:30300]), bits(gguf_ref(rows[30000:30300], "Q8_0", 300)))


def test_dequantize_real_f32_norm(smollm2):
    t = smollm2.tensors["blk.3.attn_norm.weight"]
    assert t.ggml_type == "F32" and t.shape == (576,)
    np.testing.assert_array_equal(t.dequantize().numpy(), np.asarray(t.data).view(np.float32))


def test_unpack_real_q4_1(smollm2):
    t = smollm2.tensors["blk.2.ffn_gate.weight"]
    rows, cols = t.shape
    d, m, q = gb.unpack_q4_1(t.data, rows, cols)
    w = (d.float().repeat_interleave(32, 1) * q.float()) + m.float().repeat_interleave(32, 1)
    np.testing.assert_array_equal(bits(w), bits(t.dequantize()))


def test_unpack_real_q8_0(smollm2):
    t = smollm2.tensors["token_embd.weight"]
    part = t.data[: 256 * 612]
    d, q = gb.unpack_q8_0(part, 256, 576)
    w = d.float().repeat_interleave(32, 1) * q.float()
    np.testing.assert_array_equal(bits(w), bits(gb.dequantize(part, "Q8_0", (256, 576))))


# ---------------------------------------------------------------------------------------------
# unpackers reconstruct exactly what dequantize gives
# ---------------------------------------------------------------------------------------------

def _rep(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.float().repeat_interleave(k, dim=1)


UNPACK_CASES = {
    "Q8_0": (gb.unpack_q8_0, (torch.float16, torch.int8), lambda f: _rep(f[0], 32) * f[1].float()),
    "Q4_0": (gb.unpack_q4_0, (torch.float16, torch.uint8), lambda f: _rep(f[0], 32) * (f[1].float() - 8)),
    "Q4_1": (gb.unpack_q4_1, (torch.float16, torch.float16, torch.uint8),
             lambda f: _rep(f[0], 32) * f[2].float() + _rep(f[1], 32)),
    "Q5_0": (gb.unpack_q5_0, (torch.float16, torch.uint8), lambda f: _rep(f[0], 32) * (f[1].float() - 16)),
    "Q5_1": (gb.unpack_q5_1, (torch.float16, torch.float16, torch.uint8),
             lambda f: _rep(f[0], 32) * f[2].float() + _rep(f[1], 32)),
    "Q4_K": (gb.unpack_q4_k, (torch.float32, torch.float32, torch.uint8),
             lambda f: _rep(f[0], 32) * f[2].float() - _rep(f[1], 32)),
    "Q5_K": (gb.unpack_q5_k, (torch.float32, torch.float32, torch.uint8),
             lambda f: _rep(f[0], 32) * f[2].float() - _rep(f[1], 32)),
    "Q6_K": (gb.unpack_q6_k, (torch.float32, torch.int8), lambda f: _rep(f[0], 16) * f[1].float()),
}
Q_RANGE = {"Q8_0": (-128, 127), "Q4_0": (0, 15), "Q4_1": (0, 15), "Q5_0": (0, 31), "Q5_1": (0, 31),
           "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}


@pytest.mark.parametrize("ggml_type", list(UNPACK_CASES))
def test_unpack_reconstructs_dequantize(ggml_type):
    fn, dtypes, rebuild = UNPACK_CASES[ggml_type]
    rng = np.random.default_rng(5)
    n_rows, n_cols = 4, 512
    raw = random_blocks(rng, ggml_type, n_rows, n_cols)
    fields = fn(raw, n_rows, n_cols)
    assert tuple(f.dtype for f in fields) == dtypes
    per = 16 if ggml_type == "Q6_K" else 32
    for f in fields[:-1]:
        assert f.shape == (n_rows, n_cols // per)
    q = fields[-1]
    assert q.shape == (n_rows, n_cols)
    lo, hi = Q_RANGE[ggml_type]
    assert int(q.min()) >= lo and int(q.max()) <= hi
    np.testing.assert_array_equal(bits(rebuild(fields)), bits(gb.dequantize(raw, ggml_type, (n_rows, n_cols))))


def test_unpack_rejects_bad_shapes():
    with pytest.raises(ModelFormatError):
        gb.unpack_q8_0(np.zeros(34, np.uint8), 1, 31)
    with pytest.raises(ModelFormatError):
        gb.unpack_q4_k(np.zeros(144, np.uint8), 2, 256)


# ---------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------

def _test_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    normal = rng.standard_normal((32, 512)).astype(np.float32)
    wide = (rng.standard_normal((32, 512)) * np.exp(rng.uniform(-12, 6, (32, 1)))).astype(np.float32)
    special = rng.standard_normal((16, 512)).astype(np.float32)
    special[0] = 0                    # all-zero blocks
    special[1] = 0.25                 # constant positive
    special[2] = -3.0                 # constant negative
    special[3, ::2] = 0               # half zeros
    special[4] = np.abs(special[4])   # all positive
    special[5] = -np.abs(special[5])  # all negative
    special[6] = np.round(special[6] * 4)  # ties at .5 after scaling
    special[7, 5] = 1e4               # one outlier
    heavy = rng.standard_t(2, (32, 512)).astype(np.float32)
    return {"normal": normal, "wide": wide, "special": special, "heavy": heavy}


INPUTS = _test_inputs()


@pytest.mark.parametrize("ggml_type", GGUF_QUANTIZABLE)
@pytest.mark.parametrize("kind", list(INPUTS))
def test_quantize_bit_exact_with_gguf(ggml_type, kind):
    x = INPUTS[kind]
    ref = np.ascontiguousarray(gguf.quants.quantize(x, T[ggml_type])).view(np.uint8).reshape(-1)
    ours = gb.quantize(x, ggml_type)
    assert ours.dtype == np.uint8 and ours.size == gb.nbytes(ggml_type, x.size)
    np.testing.assert_array_equal(ours, ref)


def test_quantize_accepts_torch_and_chunks_large_inputs():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((40, 4096)).astype(np.float32)   # > one quantize chunk
    ref = np.ascontiguousarray(gguf.quants.quantize(x, T.Q4_0)).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(gb.quantize(torch.from_numpy(x), "Q4_0"), ref)
    np.testing.assert_array_equal(gb.quantize(x, "Q4_0"), ref)


def test_quantize_real_tensor_roundtrip_q8_0(smollm2):
    """Re-quantising dequantised Q8_0 weights to Q8_0 is bit-exact with gguf.quants."""
    t = smollm2.tensors["token_embd.weight"]
    w = gb.dequantize(t.data[: 128 * 612], "Q8_0", (128, 576))
    ref = np.ascontiguousarray(gguf.quants.quantize(w.numpy(), T.Q8_0)).view(np.uint8).reshape(-1)
    np.testing.assert_array_equal(gb.quantize(w, "Q8_0"), ref)


# Max relative RMS error of the round trip on gaussian data (Q4_0 gives ~0.10 on the same data).
K_QUANT_RMSE = {"Q4_K": 0.085, "Q6_K": 0.022}


@pytest.mark.parametrize("ggml_type", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("kind", list(INPUTS))
def test_k_quantize_roundtrip(ggml_type, kind):
    x = INPUTS[kind].reshape(-1, 1024)
    q = gb.quantize(x, ggml_type)
    assert q.size == gb.nbytes(ggml_type, x.size)
    ours = gb.dequantize(q, ggml_type, x.shape)
    # gguf's independent decoder reads our bytes the same way
    np.testing.assert_array_equal(bits(ours), bits(gguf_ref(q, ggml_type, x.shape[0])))
    if kind == "normal":
        rel = float(np.sqrt(((ours.numpy() - x) ** 2).mean() / (x ** 2).mean()))
        assert rel < K_QUANT_RMSE[ggml_type]
        q4_0 = gb.dequantize(gb.quantize(x, "Q4_0"), "Q4_0", x.shape).numpy()
        assert rel < float(np.sqrt(((q4_0 - x) ** 2).mean() / (x ** 2).mean()))
    # every block's error is bounded by its own magnitude (blocks of tiny values lose their
    # float16 super-block scale to underflow, in llama.cpp too: leave those out)
    xb = x.reshape(-1, 256)
    amax = np.abs(xb).max(axis=1)
    err = np.abs(ours.numpy().reshape(-1, 256) - xb).max(axis=1)
    bound = {"Q4_K": 0.15, "Q6_K": 0.04}[ggml_type]
    normal = amax > 0.05
    assert np.all(err[normal] <= bound * amax[normal])


def test_k_quantize_zero_and_constant_blocks():
    x = np.zeros((2, 256), np.float32)
    x[1] = -0.5
    for t in ("Q4_K", "Q6_K"):
        out = gb.dequantize(gb.quantize(x, t), t, x.shape).numpy()
        assert np.all(out[0] == 0)
        np.testing.assert_allclose(out[1], -0.5, rtol=0.02)
    assert not gb.quantize(np.zeros((1, 256), np.float32), "Q6_K").any()


def _golden_input() -> np.ndarray:
    """Platform-independent input (integer arithmetic and one float64 division)."""
    i = np.arange(8 * 1024, dtype=np.int64)
    x = (((i * 7919) % 1000 - 500) / np.float32(97)).astype(np.float32).reshape(8, 1024)
    x[1] *= np.float32(1 / 1024)
    x[2, :300] = 0
    x[3] = np.abs(x[3])
    x[4] = -np.abs(x[4])
    x[5, ::7] = np.float32(40.0)
    return x


# SHA-256 of llama.cpp's quantize_row_q4_K_ref / quantize_row_q6_K_ref output for
# _golden_input(), from the C reference compiled with -O2 -ffp-contract=off.
GOLDEN = {
    "Q4_K": "64484048a16ab8def788b68a236229425805b431244628789b87228db1c15327",
    "Q6_K": "74a12aff27731cd6322d9bb314d0bde40287149c43eb29012d86f31bd3f3059c",
}


@pytest.mark.parametrize("ggml_type", list(GOLDEN))
def test_k_quantize_matches_llama_cpp_reference(ggml_type):
    out = gb.quantize(_golden_input(), ggml_type)
    assert hashlib.sha256(out.tobytes()).hexdigest() == GOLDEN[ggml_type]


def test_quantize_rejects_bad_input():
    with pytest.raises(ModelFormatError, match="multiple"):
        gb.quantize(np.zeros((2, 48), np.float32), "Q8_0")
    with pytest.raises(ModelFormatError, match="multiple"):
        gb.quantize(np.zeros((2, 128), np.float32), "Q4_K")
    with pytest.raises(UnsupportedModelError):
        gb.quantize(np.zeros((2, 256), np.float32), "Q3_K")
    with pytest.raises(ModelFormatError):
        gb.quantize(np.zeros((0, 32), np.float32), "Q8_0")
