"""``--activations int8``: activation rows quantised to int8 blocks and integer dot products
(edgellm/kernels/int8_activations.h), against references written here.

The reference quantises x as specified (per 32 values: d = max|x| / 127 in float32, q = round(x / d)
with ties to even), dequantises the weights with the gguf package, and multiplies W . (d q) in
float64. The kernel's integer sums are exact, so the two differ only by the float32 rounding of the
per-block scaling and accumulation; the bound below is worked out from that.
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
from edgellm.kernels.build import cpu_flags

ext = native()
pytestmark = pytest.mark.skipif(ext is None, reason="native kernels unavailable on this machine")

FORMATS = ["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q4_KR", "Q6_KR"]
U = 2.0 ** -24   # float32 unit roundoff
# per format: the largest |integer code| (Q8_0 may hold -128) and where the block's scales lie
CODE_MAX = {"Q4_0": 15, "Q4_1": 15, "Q8_0": 128, "Q5_0": 31, "Q4_KR": 15, "Q6_KR": 32}


def reference_quantize(x: torch.Tensor):
    """(q int8, d float32) of x [M, K], per block of 32, as specified."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    d = blocks.abs().amax(-1) / 127.0                         # float32 division, as the kernel
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round(blocks / safe.unsqueeze(-1))              # torch.round: ties to even
    q = torch.where(d.unsqueeze(-1) == 0, torch.zeros_like(q), q)
    return q.to(torch.int8).view(m, k), d


