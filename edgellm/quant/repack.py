"""K-quant super-blocks repacked into per-32 blocks that the native kernels read directly.

Q4_K and Q6_K group 256 weights under one float16 scale and keep 6- or 8-bit scales per sub-block
of 32 (Q4_K) or 16 (Q6_K) weights. The kernels' inner loop works on 32 weights with their own
constants, so at load time each sub-block's constants are multiplied out once, in float32:

* ``Q4_KR`` (from Q4_K), 24 bytes per 32 weights: ``d: f32, m: f32, 16 bytes of nibbles``;
  ``w = d * q + m`` with ``d = f32(d_K) * sc`` and ``m = -(f32(dmin_K) * mn)``.
* ``Q6_KR`` (from Q6_K), 40 bytes per 32 weights: ``d0: f32, d1: f32, 32 x int8``;
  ``w = d0 * q`` for the first 16, ``d1 * q`` for the last 16, ``q`` in -32..31.

Those products (an 11-bit float16 mantissa times a 6- or 8-bit integer) are exact in float32, so a
repacked weight dequantises to exactly the float the reference (gguf-py, hence HF transformers)
computes. The price is memory: 6 bits a weight instead of 4.5 (Q4_K), 10 instead of 6.6 (Q6_K),
against 32 when such matrices were dequantised to float32 at load.
"""

from __future__ import annotations

import torch

from edgellm.quant import gguf_blocks
from edgellm.quant.base import CONVERT_ROWS

REPACKED = {"Q4_K": "Q4_KR", "Q6_K": "Q6_KR"}
BLOCK_BYTES = {"Q4_KR": 24, "Q6_KR": 40}


def _f32_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).view(*x.shape[:-1], x.shape[-1] * 4)


def _repack_q4_k(raw: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    scale, mn, q = gguf_blocks.unpack_q4_k(raw, n_rows, n_cols)
    nb = n_cols // 32
    out = torch.empty(n_rows, nb, 24, dtype=torch.uint8)
    out[..., 0:4] = _f32_bytes(scale.reshape(n_rows, nb, 1))
    out[..., 4:8] = _f32_bytes((-mn).reshape(n_rows, nb, 1))
    qb = q.view(n_rows, nb, 32)
    out[..., 8:] = qb[..., :16] | (qb[..., 16:] << 4)     # byte j: element j (low), j + 16 (high)
    return out.view(n_rows, nb * 24)


def _repack_q6_k(raw: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    scale, q = gguf_blocks.unpack_q6_k(raw, n_rows, n_cols)
    nb = n_cols // 32
    out = torch.empty(n_rows, nb, 40, dtype=torch.uint8)
    out[..., 0:8] = _f32_bytes(scale.reshape(n_rows, nb, 2))
    out[..., 8:] = q.view(n_rows, nb, 32).view(torch.uint8)
    return out.view(n_rows, nb * 40)


def repack(raw, ggml_type: str, n_rows: int, n_cols: int) -> torch.Tensor:
    """Raw Q4_K / Q6_K rows (uint8 ``[n_rows, bytes]`` or flat) -> repacked uint8 ``[n_rows, bytes]``."""
    fn = {"Q4_K": _repack_q4_k, "Q6_K": _repack_q6_k}[ggml_type]
    rows = torch.as_tensor(raw).view(n_rows, -1)
    # CONVERT_ROWS at a time: bounds the unpacked temporaries of a large matrix (an embedding)
    parts = [fn(rows[r:r + CONVERT_ROWS], min(CONVERT_ROWS, n_rows - r), n_cols)
             for r in range(0, n_rows, CONVERT_ROWS)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dequantize(raw: torch.Tensor, repacked_type: str, n_cols: int) -> torch.Tensor:
    """Repacked rows -> float32 ``[n_rows, n_cols]`` (the path where the native kernels are missing)."""
    n_rows, nb = raw.shape[0], n_cols // 32
    b = raw.contiguous().view(n_rows, nb, BLOCK_BYTES[repacked_type])
    consts = b[..., :8].contiguous().view(torch.float32)                  # [n_rows, nb, 2]
    if repacked_type == "Q4_KR":
        qs = b[..., 8:]
        q = torch.cat((qs & 0x0F, qs >> 4), dim=-1).float()                # [n_rows, nb, 32]
        w = torch.addcmul(consts[..., 1:2], q, consts[..., 0:1])          # d * q + m, one rounding
    else:
        q = b[..., 8:].contiguous().view(torch.int8).float().view(n_rows, nb, 2, 16)
        w = q * consts.unsqueeze(-1)
    return w.reshape(n_rows, n_cols)
