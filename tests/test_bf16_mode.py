"""``--dtype bfloat16`` on GGUF block weights: bf16 prefill, exact decode (edgellm/quant/bf16.py).

References written here: the weights dequantised by the gguf package, both operands rounded to
bf16 by bit arithmetic (nearest, ties to even), the product in float64, then rounded to bf16. A
bf16 GEMM with float32 accumulation lands within a bound worked out from that (below). At the
model level the reference is Hugging Face transformers running the same GGUF file in
``torch.bfloat16`` (everything in bf16): our mode, which keeps norms, attention and the residual
stream in float32, must be no further from transformers' float32 logits than that.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.errors import InvalidParameterError
from edgellm.kernels import NATIVE_FORMATS, native

ext = native()
pytestmark = pytest.mark.skipif(ext is None, reason="native kernels unavailable on this machine")

U32 = 2.0 ** -24    # float32 unit roundoff
U16 = 2.0 ** -8     # bfloat16 unit roundoff (8 bits of significand)


def np_bf16(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest bfloat16 (ties to even), as float32: the top 16 bits after
    adding half of the dropped part (plus one where the kept part is odd)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


def raw_matrix(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Raw blocks of a random [n, k] matrix and the gguf package's dequantisation (float32)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    raw = np.ascontiguousarray(quants.quantize(w, GGMLQuantizationType[fmt])).view(np.uint8).reshape(n, -1)
    return torch.from_numpy(raw), quants.dequantize(raw, GGMLQuantizationType[fmt]).reshape(n, k)


def reference(x: torch.Tensor, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the exact product of the bf16-rounded operands, float64; the bound on a bf16 GEMM's distance
    from it). The GEMM's float32 sum of K exact products is off by at most gamma_K * S (S: the sum
    of |products|, gamma_K = K u / (1 - K u)); rounding that sum a to bf16 moves it by at most
    u16 |a| <= u16 (|ref| + gamma_K S)."""
    xb = np_bf16(x.numpy()).astype(np.float64)
    wb = np_bf16(w).astype(np.float64)
    ref = xb @ wb.T
    k = x.shape[1]
    gamma = k * U32 / (1 - k * U32)
    s = np.abs(xb) @ np.abs(wb).T
    return ref, U16 * np.abs(ref) + (1 + U16) * gamma * s


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
@pytest.mark.parametrize("native_bf16", [True, False], ids=["bf16-gemm", "emulated"])
def test_prefill_matmul_is_a_bf16_gemm_of_the_weights(fmt, native_bf16):
    """Both ways (oneDNN's bf16 GEMM, which this CPU may only emulate, and our float32 emulation)
    give the bf16 product within the worked bound; the exact float32 path does not (the test can
    tell them apart)."""
    from edgellm.quant.bf16 import bf16_slab_matmul
    from edgellm.quant.gguf_weights import GGUFBlockWeight

    n, k, rows = 96, 256, 40
    raw, w = raw_matrix(fmt, n, k, seed=3)
    weight = GGUFBlockWeight(raw, fmt, k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(5))
    want, bound = reference(x, w)
    # two slabs of 64 and 32 rows: the slab loop writes each part where it belongs
    got = bf16_slab_matmul(x, n, 64, weight._dequant_slab, native_bf16=native_bf16).double().numpy()
    assert (np.abs(got - want) <= bound).all()
    assert (np_bf16(got.astype(np.float32)) == got).all()          # the product is rounded to bf16
    exact = weight.matmul(x).double().numpy()
    assert (np.abs(exact - want) > bound).mean() > 0.3


bf16_dot = pytest.mark.skipif(ext is None or not ext.bf16_dot_available(),
                              reason="bf16 dot products need the avx512 kernels on a CPU with AVX512_BF16")


