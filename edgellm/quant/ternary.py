"""Ternary weights {-1, 0, +1} with an absmean scale, 2 bits a weight (BitNet b1.58).

As in BitNet b1.58 (Ma et al., 2024): ``gamma = mean(|W|)``, ``t = clip(round(W / (gamma + eps)),
-1, 1)`` and ``W ~= gamma * t``. ``gamma`` is per tensor by default (``ternary``; for the fused
q/k/v and gate/up matrices, per original tensor) or per output channel (``ternary-channel``).

**Applied after training, this ruins a model that was not trained for it**: BitNet models are
trained with the ternary constraint in the loop; rounding a normal model's weights to three
levels destroys it (see the perplexity in docs/precision.md). The format is here so that the
engine runs models trained this way, correctly and fast.

Packed form: ``codes`` uint8 [N, K/4], code = t + 1 (0, 1, 2); byte j of a row holds the
elements j, j + K/4, j + K/2 and j + 3K/4 in bits 0-1, 2-3, 4-5 and 6-7 (so each 2-bit plane is
one contiguous quarter of the row); ``scale`` float32 [N] (equal within a tensor when per tensor).

Matmul (:func:`TernaryWeight` picks): where PyTorch's int4 kernel applies (rows a multiple of
its layout's row block, 64 or 32 with AVX2 only; width of 32), the values are held as int4 codes with unit group scales and the absmean
scale is applied to the output (:class:`TernaryInt4Weight`: one kernel pass, as fast as int4,
4.5 bits a weight in memory). Elsewhere the 2-bit packing stays in memory
(:class:`TernaryPlanesWeight`): a plane ``(codes >> 2j) & 3`` is an int8 matrix of codes for a
quarter of the inputs, so ``x . t = sum_j x_j . c_j - sum(x)``: four calls of PyTorch's int8
weight-only kernel (bf16 activations) on slabs of rows, the scale applied to the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.quant import int4
from edgellm.quant.base import QuantizedWeight, Weight, slab_matmul, slab_rows
from edgellm.quant.registry import register

EPS = 1e-8


@dataclass
class TernaryPacked:
    codes: torch.Tensor      # uint8 [N, K/4]
    scale: torch.Tensor      # float32 [N]
    per_channel: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * 4)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale": self.scale}

    def params(self) -> dict:
        return {"per_channel": self.per_channel}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], params: dict) -> "TernaryPacked":
        return cls(t["codes"].to(torch.uint8), t["scale"].float(), bool(params.get("per_channel", False)))


def pack(t: torch.Tensor) -> torch.Tensor:
    """Ternary values [N, K] (-1/0/1, K % 4 == 0) -> codes [N, K/4]."""
    n, k = t.shape
    c = (t + 1).to(torch.uint8)
    q = k // 4
    return (c[:, :q] | (c[:, q:2 * q] << 2) | (c[:, 2 * q:3 * q] << 4) | (c[:, 3 * q:] << 6)).contiguous()


def unpack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K/4] -> uint8 codes 0..2 [N, K] in column order."""
    return torch.cat([(codes >> s) & 3 for s in (0, 2, 4, 6)], dim=1)