def raw_matrix(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw blocks of a random [n, k] matrix (K-quants repacked for the kernels, as at load time)
    and its dequantisation by the gguf package (for the repacked ones, of the K-quant bytes they
    were repacked from), float64."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    if fmt in ("Q4_KR", "Q6_KR"):
        from edgellm.quant import gguf_blocks, repack

        kfmt = fmt[:-1]
        kraw = np.ascontiguousarray(gguf_blocks.quantize(w, kfmt)).view(np.uint8).reshape(n, -1)
        ref = quants.dequantize(kraw, GGMLQuantizationType[kfmt]).reshape(n, k)
        return repack.repack(torch.from_numpy(kraw), kfmt, n, k), torch.from_numpy(ref).double()
    raw = np.ascontiguousarray(quants.quantize(w, GGMLQuantizationType[fmt])).view(np.uint8).reshape(n, -1)
    ref = quants.dequantize(raw, GGMLQuantizationType[fmt]).reshape(n, k)
    return torch.from_numpy(raw), torch.from_numpy(ref).double()


def block_scales(fmt: str, raw: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """|d| and |m| per block, float64 [n, k/32], read from the block headers (for the bound only)."""
    b = raw.numpy().reshape(n, k // 32, -1)
    if fmt in ("Q4_KR", "Q6_KR"):   # fp32 d, fp32 m (Q6_KR: two scales d0, d1)
        first = np.abs(b[..., 0:4].copy().view(np.float32)[..., 0].astype(np.float64))
        second = np.abs(b[..., 4:8].copy().view(np.float32)[..., 0].astype(np.float64))
        if fmt == "Q6_KR":
            return torch.from_numpy(np.maximum(first, second)), torch.zeros(n, k // 32, dtype=torch.float64)
        return torch.from_numpy(first), torch.from_numpy(second)
    d = np.abs(b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64))
    m = {"Q4_0": 8 * d, "Q5_0": 16 * d, "Q8_0": 0 * d}.get(fmt)
    if fmt == "Q4_1":
        m = np.abs(b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64))
    return torch.from_numpy(d), torch.from_numpy(m)


def reference_matmul(x: torch.Tensor, fmt: str, raw: torch.Tensor, w: torch.Tensor):
    """(W . x^ in float64, the bound on the kernel's distance from it)."""
    m, k = x.shape
    n = w.shape[0]
    q, d = reference_quantize(x)
    xh = (q.double().view(m, k // 32, 32) * d.double().unsqueeze(-1)).view(m, k)
    dabs, mabs = block_scales(fmt, raw, n, k)
    # Each block adds d_w d_x isum (|.| <= |d_w| CODE_MAX sum|x^|) and m s (|.| <= |m| sum|x^|);
    # every term passes through at most (blocks + 8) float32 roundings (the scale product, the
    # accumulating fma, the 8-lane sum, the offset's products and sums, the final add), plus one
    # for gguf's float32 d q + m of the reference weights.
    xabs = xh.abs().view(m, k // 32, 32).sum(-1)                                   # [m, nb]
    size = xabs @ (dabs * CODE_MAX[fmt] + mabs).T                                  # [m, n]
    bound = (k // 32 + 9) * U * size + U * (xh.abs() @ w.abs().T)
    return xh @ w.T, bound


def test_quantize_matches_the_specification():
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)) * torch.tensor([1e-3, 1.0, 50.0, 1e4, 3.0])[:, None]
    x[2, 32:64] = 0.0                                   # an all-zero block: d = 0, q = 0
    x[3, 0] = -x[3, :32].abs().max() * 2                # the block's max is negative: q = -127
    q, d, s = ext.quantize_q8(x)
    q_ref, d_ref = reference_quantize(x)
    assert torch.equal(q, q_ref)
    assert torch.equal(d, d_ref)
    assert q[3, 0] == -127 and q.abs().max() == 127 and d[2, 1] == 0
    # s = d * sum(q): the offset term's sum, of the quantised values
    assert torch.equal(s, d * q.view(5, -1, 32).sum(-1).float())


# (40, 512): groups of 16 weight rows and a part group (VNNI's row lanes, int8_row_lanes.inc);
# (37, 96): 3 blocks a row, so Q8_0's odd block and a row of 102 bytes, not whole dwords
@pytest.mark.parametrize("n, k", [(40, 512), (37, 96)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_matmul_equals_the_reference_for_1_to_17_rows(fmt, n, k):
    k = max(k, 256) if fmt.endswith("_KR") else k   # K-quant rows are whole 256-value super-blocks
    raw, w = raw_matrix(fmt, n, k, seed=len(fmt) + 3)
    code = NATIVE_FORMATS[fmt]
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.1, 4.0, 17)[:, None]
    want, bound = reference_matmul(x, fmt, raw, w)
    exact = ext.block_matmul(x, raw, code, n).double()
    for rows in range(1, 18):
        got = ext.block_matmul_q8(x[:rows], raw, code, n).double()
        err = (got - want[:rows]).abs()
        assert (err <= bound[:rows]).all(), f"{rows} rows: worst {(err / bound[:rows]).max():.2f} x the bound"
    # the bound is tight enough to tell the modes apart: the exact fp32 kernel (x not rounded) falls
    # outside it almost everywhere (measured: 97-99% of entries, by a median 20-58x the bound)
    assert ((exact - want).abs() > bound).float().mean() > 0.9


@pytest.mark.parametrize("n, k", [(100, 768), (37, 96)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_int8_rows_are_bit_identical_alone_and_in_a_batch(fmt, n, k):
    """Also where one activation row takes another route than several (VNNI's Q8_0, Q6_KR, Q4_0,
    Q5_0: a transpose-and-add tree for one row, turned rows for more; the same bits)."""
    k = max(k, 256) if fmt.endswith("_KR") else k
    raw, _ = raw_matrix(fmt, n, k, seed=7)
    code = NATIVE_FORMATS[fmt]
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(2))
    alone = torch.cat([ext.block_matmul_q8(x[i:i + 1], raw, code, n) for i in range(17)])
    for m in (2, 3, 5, 8, 17):
        assert torch.equal(ext.block_matmul_q8(x[:m], raw, code, n), alone[:m])
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ext.block_matmul_q8(x[perm], raw, code, n), alone[perm])


@pytest.mark.parametrize("variant", ["avx512", "avx2", "portable"])
def test_every_runnable_variant_equals_the_reference(variant):
    """The avx2 (maddubs) and portable (plain C++) builds here; avx512 (and its VNNI copy) where
    the CPU runs it -- on this project's AVX2-only machine it is compiled but skipped."""
    from edgellm.kernels import build as kbuild
    from edgellm.kernels import load_variant

    why = kbuild.missing_for(variant)
    if why is not None:
        pytest.skip(why)
    if not kbuild.module_path(variant).exists() and not kbuild.have_compiler():
        pytest.skip(f"the {variant} kernels are not built and there is no compiler")
    mod = load_variant(variant)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(6))
    q, d, _ = mod.quantize_q8(x)
    assert torch.equal(q, reference_quantize(x)[0]) and torch.equal(d, reference_quantize(x)[1])
    for fmt in FORMATS:
        raw, w = raw_matrix(fmt, 24, 256, seed=9)
        want, bound = reference_matmul(x, fmt, raw, w)
        got = mod.block_matmul_q8(x, raw, NATIVE_FORMATS[fmt], 24).double()
        assert ((got - want).abs() <= bound).all(), (variant, fmt)


def test_the_dot_product_in_use_is_named():
    assert ext.int8_dot_product() in ("avx2", "vnni", "portable")


def _decode_step(model, activations: str, fused: bool):
    """One decode step's logits (tiny_model.decode_step_logits) with ``activations``."""
    from edgellm.quant.activations import set_activations
    from tiny_model import decode_step_logits

    set_activations(model, activations)
    return decode_step_logits(model, fused)


def test_the_fused_decode_step_takes_int8_activations(tmp_path, smollm2_path):
    """The all-blocks native step with int8 activations against the per-op path with them (which
    runs the matmul tested above): close, while both are far from the exact path.

    A tiny random model, not the real one: there an activation that the two paths compute one
    float32 ulp apart can round to the neighbouring int8 value, and SmolLM2's outlier channels
    (blocks whose scale d is large) turn one such flip into a jump as large as half the whole
    int8 error (measured: perturbing h by 1e-7 moved one layer's output by 0.09, the int8 error
    being 0.17), so the two paths agree only statistically there."""
    from edgellm.loading.load import load_model
    from edgellm.quant.activations import set_activations
    from tiny_model import write_tiny_llama

    model = load_model(str(write_tiny_llama(tmp_path / "tiny.gguf", smollm2_path, seed=5))).model
    assert model.has_fused_decode
    exact = _decode_step(model, "fp32", fused=True)
    fused = _decode_step(model, "int8", fused=True)
    per_op = _decode_step(model, "int8", fused=False)
    assert (fused - per_op).abs().max() < 0.05 * (fused - exact).abs().max()
    # and set back to fp32, the model is exact again: the flag reaches the weights and the fused step
    set_activations(model, "fp32")
    assert torch.equal(_decode_step(model, "fp32", fused=True), exact)


@pytest.mark.parametrize("fmt", ["Q4_1", "Q5_0"])
def test_prefill_rounds_activations_like_the_kernel(fmt):
    """Prefill (more rows than a decode step) computes the same W . x^ as the decode kernel: with
    the integer kernel itself where it takes 16 weight rows a vector (VNNI, every block format),
    else by multiplying the dequantised int8 blocks with BLAS (within float32 summation)."""
    from edgellm.quant.activations import dequantized_q8
    from edgellm.quant.gguf_weights import GGUFBlockWeight

    n, k = 64, 256
    raw, ref = raw_matrix(fmt, n, k, seed=11)
    w = GGUFBlockWeight(raw, fmt, k)
    w.int8_activations = True
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(4))
    want, bound = reference_matmul(x, fmt, raw, ref)
    q, d = reference_quantize(x)
    assert torch.equal(dequantized_q8(x), (q.float().view(40, -1, 32) * d.unsqueeze(-1)).view(40, k))
    got = w.matmul(x)
    assert ((got.double() - want).abs() <= bound + 1e-5 * want.abs()).all()
    kernel = ext.block_matmul_q8(x, raw, NATIVE_FORMATS[fmt], n)
    row_lanes = ext.int8_row_lanes(NATIVE_FORMATS[fmt])
    assert row_lanes == (ext.int8_dot_product() == "vnni" and "avx512bw" in cpu_flags())
    assert torch.equal(got, kernel) == row_lanes   # BLAS sums in another order: not the same bits
    assert torch.equal(w.matmul(x[:3]), ext.block_matmul_q8(x[:3], raw, NATIVE_FORMATS[fmt], n))


def test_models_it_cannot_run_are_refused(tmp_path, smollm2_path):
    from edgellm.llm import LLM
    from tiny_model import write_tiny_llama

    path = write_tiny_llama(tmp_path / "q5_1.gguf", smollm2_path, matrix_type="Q5_1")   # no kernel: float32 at load
    with pytest.raises(InvalidParameterError, match="block 0 has a float32 matrix"):
        LLM(str(path), activations="int8")
    with pytest.raises(InvalidParameterError, match="unknown activation precision 'int4'"):
        LLM(str(path), activations="int4")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_the_cli_flag_end_to_end(smollm2_path):
    """`generate --activations int8` on the real model completes and its tokens are those of the
    int8 kernels: the same as LLM(activations="int8"), whose log-probabilities are not the exact
    path's (its tokens may or may not be); bad values and EDGELLM_NATIVE=0 are refused with a clear
    message."""
    from edgellm.llm import LLM
    from edgellm.sampling import SamplingParams

    args = ("generate", "--model", str(smollm2_path), "--prompt", "The capital of France is", "--max-tokens", "24",
            "--threads", "1", "--json")
    proc = _cli(*args, "--activations", "int8")
    assert proc.returncode == 0, proc.stderr
    cli_ids = json.loads(proc.stdout.strip().splitlines()[-1])["token_ids"]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=True)
    llm = LLM(str(smollm2_path), threads=1, activations="int8")
    int8 = llm.generate("The capital of France is", params)
    exact = LLM(loaded=llm.loaded, activations="fp32").generate("The capital of France is", params)
    assert cli_ids == int8.token_ids
    # the int8 arithmetic moves every logit; the first token's log-probability (same prompt, same
    # context) shows it whether or not the greedy tokens part later
    assert int8.logprobs[0] != exact.logprobs[0]

    bad = _cli(*args, "--activations", "int4")
    assert bad.returncode == 2 and "invalid choice: 'int4'" in bad.stderr and "Traceback" not in bad.stderr
    off = _cli(*args, "--activations", "int8", env={"EDGELLM_NATIVE": "0"})
    assert off.returncode == 2 and "Traceback" not in off.stderr
    assert "--activations int8 needs the native kernels" in off.stderr and "EDGELLM_NATIVE" in off.stderr


def test_bench_measures_int8_as_a_peer():
    from edgellm.bench import harness
    from edgellm.bench.worker import ENGINES

    assert harness.parse_peers("ours-int8, llama.cpp") == ["ours-int8", "llama.cpp"]
    assert harness.parse_peers("int8") == ["ours-int8"]
    assert "ours-int8" in ENGINES
