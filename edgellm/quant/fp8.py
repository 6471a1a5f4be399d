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

The half slab is widened to fp32 (F16C) and multiplied by BLAS; the per-row scale is applied to
the output. That is exact but not fast: the widening writes 6 bytes for every byte read, so a
decode matmul costs 2-4x fp32's (the 49152x576 lm_head: 39 vs 14 ms, one thread) and SmolLM2
decodes at about a fifth of the float32 rate (docs/precision.md). The format's gain here is
memory (a quarter of fp32); a fast FP8 decode needs a native kernel that widens in registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgellm.errors import UnsupportedModelError
from edgellm.quant.formats import QuantizedWeight, prefill_dtype, slab_rows

VARIANTS = {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}
MAX_FINITE = {"e4m3": 448.0, "e5m2": 57344.0}
# value of the half built from the bits, relative to the fp8 value
_HALF_FACTOR = {"e4m3": 2.0 ** -8, "e5m2": 1.0}


def require_float8(variant: str = "e4m3") -> torch.dtype:
    """The torch float8 dtype of ``variant``; UnsupportedModelError if this torch lacks it."""
    name = VARIANTS[variant]
    dtype = getattr(torch, name, None)
    if dtype is None:
        raise UnsupportedModelError(
            f"this PyTorch ({torch.__version__}) has no torch.{name}, so FP8 weights cannot be stored",
            "install PyTorch 2.1 or newer, or pick another format (int8, q8_0, bfloat16)")
    return dtype


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
    if variant not in VARIANTS:
        raise ValueError(f"fp8 variant must be one of {list(VARIANTS)}, got {variant!r}")
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


def _half_bits(f8: torch.Tensor, variant: str) -> torch.Tensor:
    """float8 [R, K] -> float16 [R, K] worth ``_HALF_FACTOR[variant]`` times the values (exact)."""
    if variant == "e5m2":
        return (f8.view(torch.uint8).to(torch.int16) << 8).view(torch.float16)
    # int8 -> int16 sign-extends: bits 8..15 copy the sign. << 7 leaves it in bit 15 (and 14),
    # clearing bit 14 leaves sign | exponent+mantissa.
    return ((f8.view(torch.int8).to(torch.int16) << 7) & -16385).view(torch.float16)


class FP8Weight(QuantizedWeight):
    slab_align = 1

    def __init__(self, packed: FP8Packed):
        self.packed = packed
        self.shape = tuple(packed.w.shape)
        self.format_name = f"fp8-{packed.variant}"
        # the scale the half-precision slabs need
        self._out_scale = (packed.scale / _HALF_FACTOR[packed.variant]).contiguous()

    def _slab(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows r0..r1 as ``dtype``, without the per-row scale (values / _HALF_FACTOR)."""
        return _half_bits(self.packed.w[r0:r1], self.packed.variant).to(dtype)

    def _scaled_slabs(self, x: torch.Tensor, dtype: torch.dtype, step: int) -> torch.Tensor:
        n, k = self.shape
        xx = x.to(dtype)
        if n <= step:
            return F.linear(xx, self._slab(0, n, dtype)).float().mul_(self._out_scale)
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            out[:, r0:r1] = F.linear(xx, self._slab(r0, r1, dtype))
        return out.mul_(self._out_scale)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return self._scaled_slabs(x, torch.float32, slab_rows(self.shape[1], 4, 1))

    def _slab_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._scaled_slabs(x, dtype, slab_rows(self.shape[1], 2, 1))

    def _dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return (self._slab(r0, r1, torch.float32) * self._out_scale[r0:r1, None]).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1)
        half = _half_bits(self.packed.w.index_select(0, index), self.packed.variant)
        return half.float() * self._out_scale.index_select(0, index)[:, None]

    @property
    def nbytes(self) -> int:
        return self.packed.w.numel() + self.packed.scale.numel() * 8
