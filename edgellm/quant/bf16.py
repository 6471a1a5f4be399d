"""bf16 products for prefill (``--dtype bfloat16`` on GGUF block weights): the opt-in fast mode.

A prefill matmul of the mode rounds its activations and its dequantised weight slab to bfloat16,
multiplies them with float32 accumulation, and rounds the product to bfloat16 -- what a bf16 GEMM
(oneDNN through ``F.linear`` on bf16 tensors) computes. Where the CPU multiplies bf16 natively
(AVX512_BF16 or AMX, :func:`cpu_multiplies_bf16`) that GEMM runs; elsewhere its bf16 path is
emulated by PyTorch and ~3x slower than the float32 sgemm (measured on this project's AVX2 EPYC:
docs/fast-modes.md), so the same numbers are made by rounding both operands to bf16 and
multiplying them as float32 (the product of two bf16 values is exact in float32, and the
accumulation is float32 either way). The two differ only in summation order: same quality,
float32 speed.

Decode (at most ``NATIVE_BLOCK_MAX_ROWS`` rows) stays on the native block kernels, with bf16 dot
products where the CPU has AVX512_BF16 (:func:`decode_in_bf16`): each weight dequantised and
rounded to bf16 in registers, the activations rounded to bf16, float32 sums; elsewhere the exact
kernels. Norms and the KV cache stay float32 (``--kv-dtype`` sets the cache); prefill attention
runs in bf16 where the CPU has AMX or AVX512_BF16 (:func:`prefill_attention_dtype`), else float32.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache
from typing import Callable

import torch

from edgellm.kernels import native
from edgellm.kernels.build import cpu_flags
from edgellm.quant.base import prefill_dtype, slab_matmul


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU reports AVX512_BF16 or AMX-BF16 (/proc/cpuinfo), where oneDNN's bf16 GEMM
    runs at up to twice the float32 rate (AMX: far more)."""
    return prefill_dtype() == torch.bfloat16


@lru_cache(maxsize=1)
def decode_in_bf16() -> bool:
    """Whether the mode's decode (at most NATIVE_BLOCK_MAX_ROWS rows: a decode step, a speculative
    verify pass) multiplies with bf16 dot products: where the avx512 kernels run on a CPU with
    AVX512_BF16 (vdpbf16ps, edgellm/kernels/bf16_decode.h). Elsewhere decode runs the exact
    kernels (bf16 would have to be emulated there, slower than exact). EDGELLM_BF16_DECODE=0 keeps
    the exact kernels anywhere (to measure the difference)."""
    ext = native()
    if os.environ.get("EDGELLM_BF16_DECODE", "") == "0" or ext is None:
        return False
    return bool(ext.bf16_dot_available())


def prefill_attention_dtype() -> torch.dtype:
    """The dtype of the mode's prefill attention: bfloat16 where the CPU multiplies bf16 fast,
    else float32. With AMX, PyTorch's flash kernel multiplies bf16 tiles; with AVX512_BF16 alone
    (Zen 4) that kernel was no faster on bf16 inputs (153 against 155 ms for SmolLM2's 30 layers
    at 512 tokens, 2 threads), so there our own kernel runs (vdpbf16ps, edgellm/kernels/
    bf16_attention.h; edgellm.layers.attention.native_bf16_attention). EDGELLM_BF16_ATTENTION=1
    or 0 decides instead (to measure either way on any CPU); ``ours``: bf16 on our kernel wherever
    it runs, AMX CPUs included."""
    forced = os.environ.get("EDGELLM_BF16_ATTENTION", "")
    if forced in ("0", "1", "ours"):
        return torch.float32 if forced == "0" else torch.bfloat16
    ext = native()
    fast = "amx_bf16" in cpu_flags() or (ext is not None and ext.bf16_dot_available())
    return torch.bfloat16 if fast else torch.float32


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """t rounded to the nearest bfloat16 (ties to even), returned as float32."""
    return t.to(torch.bfloat16).float()


def bf16_slab_matmul(x: torch.Tensor, n: int, step: int, slab: Callable[[int, int], torch.Tensor],
                     slab_bf16: Callable[[int, int], torch.Tensor] | None = None,
                     native_bf16: bool | None = None) -> torch.Tensor:
    """``x @ W.T`` with bf16 operands and a bf16-rounded product, as float32 [M, n]; ``W``'s rows
    r0..r1 come as float32 from ``slab(r0, r1)``, ``step`` rows at a time, or already rounded to
    bfloat16 from ``slab_bf16`` where the weight can (the native kernels: one pass over the
    blocks instead of a float32 slab and a rounding pass, which took a third of the bf16 GEMM's
    gain on a Xeon, docs/fast-modes.md). ``native_bf16``: run the bf16 GEMM (True) or its
    float32 emulation (False); default: what this CPU is fast at."""
    if cpu_multiplies_bf16() if native_bf16 is None else native_bf16:
        if slab_bf16 is None:
            slab_bf16 = lambda r0, r1: slab(r0, r1).to(torch.bfloat16)  # noqa: E731
        return slab_matmul(x.to(torch.bfloat16), n, 2 * step, slab_bf16)
    y = slab_matmul(round_bf16(x), n, step, lambda r0, r1: round_bf16(slab(r0, r1)))
    return round_bf16(y)


def warn_if_emulated() -> None:
    """One notice where the mode cannot be faster than float32 (no bf16 arithmetic in the CPU)."""
    if not cpu_multiplies_bf16():
        warnings.warn("--dtype bfloat16: this CPU has no AVX512_BF16 or AMX, so its bf16 products are emulated "
                      "with float32 arithmetic (same results, no faster than the exact default)", stacklevel=3)
