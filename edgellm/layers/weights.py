"""Weight storage formats behind one interface, so a linear layer needs not know how bits are kept.

A ``Weight`` is an [N, K] matrix (N outputs, K inputs) that can multiply activations
(``matmul``: [M, K] -> [M, N]), produce rows as floats (``rows``, used for embedding look-ups),
and report the bytes it occupies. Decode is bound by the bytes of weights read per token, so
keeping weights in their quantised form in memory is what makes it fast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from edgellm.kernels import NATIVE_FORMATS, native

# Above this many activation rows (prefill), dequantising a slab of rows and calling the BLAS
# sgemm beats the row-at-a-time native kernel; below it (decode), the native kernel reads each
# weight once and wins. Measured on the SmolLM2 shapes: see README, "Where the time goes".
NATIVE_MAX_ROWS = 8
# Float32 bytes dequantised at a time on the sgemm path: bounds the transient copy. 8 MiB holds
# SmolLM2's largest block matrix (gate/up, 3072 x 576) whole; Qwen2.5-0.5B's (9728 x 896) goes in
# five slabs, which kept its 512-token prefill inside the memory budget.
DEQUANT_SLAB_BYTES = 8 << 20


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


class DenseWeight(Weight):
    """A plain float matrix (fp32, bf16 or fp16); computes in the weight's own dtype."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.contiguous()
        self.shape = tuple(tensor.shape)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.tensor.dtype), self.tensor).to(x.dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.tensor.index_select(0, index).float()

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def format(self) -> str:
        return str(self.tensor.dtype).removeprefix("torch.")


class GGUFBlockWeight(Weight):
    """Raw GGUF blocks (Q4_0, Q4_1, Q8_0) read directly by the native kernels.

    ``raw`` is a uint8 tensor [N, bytes_per_row]: each row holds K/32 blocks, so rows can be
    permuted, sliced and concatenated (fusing q/k/v) without touching the bits.
    """

    def __init__(self, raw: torch.Tensor, ggml_type: str, n_cols: int):
        if ggml_type not in NATIVE_FORMATS:
            raise ValueError(f"no native kernel for {ggml_type}")
        self.raw = raw.contiguous()
        self.ggml_type = ggml_type
        self.code = NATIVE_FORMATS[ggml_type]
        self.shape = (raw.shape[0], n_cols)
        self._ext = native()
        if self._ext is None:
            raise RuntimeError("GGUFBlockWeight needs the native kernels")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        x = x.float()
        if x.shape[0] <= NATIVE_MAX_ROWS:
            return self._ext.block_matmul(x, self.raw, self.code, n)
        slab = max(64, DEQUANT_SLAB_BYTES // (4 * k))
        if n <= slab:
            return F.linear(x, self._ext.block_dequant(self.raw, self.code, n, k, 0, n))
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, slab):
            r1 = min(n, r0 + slab)
            out[:, r0:r1] = F.linear(x, self._ext.block_dequant(self.raw, self.code, n, k, r0, r1))
        return out

    def matmul_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= NATIVE_MAX_ROWS and x.dtype == torch.float32:
            return self._ext.block_matmul_add(x, self.raw, self.code, self.shape[0], residual)
        return residual + self.matmul(x)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        picked = self.raw.index_select(0, index)
        return self._ext.block_dequant(picked, self.code, picked.shape[0], self.shape[1], 0, picked.shape[0])

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    @property
    def format(self) -> str:
        return self.ggml_type


def concat_rows(weights: list[Weight]) -> Weight | None:
    """Stack matrices that share K and format into one (fused q/k/v, gate/up); None if they can't."""
    first = weights[0]
    if any(w.shape[1] != first.shape[1] or type(w) is not type(first) for w in weights):
        return None
    if isinstance(first, GGUFBlockWeight):
        if any(w.ggml_type != first.ggml_type for w in weights):
            return None
        return GGUFBlockWeight(torch.cat([w.raw for w in weights]), first.ggml_type, first.shape[1])
    if isinstance(first, DenseWeight):
        if any(w.tensor.dtype != first.tensor.dtype for w in weights):
            return None
        return DenseWeight(torch.cat([w.tensor for w in weights]))
    return None
