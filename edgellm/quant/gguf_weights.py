"""GGUF block matrices kept as their raw blocks: read by the native kernels where there is one
(:data:`edgellm.kernels.NATIVE_FORMATS`: Q4_0, Q4_1, Q8_0, Q5_0, and Q4_K / Q6_K repacked as
Q4_KR / Q6_KR), else dequantised slab by slab for every matmul."""

from __future__ import annotations

import torch

from edgellm.kernels import NATIVE_FORMATS, native
from edgellm.quant import gguf_blocks, repack
from edgellm.quant.activations import dequantized_q8
from edgellm.quant.base import (
    BLOCK_SLAB_BYTES,
    BLOCK_SLAB_MIN_ROWS,
    NATIVE_BLOCK_MAX_ROWS,
    QuantizedWeight,
    Weight,
    list_shape,
    slab_matmul,
    slab_rows,
)
from edgellm.quant.bf16 import bf16_slab_matmul, decode_in_bf16
from edgellm.quant.registry import register


class GGUFBlockWeight(Weight):
    """Raw GGUF blocks of a type in NATIVE_FORMATS, read directly by the native kernels.

    ``raw`` is a uint8 tensor [N, bytes_per_row]: each row holds K/32 blocks, so rows can be
    permuted, sliced and concatenated (fusing q/k/v) without touching the bits.
    ``int8_activations`` (set by :func:`edgellm.quant.activations.set_activations`): multiply
    activations rounded to int8 blocks, with integer dot products in decode.
    ``bf16_mode`` (set by the loader for ``--dtype bfloat16``): prefill (more than
    NATIVE_BLOCK_MAX_ROWS rows) multiplies in bf16 (edgellm.quant.bf16), decode with bf16 dot
    products where the CPU has them (``decode_in_bf16``), else exactly.
    """

    int8_activations = False
    bf16_mode = False

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
        # int8 activations: the integer kernel for prefill too where it takes 16 weight rows a
        # vector (VNNI CPUs; Q4_1 3072 x 576, 512 rows: 2.0 ms against 8.6 for rounding + BLAS)
        self._int8_any_rows = bool(self._ext.int8_row_lanes(self.code))
        # float32 rows per prefill slab
        self._step = slab_rows(n_cols, 4, align=1, budget=BLOCK_SLAB_BYTES, minimum=BLOCK_SLAB_MIN_ROWS)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        n = self.shape[0]
        x = x.float()
        if self.int8_activations:
            if x.shape[0] <= NATIVE_BLOCK_MAX_ROWS or self._int8_any_rows:
                return self._ext.block_matmul_q8(x, self.raw, self.code, n)
            x = dequantized_q8(x)    # prefill: the same rounding, then the BLAS
        elif x.shape[0] <= NATIVE_BLOCK_MAX_ROWS:
            if self.bf16_mode and decode_in_bf16():
                return self._ext.block_matmul_bf16(x, self.raw, self.code, n)
            return self._ext.block_matmul(x, self.raw, self.code, n)
        elif self.bf16_mode:
            return bf16_slab_matmul(x, n, self._step, self._dequant_slab, self._dequant_slab_bf16)
        return slab_matmul(x, n, self._step, self._dequant_slab)

    def _dequant_slab(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 as float32."""
        return self._ext.block_dequant(self.raw, self.code, self.shape[0], self.shape[1], r0, r1)

    def _dequant_slab_bf16(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0..r1 rounded to bfloat16 as they are dequantised (no float32 slab)."""
        return self._ext.block_dequant_bf16(self.raw, self.code, self.shape[0], self.shape[1], r0, r1)

    def matmul_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        exact = not self.int8_activations and not (self.bf16_mode and decode_in_bf16())
        if x.shape[0] <= NATIVE_BLOCK_MAX_ROWS and x.dtype == torch.float32 and exact:
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

    def parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"format": "gguf", "ggml_type": self.ggml_type, "shape": list_shape(self)}, {"raw": self.raw}

    @classmethod
    def concat(cls, weights: list[Weight]) -> Weight | None:
        first = weights[0]
        if any(w.ggml_type != first.ggml_type for w in weights):
            return None
        fused = GGUFBlockWeight(torch.cat([w.raw for w in weights]), first.ggml_type, first.shape[1])
        fused.bf16_mode = first.bf16_mode
        return fused


class GGUFSlabWeight(QuantizedWeight):
    """Raw GGUF blocks of a type without a native kernel (Q4_K, Q6_K, Q5_1, ...), or any type
    where the native kernels are unavailable: every matmul dequantises slabs of rows with
    :func:`edgellm.quant.gguf_blocks.dequantize` and calls BLAS. Correct and compact in memory,
    but decode pays a full dequantisation per token (see docs/precision.md for the speed)."""

    slab_align = 1
    kind = "gguf"

    def __init__(self, raw: torch.Tensor, ggml_type: str, n_cols: int):
        self.raw = raw.contiguous()
        self.ggml_type = ggml_type
        self.shape = (raw.shape[0], n_cols)
        self.format_name = ggml_type

    def dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_raw(self.raw[r0:r1], self.ggml_type, self.shape[1]).to(dtype)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.prefill(x, torch.float32)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return dequantize_raw(self.raw.index_select(0, index.reshape(-1)), self.ggml_type, self.shape[1])

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def parts(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {"format": "gguf", "ggml_type": self.ggml_type, "shape": list_shape(self)}, {"raw": self.raw}


def dequantize_raw(raw: torch.Tensor, ggml_type: str, n_cols: int) -> torch.Tensor:
    """Raw rows of a GGUF block type (or a repacked one) -> float32 [rows, n_cols]."""
    if ggml_type in repack.BLOCK_BYTES:   # saved from a repacked weight, read where no kernel is
        return repack.dequantize(raw, ggml_type, n_cols)
    return gguf_blocks.dequantize(raw, ggml_type, (raw.shape[0], n_cols))


def gguf_weight(raw: torch.Tensor, ggml_type: str, n_cols: int) -> Weight:
    """The fastest Weight for raw GGUF rows: the native kernel if there is one, else slabs.

    Q4_K and Q6_K are repacked for the kernels (edgellm/quant/repack.py), exactly.
    """
    if native() is not None:
        if ggml_type in NATIVE_FORMATS:
            return GGUFBlockWeight(raw, ggml_type, n_cols)
        if ggml_type in repack.REPACKED:
            return GGUFBlockWeight(repack.repack(raw, ggml_type, raw.shape[0], n_cols), repack.REPACKED[ggml_type], n_cols)
    return GGUFSlabWeight(raw, ggml_type, n_cols)


def _convert(w: Weight, fmt, segments=None) -> Weight:
    t = fmt.type_for_width(w.shape[1])
    if isinstance(w, (GGUFBlockWeight, GGUFSlabWeight)) and w.ggml_type == t:
        return w          # already these blocks: requantising could only lose
    dense = w.dequantize()
    raw = torch.from_numpy(gguf_blocks.quantize(dense, t)).view(dense.shape[0], -1)
    return gguf_weight(raw, t, dense.shape[1])


def _load(params: dict, parts: dict[str, torch.Tensor]) -> Weight:
    return gguf_weight(parts["raw"].to(torch.uint8), params["ggml_type"], int(params["shape"][1]))


register("gguf", _convert, _load)