@bf16_dot
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 11, 16])
def test_decode_matmul_with_bf16_dot_products(fmt, rows):
    """block_matmul_bf16 is the bf16-rounded weights times the bf16-rounded activations summed in
    float32: within gamma_K * sum|products| of the float64 product of the rounded operands (no
    final rounding: the sum stays float32). The exact kernel falls outside that bound, so the
    test tells the two apart; 1 to 16 rows cover every tile shape, and 66 output rows a ragged end."""
    n, k = 66, 320
    raw, w = raw_matrix(fmt, n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    xb = np_bf16(x.numpy()).astype(np.float64)
    wb = np_bf16(w).astype(np.float64)
    want = xb @ wb.T
    gamma = k * U32 / (1 - k * U32)
    bound = gamma * (np.abs(xb) @ np.abs(wb).T) + 1e-30
    got = ext.block_matmul_bf16(x, raw, NATIVE_FORMATS[fmt], n).double().numpy()
    assert (np.abs(got - want) <= bound).all()
    exact = ext.block_matmul(x, raw, NATIVE_FORMATS[fmt], n).double().numpy()
    assert (np.abs(exact - want) > bound).mean() > 0.3
    # each row's result does not depend on the rows beside it (a verify pass = single steps)
    assert torch.equal(ext.block_matmul_bf16(x[-1:], raw, NATIVE_FORMATS[fmt], n)[0],
                       torch.from_numpy(got[-1]).float())


def direct_attention(q, k, v, first: int, lo: int, window: int) -> torch.Tensor:
    """Causal attention worked out in float64: q [T, H, D] at positions first.., k and v [L, KVH, D]
    at positions lo.., each query head reading KV head h // (H / KVH), within ``window`` (0: all)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        pos = first + i
        seen = [j for j in range(k.shape[0]) if lo + j <= pos and (window == 0 or lo + j > pos - window)]
        for h in range(q.shape[1]):
            weights = torch.softmax(k[seen, h // group] @ q[i, h] / q.shape[2] ** 0.5, dim=0)
            out[i, h] = weights @ v[seen, h // group]
    return out


@bf16_dot
@pytest.mark.parametrize("n_queries, heads, kv_heads, head_dim, first, lo, window", [
    (37, 6, 2, 64, 0, 0, 0),       # a fresh prompt, not a multiple of the 16-query blocks
    (50, 4, 1, 128, 30, 0, 0),     # after 30 cached positions, head size 128
    (70, 3, 3, 64, 0, 0, 20),      # a sliding window, one KV head a query head
    (40, 2, 1, 64, 45, 26, 20),    # a window after history: keys from the first one it sees
    (1, 2, 1, 64, 0, 0, 0),        # one query
])
def test_prefill_attention_with_bf16_dot_products(n_queries, heads, kv_heads, head_dim, first, lo, window):
    """prefill_attention_bf16 against float64 attention of the bf16-rounded q, k and v: its one
    further rounding is the softmax weights' to bf16 (relative 2^-9 each, and they sum to 1), so
    each output lies within 2^-8 * max|v| of it; a wrong mask or key misses by far more."""
    g = torch.Generator().manual_seed(n_queries)
    n_keys = first + n_queries - lo
    q = torch.randn(n_queries, heads, head_dim, generator=g)
    k = torch.randn(n_keys, kv_heads, head_dim, generator=g)
    v = torch.randn(n_keys, kv_heads, head_dim, generator=g)
    got = ext.prefill_attention_bf16(q, k, v, first, lo, window).double()
    rounded = [t.to(torch.bfloat16) for t in (q, k, v)]
    want = direct_attention(*rounded, first, lo, window)
    assert (got - want).abs().max() <= 2 ** -8 * float(v.abs().max())
    assert (got - direct_attention(q, k, v, first, lo, window)).abs().max() > 0    # it did round


@bf16_dot
@pytest.mark.parametrize("fmt", ["Q4_1", "Q8_0"])
def test_bf16_dot_products_of_no_rows(fmt):
    """Zero activation rows (the vocabulary projection of a prefill chunk whose logits nobody wants)
    give an empty result; the tile switch once ran eight rows of nothing there and wrote past the
    output (a crash of every --dtype bfloat16 prompt longer than one prefill chunk)."""
    raw, _ = raw_matrix(fmt, 66, 320, seed=3)
    out = ext.block_matmul_bf16(torch.empty(0, 320), raw, NATIVE_FORMATS[fmt], 66)
    assert out.shape == (0, 66)


@pytest.mark.skipif(ext is None or ext.bf16_dot_available(), reason="checks the refusal where it does not run")
def test_bf16_dot_products_refused_where_the_cpu_lacks_them():
    raw, _ = raw_matrix("Q4_1", 8, 64, seed=1)
    with pytest.raises(RuntimeError, match="AVX512_BF16"):
        ext.block_matmul_bf16(torch.randn(1, 64), raw, NATIVE_FORMATS["Q4_1"], 8)


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q8_0", "Q5_0"])
def test_blocks_dequantised_straight_to_bf16(fmt):
    """The native bf16 slab (no float32 slab in between) is the gguf package's dequantisation
    rounded to nearest bf16, ties to even, over any row range (equal as numbers: a zero weight of
    Q4_0/Q5_0 may come out +0 where the gguf package gives -0, as the float32 slab does)."""
    n, k = 40, 192
    raw, w = raw_matrix(fmt, n, k, seed=11)
    got = ext.block_dequant_bf16(raw, NATIVE_FORMATS[fmt], n, k, 5, 37)
    assert got.dtype == torch.bfloat16 and got.shape == (32, k)
    want = np_bf16(w[5:37])
    assert np.array_equal(got.float().numpy(), want)
    assert torch.equal(got, ext.block_dequant(raw, NATIVE_FORMATS[fmt], n, k, 5, 37).to(torch.bfloat16))
    assert torch.equal(ext.block_dequant_bf16(raw, NATIVE_FORMATS[fmt], n, k, 0, n).float(),
                       torch.from_numpy(np_bf16(w)))


def test_bf16_rounding_ties_go_to_even():
    """Q8_0 blocks whose weights lie exactly halfway between two bf16 values: d = 1 + 2^-8 (q = 1
    gives a tie that rounds down to the even 1.0) and d = 1 + 3 * 2^-8 (rounds up to 1 + 2^-6)."""
    d = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8], dtype=np.float16)
    q = np.zeros((2, 32), dtype=np.int8)
    q[:, 0], q[:, 1] = 1, -1
    raw = np.concatenate([np.concatenate([d[i:i + 1].view(np.uint8), q[i].view(np.uint8)]) for i in range(2)])
    got = ext.block_dequant_bf16(torch.from_numpy(raw.reshape(1, -1)), NATIVE_FORMATS["Q8_0"], 1, 64, 0, 1).float()
    assert got[0, [0, 1, 32, 33]].tolist() == [1.0, -1.0, 1 + 2.0 ** -6, -(1 + 2.0 ** -6)]


def test_the_mode_takes_bf16_dot_products_in_decode_where_the_cpu_has_them():
    """A bf16 block matrix multiplies more than NATIVE_BLOCK_MAX_ROWS rows with the bf16 GEMM and
    fewer (decode, a speculative verify pass) with the bf16 dot-product kernel where the CPU has
    AVX512_BF16, else with the exact native kernel, bit for bit."""
    from edgellm.quant.base import NATIVE_BLOCK_MAX_ROWS
    from edgellm.quant.bf16 import bf16_slab_matmul, decode_in_bf16
    from edgellm.quant.gguf_weights import GGUFBlockWeight

    n, k = 64, 128
    raw, _ = raw_matrix("Q4_1", n, k, seed=7)
    weight = GGUFBlockWeight(raw, "Q4_1", k)
    weight.bf16_mode = True
    x = torch.randn(NATIVE_BLOCK_MAX_ROWS + 8, k, generator=torch.Generator().manual_seed(1))
    decode = x[:NATIVE_BLOCK_MAX_ROWS]
    kernel = ext.block_matmul_bf16 if decode_in_bf16() else ext.block_matmul
    assert torch.equal(weight.matmul(decode), kernel(decode, raw, NATIVE_FORMATS["Q4_1"], n))
    assert torch.equal(weight.matmul_add(decode, decode[:, :n]), decode[:, :n] + kernel(decode, raw, NATIVE_FORMATS["Q4_1"], n))
    assert torch.equal(weight.matmul(x), bf16_slab_matmul(x, n, weight._step, weight._dequant_slab))
    fused = GGUFBlockWeight.concat([weight, weight])            # fusing q/k/v keeps the mode
    assert fused.bf16_mode


def _tiny(tmp_path, smollm2_path, head_dim: int = 16):
    """A tiny random Q4_1 Llama with heads of 16 (hidden 64, 4 heads), or of 64 (hidden 128, 2
    heads: a head size our bf16 prefill attention kernel takes)."""
    from tiny_model import write_tiny_llama

    shape = {} if head_dim == 16 else dict(hidden=128, n_heads=2, n_kv_heads=1)
    return write_tiny_llama(tmp_path / "tiny.gguf", smollm2_path, matrix_type="Q4_1", seed=2, **shape)


def _prefill_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one prefill pass of ``ids``."""
    from edgellm.kv.cache import KVCache
    from edgellm.layers.attention import AttentionBatch

    n = len(ids)
    cache = KVCache(model.cfg, -(-n // 16), 16, torch.float32)
    batch = AttentionBatch.build([(n, n, slice(0, n))])
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(n), batch, cache, torch.arange(n))


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("bf16_attention", ["0", "1"], ids=["fp32-attention", "bf16-attention"])
def test_prefill_logits_are_no_worse_than_transformers_in_bf16(tmp_path, smollm2_path, monkeypatch, bf16_attention,
                                                               head_dim):
    """On a tiny random Q4_1 model: our bf16 prefill is closer to transformers' float32 logits
    than transformers' own bf16 run of the same file, and further than our exact path; with the
    prefill attention in float32 and in bf16 (the default where the CPU has AMX or AVX512_BF16:
    with head size 64 and AVX512_BF16 without AMX, our own kernel; else PyTorch's)."""
    transformers = pytest.importorskip("transformers")
    from edgellm.loading.load import load_model

    monkeypatch.setenv("EDGELLM_BF16_ATTENTION", bf16_attention)

    path = _tiny(tmp_path, smollm2_path, head_dim)
    ids = list(range(100, 140))        # 40 tokens: a prefill, past the decode kernels' 16 rows
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0].double()
        hf_bf16 = hf.to(torch.bfloat16)(torch.tensor([ids])).logits[0].double()
    model = load_model(str(path), "bfloat16").model
    assert model.prefill_attention_dtype == (torch.bfloat16 if bf16_attention == "1" else torch.float32)
    ours_bf16 = _prefill_logits(model, ids).double()
    ours_exact = _prefill_logits(load_model(str(path), "float32").model, ids).double()
    # mean over 40 x 49152 logits: stable (measured, heads of 16: ours 0.0023 (bf16 attention:
    # 0.0024), transformers bf16 0.0027, exact 1e-7; heads of 64: 0.0029 (0.0029), 0.0033, 2e-7)
    err = {name: float((got - ref).abs().mean()) for name, got in
           (("ours bf16", ours_bf16), ("transformers bf16", hf_bf16), ("ours exact", ours_exact))}
    assert err["ours bf16"] < err["transformers bf16"], err
    assert err["ours exact"] < 0.1 * err["ours bf16"], err


@bf16_dot
def test_our_bf16_attention_kernel_can_be_forced(monkeypatch):
    """EDGELLM_BF16_ATTENTION=ours puts the mode's prefill attention in bf16 on our kernel wherever
    the kernel runs (AMX CPUs default to PyTorch's); head sizes that are not a multiple of 64 never
    take it."""
    from edgellm.layers.attention import native_bf16_attention
    from edgellm.quant.bf16 import prefill_attention_dtype

    monkeypatch.setenv("EDGELLM_BF16_ATTENTION", "ours")
    assert prefill_attention_dtype() == torch.bfloat16
    assert native_bf16_attention(ext, 64) and native_bf16_attention(ext, 128)
    assert not native_bf16_attention(ext, 16) and not native_bf16_attention(None, 64)


def test_bf16_attention_changes_the_prefill_only(tmp_path, smollm2_path, monkeypatch):
    """Forced on, the bf16 prefill attention gives other logits than the float32 one (it runs),
    and the exact default never takes it."""
    from edgellm.loading.load import load_model

    path = _tiny(tmp_path, smollm2_path)
    ids = list(range(100, 140))
    logits = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("EDGELLM_BF16_ATTENTION", flag)
        logits[flag] = _prefill_logits(load_model(str(path), "bfloat16").model, ids)
        assert load_model(str(path), "float32").model.prefill_attention_dtype == torch.float32
    assert not torch.equal(logits["0"], logits["1"])
    assert float((logits["0"] - logits["1"]).abs().max()) < 0.1 * float(logits["0"].abs().max())


@bf16_dot
def test_the_fused_decode_step_takes_bf16_dot_products(tmp_path, smollm2_path, monkeypatch):
    """Where the CPU has AVX512_BF16, the mode's all-blocks decode step multiplies with bf16 dot
    products: equal to the per-op path, whose matrices run the kernel tested above (the same
    arithmetic per matmul; measured equal to float32 rounding), and apart from the exact step.
    EDGELLM_BF16_DECODE=0 brings the exact kernels back."""
    from edgellm.loading.load import load_model
    from tiny_model import decode_step_logits

    path = _tiny(tmp_path, smollm2_path)
    model = load_model(str(path), "bfloat16").model
    assert model.bf16_decode and model.has_fused_decode
    fused = decode_step_logits(model, fused=True)
    per_op = decode_step_logits(model, fused=False)
    exact = decode_step_logits(load_model(str(path), "float32").model, fused=True)
    assert (fused - per_op).abs().max() < 0.02 * (fused - exact).abs().max()
    monkeypatch.setenv("EDGELLM_BF16_DECODE", "0")
    from edgellm.quant import bf16

    bf16.decode_in_bf16.cache_clear()
    try:
        model = load_model(str(path), "bfloat16").model
        assert not model.bf16_decode and model.decode_arithmetic() == 0
        qkv = model.weights.blocks[0].qkv
        x = torch.randn(3, qkv.shape[1])
        assert torch.equal(qkv.matmul(x), ext.block_matmul(x, qkv.raw, qkv.code, qkv.shape[0]))
    finally:
        monkeypatch.delenv("EDGELLM_BF16_DECODE")
        bf16.decode_in_bf16.cache_clear()


def test_refused_combinations_and_the_fallbacks(tmp_path, smollm2_path):
    """bf16 with int8 activations is refused (two fast modes); without the native kernels the
    mode holds the matrices as bf16 and still runs."""
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    path = _tiny(tmp_path, smollm2_path)
    with pytest.raises(InvalidParameterError, match="two different fast modes"):
        LLM(str(path), dtype="bfloat16", activations="int8")
    dense = LLM(str(path), dtype="bfloat16", use_native=False)
    assert dense.loaded.model.weights.blocks[0].qkv.format == "bfloat16"
    c = dense.generate(list(range(100, 130)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(c.token_ids) == 3


def test_greedy_tokens_of_the_real_model(llm, smollm2_path):
    """SmolLM2 Q4_1: the bf16 prefill changes the prompt's logits, yet (measured, not assumed) the
    first 16 greedy tokens of this chat prompt are the exact path's, with decode in bf16 dot
    products too where the CPU has them (measured on Zen 4) and on the exact kernels elsewhere."""
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    bf16 = LLM(str(smollm2_path), dtype="bfloat16", threads=2)
    assert bf16.loaded.model.weights.blocks[0].qkv.format == "Q4_1"      # the blocks, not a bf16 copy
    # every block matrix takes the mode, the fused q/k/v and gate/up included (they once lost it
    # when the loader began fusing straight from the file's mapping)
    blocks = bf16.loaded.model.weights.blocks
    assert all(getattr(b, name).bf16_mode for b in blocks for name in ("qkv", "o", "gate_up", "down"))
    assert bf16.loaded.weight_bytes == llm.loaded.weight_bytes
    ids = llm.encode_prompt("Write a haiku about the sea.", chat=True)
    assert len(ids) > 16
    exact_logits = _prefill_logits(llm.loaded.model, ids)
    bf16_logits = _prefill_logits(bf16.loaded.model, ids)
    assert not torch.equal(exact_logits, bf16_logits)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert bf16.generate(ids, params).token_ids == llm.generate(ids, params).token_ids


def test_a_prompt_longer_than_one_prefill_chunk(llm, smollm2_path):
    """A prompt of PREFILL_CHUNK + 1 tokens runs as two forward passes, the first wanting no logits;
    in the mode it used to crash the process (the vocabulary projection of zero rows). Its greedy
    tokens are checked against the exact path's for the first 4 (measured equal on Zen 4)."""
    from edgellm.llm import LLM, PREFILL_CHUNK
    from edgellm.quality import read_corpus
    from edgellm.sampling import SamplingParams

    bf16 = LLM(str(smollm2_path), dtype="bfloat16", threads=2)
    ids = llm.tokenizer.encode(read_corpus())[:PREFILL_CHUNK + 1]
    assert len(ids) == PREFILL_CHUNK + 1
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = bf16.generate(ids, params)
    assert got.prompt_tokens == PREFILL_CHUNK + 1
    assert got.token_ids == llm.generate(ids, params).token_ids


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, timeout=600,
                          env=os.environ)


def test_the_cli_flag_end_to_end(smollm2_path, capsys):
    """`generate --dtype bfloat16` runs and names the emulation where the CPU has no bf16
    arithmetic; the combinations that make no sense are refused before loading."""
    from edgellm.cli.main import main
    from edgellm.quant.bf16 import cpu_multiplies_bf16

    args = ("generate", "--model", str(smollm2_path), "--prompt", "The capital of France is", "--max-tokens", "4",
            "--threads", "1", "--json")
    proc = _cli(*args, "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"]) == 4
    assert ("emulated" in proc.stderr) == (not cpu_multiplies_bf16())
    assert main([*args, "--dtype", "bfloat16", "--activations", "int8"]) == 2       # in process: no load needed
    assert "two different fast modes" in capsys.readouterr().err
    assert main([*args, "--dtype", "bfloat16", "--weights", "int8"]) == 2
    assert "--weights bfloat16 without --dtype" in capsys.readouterr().err
    assert main(["eval", "perplexity", "--dtype", "bfloat16", "--activations", "int8"]) == 2
    assert "two different fast modes" in capsys.readouterr().err


def test_bench_measures_bf16_as_a_peer():
    from edgellm.bench import harness
    from edgellm.bench.worker import ENGINES

    assert harness.parse_peers("ours-bf16, ours-int8") == ["ours-bf16", "ours-int8"]
    assert harness.parse_peers("bf16") == ["ours-bf16"]
    assert "ours-bf16" in ENGINES
