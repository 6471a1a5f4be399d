"""int4 weight-only quantisation, group-wise along the input dimension.

Each row is cut into groups of ``group`` consecutive weights (32 by default; 64, 128, 256) with a
bfloat16 ``scale`` and, unless symmetric, a bfloat16 ``zero``:

    w[n, k] ~= (q[n, k] - 8) * scale[n, k // group] + zero[n, k // group],   q in 0..15

* with zero point (default): ``scale = (max - min) / 15``, ``zero = min + 8 * scale`` (so q = 0
  is the group's minimum and q = 15 its maximum, as GGUF Q4_1);
* symmetric (``-sym``): ``zero = 0`` and, as GGUF Q4_0, ``scale = -m / 8`` where ``m`` is the
  group's weight of largest magnitude, so that it maps to q = 0 exactly.

Scales and zeros are rounded to bf16 *before* the codes are chosen, so that ``dequantize`` is
exactly what the kernel computes. Packed (file) form: ``q`` uint8 [N, K/2] (element 2j in the low
nibble, 2j+1 in the high), ``scale``/``zero`` bf16 [N, K/group]: 4.5 bits a weight at group 32
with zero point (4.25 symmetric, 4.125 at group 128 symmetric).

Compute: PyTorch's ``aten._weight_int4pack_mm_for_cpu`` with bf16 activations (its fp32 path is
~30x slower): 1.6 ms for the 49152x576 lm_head against 9.9 ms for fp32 (one thread). Its weight
layout (``_convert_weight_to_int4pack_for_cpu``) is what stays in memory: blocks of B rows,
[N/B, K, B/2] bytes, byte (b, k, r) holding row Bb+r in the low and Bb+B/2+r in the high nibble.
PyTorch sizes B as four float vectors: 64 with AVX512, 32 with AVX2 only (seen on an AMD EPYC).
:func:`kernel_block_rows` finds B once by a probe, and :func:`unpack_kernel_layout` reads codes
back for embedding rows and prefill slabs; where the probe fails, or N is not a multiple of B,
the plain nibbles are kept as well. Prefill dequantises slabs of rows and calls BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from edgellm.quant.base import QuantizedWeight, Weight
from edgellm.quant.registry import register


@dataclass
class Int4Packed:
    q: torch.Tensor              # uint8 [N, K/2]: element 2j low nibble, 2j+1 high nibble
    scale: torch.Tensor          # bfloat16 [N, K/group]
    zero: torch.Tensor | None    # bfloat16 [N, K/group], None when symmetric
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] * 2)

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"q": self.q, "scale": self.scale}
        if self.zero is not None:
            t["zero"] = self.zero
        return t

    def params(self) -> dict:
        return {"group": self.group, "symmetric": self.zero is None}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], params: dict) -> "Int4Packed":
        zero = t.get("zero")
        return cls(t["q"].to(torch.uint8), t["scale"].to(torch.bfloat16),
                   None if zero is None else zero.to(torch.bfloat16), int(params["group"]))


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (0..15) -> [N, K/2] bytes, even element in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def unpack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> uint8 codes [N, K]."""
    return torch.stack([q & 15, q >> 4], dim=-1).view(q.shape[0], -1)