def quantize(w: torch.Tensor, per_channel: bool = False, segments=None) -> TernaryPacked:
    """``segments``: row counts of the tensors fused in ``w`` (each gets its own per-tensor scale)."""
    w = w.detach().float()
    if w.dim() != 2:
        raise ValueError(f"ternary quantises a 2-D matrix, got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % 4:
        raise ValueError(f"ternary packs 4 weights a byte: the width {k} is not a multiple of 4")
    if per_channel:
        gamma = w.abs().mean(dim=1)
    else:
        segments = list(segments) if segments else [n]
        if sum(segments) != n:
            raise ValueError(f"segments {segments} do not add up to {n} rows")
        gamma = torch.cat([w[s0:s0 + s].abs().mean().expand(s) for s0, s in
                           zip([sum(segments[:i]) for i in range(len(segments))], segments)])
    t = torch.round(w / (gamma[:, None] + EPS)).clamp_(-1, 1)
    return TernaryPacked(pack(t), gamma.contiguous(), per_channel)


def dequantize(p: TernaryPacked) -> torch.Tensor:
    return (unpack_codes(p.codes).float() - 1.0) * p.scale[:, None]


def TernaryWeight(packed: TernaryPacked) -> QuantizedWeight:
    """The fastest in-memory form of a ternary matrix: :class:`TernaryInt4Weight` where PyTorch's
    int4 kernel can run it, else :class:`TernaryPlanesWeight`."""
    n, k = packed.shape
    block = int4.kernel_block_rows() if int4.kernel_available() else None
    if block and n % block == 0 and k % 32 == 0:
        return TernaryInt4Weight(packed)
    return TernaryPlanesWeight(packed)


class TernaryInt4Weight(QuantizedWeight):
    """Ternary values held as int4 codes t + 8 in the int4 kernel's layout, group scale 1 (exact
    in bf16), with the fp32 absmean scale applied to the output: one pass of PyTorch's int4
    kernel, 4-5x faster than the four int8 planes of :class:`TernaryPlanesWeight` (49152x576:
    2.7 vs 14.9 ms; 3072x576: 0.30 vs 1.08 ms, one thread). The file keeps the 2-bit packing; in
    memory this form takes 4.5 bits a weight (codes + the kernel's per-32 scale/zero), the price
    of the speed."""

    kind = "ternary"

    def __init__(self, packed: TernaryPacked):
        n, k = packed.shape
        self.shape = (n, k)
        self.per_channel = packed.per_channel
        self.format_name = "ternary-channel" if packed.per_channel else "ternary"
        codes = unpack_codes(packed.codes) + 7                    # t + 8: 7, 8, 9
        ones = torch.ones(n, k // 32, dtype=torch.bfloat16)
        self._int4 = int4.Int4Weight(int4.Int4Packed(int4.pack_nibbles(codes), ones, None, 32))
        self.scale = packed.scale.contiguous()

    @property
    def packed(self) -> TernaryPacked:
        t = self._int4.codes(0, self.shape[0]).to(torch.int16) - 8
        return TernaryPacked(pack(t), self.scale, self.per_channel)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self._int4.decode(x).mul_(self.scale)

    def prefill(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._int4.prefill(x, dtype).mul_(self.scale)

    def dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        return (self._int4.dequant_rows(r0, r1, torch.float32) * self.scale[r0:r1, None]).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1)
        return self._int4.rows(index) * self.scale.index_select(0, index)[:, None]

    @property
    def nbytes(self) -> int:
        return self._int4.nbytes + self.scale.numel() * 4


class TernaryPlanesWeight(QuantizedWeight):
    """Ternary matrix kept at 2 bits a weight in memory, multiplied through four int8 planes."""

    slab_align = 1
    kind = "ternary"

    def __init__(self, packed: TernaryPacked):
        self.packed = packed
        self.shape = packed.shape
        self.format_name = "ternary-channel" if packed.per_channel else "ternary"
        self._ones = torch.ones(self.shape[0], dtype=torch.bfloat16)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        q = k // 4
        xb = x.to(torch.bfloat16)
        parts = [xb[:, j * q:(j + 1) * q].contiguous() for j in range(4)]
        total = xb.float().sum(dim=1, keepdim=True)
        step = slab_rows(q, 1, 64)
        codes = self.packed.codes
        out = torch.empty(x.shape[0], n, dtype=torch.float32)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            sl = codes[r0:r1]
            ones = self._ones[r0:r1]
            acc = out[:, r0:r1]
            for j, s in enumerate((0, 2, 4, 6)):
                plane = ((sl >> s) & 3 if s < 6 else sl >> 6).view(torch.int8)
                y = torch.ops.aten._weight_int8pack_mm(parts[j], plane, ones)
                if j == 0:
                    acc.copy_(y)
                else:
                    acc.add_(y)
        return out.sub_(total).mul_(self.packed.scale)

    def prefill(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = self.packed.codes
        return slab_matmul(x.to(dtype), self.shape[0], slab_rows(self.shape[1], 2, 64),
                           lambda r0, r1: unpack_codes(codes[r0:r1]).to(dtype) - 1, self.packed.scale)

    def dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_codes(self.packed.codes[r0:r1])
        return ((codes.float() - 1.0) * self.packed.scale[r0:r1, None]).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1)
        codes = unpack_codes(self.packed.codes.index_select(0, index))
        return (codes.float() - 1.0) * self.packed.scale.index_select(0, index)[:, None]

    @property
    def nbytes(self) -> int:
        return self.packed.codes.numel() + self.packed.scale.numel() * 4 + self._ones.numel() * 2


def _convert(w: Weight, fmt, segments=None) -> Weight:
    return TernaryWeight(quantize(w.dequantize(), per_channel=fmt.per_channel, segments=segments))


def _load(params: dict, parts: dict[str, torch.Tensor]) -> Weight:
    return TernaryWeight(TernaryPacked.from_tensors(parts, params))


register("ternary", _convert, _load)
