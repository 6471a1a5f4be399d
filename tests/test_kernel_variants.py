"""Every build of the native kernels (avx512, avx2, portable) against the same references.

The references are independent of the kernels: the gguf package's dequantisation (random
matrices it quantised itself, and the default model's real weights), a float64 matmul of that,
and edgellm's pure-PyTorch decode path. A variant this CPU cannot run is skipped with the
reason; asking for it by EDGELLM_KERNEL is an error that says what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from edgellm.kernels import NATIVE_FORMATS, KernelVariantError, load_variant, selected_variant
from edgellm.kernels import build as kbuild

ROOT = Path(__file__).resolve().parent.parent
EXACT_PRODUCTS = ["Q4_0", "Q4_1", "Q8_0", "Q5_0"]   # d * q is exact in float32: dequantisation is bit-exact
ALL_FORMATS = [*EXACT_PRODUCTS, "Q4_KR", "Q6_KR"]


def _module(variant: str):
    why = kbuild.missing_for(variant)
    if why is not None:
        pytest.skip(why)
    if not kbuild.module_path(variant).exists() and not kbuild.have_compiler():
        pytest.skip(f"the {variant} kernels are not built and there is no compiler")
    return load_variant(variant)


def _random(fmt: str, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw blocks of a random [n, k] matrix in the kernels' format ``fmt``, and the reference
    dequantisation of the same weights (gguf's for GGUF types; for the repacked K-quants, gguf's
    dequantisation of the K-quant bytes they were repacked from)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 2.0, (n, 1))).astype(np.float32)
    if fmt.endswith("KR"):
        from edgellm.quant import gguf_blocks, repack

        kfmt = fmt[:-1]
        kraw = np.ascontiguousarray(gguf_blocks.quantize(w, kfmt)).view(np.uint8).reshape(n, -1)
        ref = quants.dequantize(kraw, GGMLQuantizationType[kfmt]).reshape(n, k)
        return repack.repack(torch.from_numpy(kraw), kfmt, n, k), torch.from_numpy(ref)
    raw = np.ascontiguousarray(quants.quantize(w, GGMLQuantizationType[fmt])).view(np.uint8).reshape(n, -1)
    ref = quants.dequantize(raw, GGMLQuantizationType[fmt]).reshape(n, k)
    return torch.from_numpy(raw), torch.from_numpy(ref)


@pytest.mark.parametrize("variant", kbuild.PREFERENCE)
@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_variant_matmul_and_dequantisation(variant, fmt):
    ext = _module(variant)
    n, k = 72, 512
    raw, ref = _random(fmt, n, k, seed=len(fmt))
    code = NATIVE_FORMATS[fmt]
    deq = ext.block_dequant(raw, code, n, k, 0, n)
    if fmt in EXACT_PRODUCTS or variant != "portable":
        assert torch.equal(deq, ref)
    else:   # portable: d * q + m in two roundings where the product is inexact (K-quant scales)
        assert torch.allclose(deq, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    for rows in (1, 4, 9):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        got = ext.block_matmul(x, raw, code, n)
        expect = x.double() @ ref.double().T
        assert torch.allclose(got.double(), expect, atol=1e-4, rtol=1e-4), (got.double() - expect).abs().max()


@pytest.mark.parametrize("variant", kbuild.PREFERENCE)
def test_variant_on_the_default_models_real_weights(variant, smollm2_path):
    from edgellm.loading.gguf import read_gguf

    ext = _module(variant)
    gf = read_gguf(smollm2_path)
    for name in ("blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_up.weight"):
        t = gf.tensors[name]
        n, k = t.shape
        raw = torch.from_numpy(t.copy_bytes()).view(n, -1)
        ref = torch.from_numpy(quants.dequantize(t.data.reshape(n, -1), GGMLQuantizationType[t.ggml_type])
                               .reshape(n, k))
        assert torch.equal(ext.block_dequant(raw, NATIVE_FORMATS[t.ggml_type], n, k, 0, n), ref), name
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(5))
        got = ext.block_matmul(x, raw, NATIVE_FORMATS[t.ggml_type], n)
        assert torch.allclose(got.double(), x.double() @ ref.double().T, atol=2e-4, rtol=1e-4), name


@pytest.mark.parametrize("variant", kbuild.PREFERENCE)
def test_built_module_keeps_its_prefetches(variant):
    """The matmul and attention loops ask for weights and KV rows ahead of use. GCC 12 once deleted
    every such request without a word (a helper whose only effect is a prefetch counted as having no
    side effects), so the compiled module itself is checked for the instructions."""
    if not kbuild.is_x86() or shutil.which("objdump") is None:
        pytest.skip("needs an x86 build and objdump")
    _module(variant)
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(kbuild.module_path(variant))],
                             capture_output=True, text=True, check=True).stdout
    assert listing.count("prefetcht0") >= 4, f"the {variant} build has no prefetches left"


@pytest.mark.parametrize("variant", [v for v in kbuild.PREFERENCE if v != "avx2"])
def test_variant_against_avx2_bits(variant):
    """AVX-512 runs AVX2's lane operations, two activation rows a 16-float vector past a few rows
    (tile_pairs): the same bits at every row count, odd and even, with one slice of the row or
    several. The portable build rounds unfused multiply-adds differently: within float32 rounding
    of AVX2's results."""
    ext, avx2 = _module(variant), _module("avx2")
    for fmt in ALL_FORMATS:
        for n, k in ((40, 768), (24, 1536)):
            raw, _ = _random(fmt, n, k, seed=11)
            for rows in (1, 2, 5, 6, 9, 16, 17, 33):
                x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
                code = NATIVE_FORMATS[fmt]
                got, want = ext.block_matmul(x, raw, code, n), avx2.block_matmul(x, raw, code, n)
                if variant == "avx512":
                    assert torch.equal(got, want), (fmt, k, rows)
                else:
                    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (fmt, k, rows)


