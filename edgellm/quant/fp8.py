"""FP8 weights (E4M3 or E5M2) with one float32 scale per output channel.

``w[n, k] ~= scale[n] * f8[n, k]`` where ``f8`` is ``torch.float8_e4m3fn`` (max 448, 3 mantissa
bits: relative error <= 2^-4) or ``torch.float8_e5m2`` (max 57344, 2 mantissa bits: <= 2^-3),
and ``scale = max|w[n]| / max_finite`` so each row uses the whole range. The cast rounds to
nearest even. 1 byte a weight (+4 per row).

This CPU has no FP8 arithmetic, and PyTorch's float8 -> float cast is a scalar loop (3.5 ms for
a 1536x576 matrix, 170 ms for the lm_head: slower than reading fp32). The matmul therefore
widens slabs of rows with integer bit operations instead, exactly:

* E5M2 is the top byte of an IEEE half: ``half_bits = byte << 8``;
* E4M3 shifted left by 7 (sign moved to bit 15) is an IEEE half worth ``2^-8`` of the E4M3
  value, subnormals included (both formats' subnormals line up); the ``2^8`` goes into the scale.

(:func:`edgellm.dtypes.float8_as_half`, shared with the fp8 KV cache.)

The half slab is widened to fp32 (F16C) and multiplied by BLAS; the per-row scale is applied to
the output. That is exact but not fast: the widening writes 6 bytes for every byte read, so a
decode matmul costs 2-4x fp32's (the 49152x576 lm_head: 39 vs 14 ms, one thread) and SmolLM2
decodes at about a fifth of the float32 rate (docs/precision.md). The format's gain here is
memory (a quarter of fp32); a fast FP8 decode needs a native kernel that widens in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.dtypes import FLOAT8_HALF_FACTOR, FLOAT8_TYPES, float8_as_half
from edgellm.quant.base import QuantizedWeight, Weight, slab_matmul, slab_rows
from edgellm.quant.registry import register, require_float8

MAX_FINITE = {"e4m3": 448.0, "e5m2": 57344.0}


@dataclass
class FP8Packed:
    w: torch.Tensor          # float8 [N, K]
    scale: torch.Tensor      # float32 [N]
    variant: str             # "e4m3" | "e5m2"

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.w, "scale": self.scale}

    def params(self) -> dict:
        return {"variant": self.variant}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], params: dict) -> "FP8Packed":
        variant = params["variant"]
        return cls(t["w"].to(require_float8(variant)), t["scale"].float(), variant)


def quantize(w: torch.Tensor, variant: str = "e4m3") -> FP8Packed:
    if variant not in FLOAT8_TYPES:
        raise ValueError(f"fp8 variant must be one of {list(FLOAT8_TYPES)}, got {variant!r}")
    dtype = require_float8(variant)
    w = w.detach().float()
    if w.dim() != 2:
        raise ValueError(f"fp8 quantises a 2-D matrix, got shape {tuple(w.shape)}")
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / MAX_FINITE[variant], torch.ones_like(amax))
    f8 = (w / scale[:, None]).clamp_(-MAX_FINITE[variant], MAX_FINITE[variant]).to(dtype)
    return FP8Packed(f8.contiguous(), scale.contiguous(), variant)


def dequantize(p: FP8Packed) -> torch.Tensor:
    return p.w.float() * p.scale[:, None]


class FP8Weight(QuantizedWeight):
    slab_align = 1
    kind = "fp8"

    def __init__(self, packed: FP8Packed):
        self.packed = packed
        self.shape = tuple(packed.w.shape)
        self.format_name = f"fp8-{packed.variant}"
        # the scale the half-precision slabs need
        self._out_scale = (packed.scale / FLOAT8_HALF_FACTOR[packed.variant]).contiguous()

    def _slab(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0..r1 as ``dtype``, without the per-row scale (values / FLOAT8_HALF_FACTOR)."""
        return float8_as_half(self.packed.w[r0:r1], self.packed.variant).to(dtype)

    def _scaled_slabs(self, x: torch.Tensor, dtype: torch.dtype, step: int) -> torch.Tensor:
        return slab_matmul(x.to(dtype), self.shape[0], step, lambda r0, r1: self._slab(r0, r1, dtype),
                           self._out_scale)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self._scaled_slabs(x, torch.float32, slab_rows(self.shape[1], 4, 1))

    def prefill(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._scaled_slabs(x, dtype, slab_rows(self.shape[1], 2, 1))

    def dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return (self._slab(r0, r1, torch.float32) * self._out_scale[r0:r1, None]).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1)
        half = float8_as_half(self.packed.w.index_select(0, index), self.packed.variant)
        return half.float() * self._out_scale.index_select(0, index)[:, None]

    @property
    def nbytes(self) -> int:
        return self.packed.w.numel() + self.packed.scale.numel() * 8


def _convert(w: Weight, fmt, segments=None) -> Weight:
    return FP8Weight(quantize(w.dequantize(), fmt.fp8))


def _load(params: dict, parts: dict[str, torch.Tensor]) -> Weight:
    return FP8Weight(FP8Packed.from_tensors(parts, params))


register("fp8", _convert, _load)