def quantize(w: torch.Tensor, group: int = 32, symmetric: bool = False) -> Int4Packed:
    w = w.detach().float()
    if w.dim() != 2:
        raise ValueError(f"int4 quantises a 2-D matrix, got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4: group size {group} does not divide the width {k}")
    g = w.view(n, k // group, group)
    if symmetric:
        idx = g.abs().argmax(dim=-1, keepdim=True)
        m = g.gather(-1, idx).squeeze(-1)
        scale = (m / -8.0).to(torch.bfloat16).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.zeros_like(scale)
    else:
        mn, mx = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((mx - mn) / 15.0).to(torch.bfloat16).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = (mn + 8.0 * scale).to(torch.bfloat16).float()
    codes = torch.round((g - zero[..., None]) / scale[..., None]).add_(8).clamp_(0, 15).to(torch.uint8)
    return Int4Packed(pack_nibbles(codes.view(n, k)), scale.to(torch.bfloat16).contiguous(),
                      None if symmetric else zero.to(torch.bfloat16).contiguous(), group)


def _dequant_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    n, k = codes.shape
    w = (codes.float() - 8.0).view(n, k // group, group) * scale.float()[..., None]
    if zero is not None:
        w += zero.float()[..., None]
    return w.view(n, k)


def dequantize(p: Int4Packed) -> torch.Tensor:
    return _dequant_codes(unpack_nibbles(p.q), p.scale, p.zero, p.group)


def unpack_kernel_layout(kp: torch.Tensor, b0: int, b1: int, k: int, block: int) -> torch.Tensor:
    """Codes of rows block*b0 .. block*b1 from the CPU int4pack layout ([N/block, K, block/2] bytes)."""
    v = kp.view(-1, k, block // 2)[b0:b1]
    return torch.stack([v & 15, v >> 4], dim=1).transpose(2, 3).reshape((b1 - b0) * block, k)


@lru_cache(maxsize=1)
def kernel_block_rows() -> int | None:
    """Rows per block of this torch's int4pack layout as :func:`unpack_kernel_layout` reads it
    (64 with AVX512, 32 with AVX2), or None when neither reads back a probe's codes."""
    try:
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
        kp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    except Exception:
        return None
    if kp.numel() != 128 * 32:
        return None
    return next((b for b in (64, 32) if torch.equal(unpack_kernel_layout(kp, 0, 128 // b, 64, b).int(), codes)), None)


@lru_cache(maxsize=1)
def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class Int4Weight(QuantizedWeight):
    """Holds the kernel's packed layout (+ bf16 scales/zeros); decodes through the int4 kernel."""

    kind = "int4"

    def __init__(self, packed: Int4Packed):
        n, k = packed.shape
        self.shape = (n, k)
        self.group = packed.group
        self.symmetric = packed.zero is None
        self.format_name = f"int4-g{packed.group}" + ("-sym" if packed.zero is None else "")
        self._kernel = kernel_available() and n % 16 == 0 and k % 2 == 0
        self._q = None          # plain nibbles, kept only when the kernel layout can't be read back
        self._kp = None
        self._block = kernel_block_rows() if self._kernel else None
        zero = packed.zero if packed.zero is not None else torch.zeros_like(packed.scale)
        # [K/group, N, 2]: (scale, zero) per group and output channel, as the kernel wants them.
        self._sz = torch.stack([packed.scale, zero], dim=-1).transpose(0, 1).contiguous()
        if self._kernel:
            codes = unpack_nibbles(packed.q).to(torch.int32)
            self._kp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        if self._block and n % self._block == 0:
            self.slab_align = self._block     # a slab never splits a block of the layout
        else:
            self._q = packed.q.contiguous()
            self.slab_align = 1

    def _scale_zero(self, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bf16 scales [R, K/group] and zeros (None when symmetric) of ``rows`` (slice or index)."""
        sz = self._sz[:, rows]
        return sz[..., 0].t(), None if self.symmetric else sz[..., 1].t()

    @property
    def packed(self) -> Int4Packed:
        n, k = self.shape
        q = self._q if self._q is not None else \
            pack_nibbles(unpack_kernel_layout(self._kp, 0, n // self._block, k, self._block))
        scale, zero = self._scale_zero(slice(None))
        return Int4Packed(q, scale.contiguous(), None if zero is None else zero.contiguous(), self.group)

    def codes(self, r0: int, r1: int) -> torch.Tensor:
        """uint8 codes (0..15) of rows r0..r1."""
        if self._q is not None:
            return unpack_nibbles(self._q[r0:r1])
        bl = self._block
        b0, b1 = r0 // bl, -(-r1 // bl)
        return unpack_kernel_layout(self._kp, b0, b1, self.shape[1], bl)[r0 - b0 * bl: r1 - b0 * bl]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel:
            return self.prefill(x, torch.float32)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self._kp, self.group,
                                                           self._sz).float()

    def dequant_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        scale, zero = self._scale_zero(slice(r0, r1))
        return _dequant_codes(self.codes(r0, r1), scale, zero, self.group).to(dtype)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        index = index.reshape(-1)
        k = self.shape[1]
        if self._q is not None:
            codes = unpack_nibbles(self._q.index_select(0, index))
        else:
            half = self._block // 2
            v = self._kp.view(-1, k, half)
            r = index % self._block
            b = v[index // self._block, :, r % half]        # [T, K]
            codes = torch.where((r < half)[:, None], b & 15, b >> 4)
        scale, zero = self._scale_zero(index)
        return _dequant_codes(codes, scale, zero, self.group)

    @property
    def nbytes(self) -> int:
        total = self._sz.numel() * 2
        if self._kp is not None:
            total += self._kp.numel() * self._kp.element_size()
        if self._q is not None:
            total += self._q.numel()
        return total


def _convert(w: Weight, fmt, segments=None) -> Weight:
    return Int4Weight(quantize(w.dequantize(), fmt.group, fmt.symmetric))


def _load(params: dict, parts: dict[str, torch.Tensor]) -> Weight:
    return Int4Weight(Int4Packed.from_tensors(parts, params))


register("int4", _convert, _load)