def test_paired_rows_switch_keeps_the_bits():
    """The avx512 build's two-rows-a-vector path on and off: the same results (it is a speed choice
    per CPU); builds without it report it off."""
    from edgellm.kernels import paired_rows_wanted

    for variant in kbuild.PREFERENCE:
        if kbuild.missing_for(variant) is not None:
            continue
        ext = _module(variant)
        raw, _ = _random("Q4_1", 24, 1536, seed=3)
        x = torch.randn(9, 1536, generator=torch.Generator().manual_seed(9))   # paired from 8 rows on
        try:
            on = ext.set_paired_rows(True)
            assert on == (variant == "avx512"), variant
            with_pairs = ext.block_matmul(x, raw, NATIVE_FORMATS["Q4_1"], 24)
            assert ext.set_paired_rows(False) is False
            assert torch.equal(ext.block_matmul(x, raw, NATIVE_FORMATS["Q4_1"], 24), with_pairs), variant
        finally:   # as native() leaves it (the module is shared with the engine's)
            ext.set_paired_rows(paired_rows_wanted())


@pytest.mark.parametrize("env, vendor, want", [
    ("", "GenuineIntel", True), ("", "AuthenticAMD", False), ("", "", False),
    ("1", "AuthenticAMD", True), ("0", "GenuineIntel", False)])
def test_paired_rows_choice(monkeypatch, env, vendor, want):
    from edgellm.kernels import paired_rows_wanted

    monkeypatch.setenv("EDGELLM_PAIRED_ROWS", env)
    monkeypatch.setattr(kbuild, "cpu_vendor", lambda: vendor)
    assert paired_rows_wanted() is want


def test_paired_rows_bad_value_says_what_to_set(monkeypatch):
    from edgellm.errors import InvalidParameterError
    from edgellm.kernels import paired_rows_wanted

    monkeypatch.setenv("EDGELLM_PAIRED_ROWS", "yes")
    with pytest.raises(InvalidParameterError, match="not 0 or 1"):
        paired_rows_wanted()


