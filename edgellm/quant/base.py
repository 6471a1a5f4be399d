"""What every weight storage format shares: the ``Weight`` interface, the thresholds that pick a
decode kernel or dequantised slabs + BLAS, and the one slab loop.

A ``Weight`` is an [N, K] matrix (N outputs, K inputs) that can multiply activations
(``matmul``: [M, K] -> [M, N]), produce rows as floats (``rows``, used for embedding look-ups),
and report the bytes it occupies. Decode is bound by the bytes of weights read per token, so
keeping weights in their quantised form in memory is what makes it fast; the model code calls
only this interface and never asks how a matrix is stored.

Formats live in their own modules (:mod:`.dense`, :mod:`.gguf_weights`, :mod:`.int8`,
:mod:`.int4`, :mod:`.fp8`, :mod:`.ternary`) and register themselves with :mod:`.registry`.
This module imports none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

# Inputs with at most this many rows (decode) take the format's own kernel, which reads the packed
# weights once; more rows (prefill) take dequantised slabs + BLAS sgemm, which wins there.
# Measured on the SmolLM2 shapes: README, "Where the time goes", and docs/precision.md.
DECODE_MAX_ROWS = 8
# The native GGUF block kernel (GGUFBlockWeight) keeps up with dequantise + sgemm for longer: it
# shares each unpacked block among up to 8 rows and reads the activations in L1-sized column
# slices (edgellm/kernels/gguf_cpu.cpp, matmul_many). Measured alone, one thread: the 49152 x 576
# Q8_0 vocabulary projection at 16 rows 59 ms against 119 (the sgemm path dequantises 113 MB);
# SmolLM2's Q4_1 gate/up and down at 16 rows 1.1 and 0.54 ms against 1.6 and 0.72; at 24 rows the
# down projection is faster with sgemm. A speculative verify pass of up to 16 rows then also takes
# the same kernel as a one-row step, so its logits are those of plain decoding bit for bit.
NATIVE_BLOCK_MAX_ROWS = 16
# Float32 bytes of one dequantised slab of a native GGUF block matrix (GGUFBlockWeight): bounds
# the transient copy. 8 MiB holds SmolLM2's largest block matrix (gate/up, 3072 x 576) whole;
# Qwen2.5-0.5B's (9728 x 896) goes in five slabs, which cut its 512-token prefill peak by 20 MB
# with SmolLM2 unchanged (commit 5849da9).
BLOCK_SLAB_BYTES = 8 << 20
# At least this many rows per slab of a native block matrix, however wide its rows.
BLOCK_SLAB_MIN_ROWS = 64
# Bytes of one dequantised slab of the other packed formats (int8, int4, fp8, ternary, GGUF types
# without a kernel): small enough to stay in L2, large enough to amortise the calls. They were
# tuned apart from the native blocks; one budget for both would need re-measuring.
SLAB_BYTES = 2 << 20
# Rows converted at a time at load (K-quant repacking, Q5_0 -> Q8_0): bounds the unpacked
# temporaries of a large matrix (an embedding): Qwen's load peak fell from 1636 to 1029 MB.
CONVERT_ROWS = 2048


@lru_cache(maxsize=1)
def prefill_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: 2x the fp32 GEMM
    rate, measured), else float32 (bf16 GEMM is emulated and slower there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    line = next((ln for ln in flags.splitlines() if ln.startswith("flags")), "")
    have = set(line.split())
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & have else torch.float32


def slab_rows(k: int, element_bytes: int = 2, align: int = 64, budget: int = SLAB_BYTES,
              minimum: int | None = None) -> int:
    """Rows of width ``k`` per slab: ``budget`` bytes of ``element_bytes`` elements, at least
    ``minimum`` (default ``align``), rounded down to a multiple of ``align`` (a kernel layout's
    row block, so a slab never splits one)."""
    rows = max(align if minimum is None else minimum, budget // max(1, k * element_bytes))
    return rows - rows % align


def slab_matmul(x: torch.Tensor, n: int, step: int, slab: Callable[[int, int], torch.Tensor],
                out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` as float32 [M, n], ``W`` produced ``step`` rows at a time by ``slab(r0, r1)``
    (rows r0..r1 in ``x``'s dtype) and multiplied by BLAS; ``out_scale`` [n], if given,
    multiplies the output's columns (formats whose slabs leave out a per-row scale).

    The one dequantise-then-BLAS loop of every format: prefill's hot path. A matrix that fits
    one slab makes no output buffer; otherwise each slab's product is written in place.
    """
    if n <= step:
        y = F.linear(x, slab(0, n)).float()
    else:
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            y[:, r0:r1] = F.linear(x, slab(r0, r1))
    return y if out_scale is None else y.mul_(out_scale)


class Weight(ABC):
    """An [N, K] matrix in some storage format."""

    shape: tuple[int, int]

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]."""

    def matmul_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x @ W.T (formats with a fused kernel override this)."""
        return residual + self.matmul(x)

    @abstractmethod
    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` as float32: [len(index), K]."""

    def dequantize(self) -> torch.Tensor:  # -> [N, K] float32
        return self.rows(torch.arange(self.shape[0]))

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes the matrix occupies in memory."""

    @property
    @abstractmethod
    def format(self) -> str:
        """Storage format name (e.g. Q4_1, float32)."""

    def parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(params, tensors) to save it in an edgellm file; the registry's ``load`` of
        ``params["format"]`` rebuilds it. A format that does not say stores float32."""
        return {"format": "float32", "shape": list_shape(self)}, {"weight": self.dequantize()}

    @classmethod
    def concat(cls, weights: list["Weight"]) -> "Weight | None":
        """One matrix of ``weights`` (all of this class and width) stacked by rows; None when the
        format cannot (the default)."""
        return None


def list_shape(w: Weight) -> list[int]:
    return [int(s) for s in w.shape]


def concat_rows(weights: list[Weight]) -> Weight | None:
    """Stack matrices that share K and format into one (fused q/k/v, gate/up); None if they can't."""
    first = weights[0]
    if any(w.shape[1] != first.shape[1] or type(w) is not type(first) for w in weights):
        return None
    return type(first).concat(weights)


class QuantizedWeight(Weight):
    """An [N, K] matrix in a packed format with a decode kernel and a slab-dequantise prefill path.

    Subclasses implement ``decode(x)`` ([M <= DECODE_MAX_ROWS, K] float32 -> [M, N] float32),
    ``dequant_rows(r0, r1, dtype)`` and ``rows(index)``, and hold their packed form in
    ``self.packed`` (its ``params()`` and ``tensors()`` are what a file stores). ``kind`` is the
    registry's name of the format.
    """

    shape: tuple[int, int]
    slab_align: int = 64
    format_name: str = "?"
    kind: str = "?"

    def decode(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[0] <= DECODE_MAX_ROWS:
            return self.decode(x)
        return self.prefill(x, prefill_dtype())

    def prefill(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x @ W.T through slabs dequantised to ``dtype`` and BLAS (float32 out)."""
        step = slab_rows(self.shape[1], torch.empty((), dtype=dtype).element_size(), self.slab_align)
        return slab_matmul(x.to(dtype), self.shape[0], step, lambda r0, r1: self.dequant_rows(r0, r1, dtype))

    def dequantize(self) -> torch.Tensor:
        return self.dequant_rows(0, self.shape[0], torch.float32)

    @property
    def format(self) -> str:
        return self.format_name

    def parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        p = self.packed
        return {"format": self.kind, "shape": list_shape(self), **p.params()}, p.tensors()