def _generate(env_extra: dict[str, str], model: Path, prompt: str = "The capital of France is") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    out = subprocess.run([sys.executable, "-m", "edgellm", "generate", "--model", str(model), "--prompt",
                          prompt, "--max-tokens", "8", "--temperature", "0", "--json",
                          "--logprobs", "0"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_avx512_decode_steps_equal_avx2_bits(smollm2_path):
    """The whole fused decode step on the avx512 build gives the avx2 build's logits bit for bit,
    over a prompt long enough for two position ranges (their attention reads each key and value
    row once for the three query heads of a KV head, each build with its own register budget)."""
    _module("avx512")
    _module("avx2")
    prompt = Path("/usr/share/common-licenses/GPL-3").read_text()[:1400]
    got = _generate({"EDGELLM_KERNEL": "avx512"}, smollm2_path, prompt)
    want = _generate({"EDGELLM_KERNEL": "avx2"}, smollm2_path, prompt)
    assert got["prompt_tokens"] > 256
    assert got["token_ids"] == want["token_ids"]
    assert [t["logprob"] for t in got["logprobs"]] == [t["logprob"] for t in want["logprobs"]]


@pytest.mark.slow   # two model loads in subprocesses, one of them on the slow PyTorch path: ~40 s
@pytest.mark.parametrize("variant", ["portable"])
def test_variant_decodes_as_the_pytorch_path(variant, smollm2_path):
    """The whole fused decode step (attention, norms, RoPE, float16 conversions) on a variant other
    than the default, against EDGELLM_NATIVE=0 (dequantise, then PyTorch)."""
    _module(variant)
    got = _generate({"EDGELLM_KERNEL": variant}, smollm2_path)
    want = _generate({"EDGELLM_NATIVE": "0"}, smollm2_path)
    assert got["token_ids"] == want["token_ids"]
    lp_got = [t["logprob"] for t in got["logprobs"]]
    lp_want = [t["logprob"] for t in want["logprobs"]]
    assert np.allclose(lp_got, lp_want, atol=2e-3), (lp_got, lp_want)


# ---- choosing a variant ------------------------------------------------------------------------

def test_the_default_is_the_best_variant_the_cpu_runs(monkeypatch):
    monkeypatch.delenv("EDGELLM_KERNEL", raising=False)
    assert selected_variant() == kbuild.runnable_variants()[0]
    assert "portable" in kbuild.runnable_variants()


@pytest.mark.parametrize("flags, best", [
    ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx512"),
    ({"avx2", "fma", "f16c", "avx512f"}, "avx2"),     # AVX-512 without BW/VL/DQ (Knights Landing)
    ({"sse4_2", "avx"}, "portable"),
])
def test_choice_follows_the_cpu_flags(monkeypatch, flags, best):
    monkeypatch.delenv("EDGELLM_KERNEL", raising=False)
    monkeypatch.setattr(kbuild, "is_x86", lambda: True)
    monkeypatch.setattr(kbuild, "cpu_flags", lambda: frozenset(flags))
    assert selected_variant() == best


def test_asking_for_a_variant_the_cpu_lacks_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(kbuild, "is_x86", lambda: True)
    monkeypatch.setattr(kbuild, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv("EDGELLM_KERNEL", "avx512")
    with pytest.raises(KernelVariantError, match=r"lacks avx512bw, avx512dq, avx512f, avx512vl") as err:
        selected_variant()
    assert "avx2, portable" in err.value.fix
    monkeypatch.setenv("EDGELLM_KERNEL", "sse9")
    with pytest.raises(KernelVariantError, match="not a kernel variant"):
        selected_variant()


def test_the_command_line_refuses_an_unrunnable_variant(smollm2_path):
    lacking = [v for v in kbuild.PREFERENCE if kbuild.missing_for(v) is not None]
    if not lacking:
        pytest.skip("this CPU runs every variant")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGELLM_KERNEL": lacking[0]}
    out = subprocess.run([sys.executable, "-m", "edgellm", "generate", "--model", str(smollm2_path), "--prompt",
                          "hi", "--max-tokens", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 2
    assert f"EDGELLM_KERNEL={lacking[0]} asks for kernels this machine cannot run" in out.stderr
    assert "Traceback" not in out.stderr
