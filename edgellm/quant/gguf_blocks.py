"""The GGUF / ggml block formats: dequantise (torch, vectorised), unpack fields, quantise.

Every quantised ggml type stores a tensor row by row as a run of fixed-size *blocks*; a block
holds ``BLOCK_ELEMS[t]`` consecutive elements of a row in ``BLOCK_BYTES[t]`` bytes. Rows are
the innermost GGUF dimension (``ne[0]``), i.e. the *last* dimension in PyTorch order, so a
weight matrix ``[out_features, in_features]`` is ``out_features`` rows of ``in_features // B``
blocks each, and the raw bytes of a tensor are simply ``n_blocks * BLOCK_BYTES`` bytes.

Layouts (little-endian; ``f16`` is IEEE half):

* ``Q8_0`` (32 elems, 34 B): ``d:f16, q:int8[32]``; ``w = d * q``
* ``Q4_0`` (32, 18 B): ``d:f16, qs:u8[16]``; element ``j < 16`` is ``qs[j] & 15``, element
  ``j + 16`` is ``qs[j] >> 4``; ``w = d * (q - 8)``
* ``Q4_1`` (32, 20 B): ``d:f16, m:f16, qs:u8[16]`` (nibbles as Q4_0); ``w = d * q + m``
* ``Q5_0`` (32, 22 B): ``d:f16, qh:u32, qs:u8[16]``; ``q = nibble | (bit j of qh) << 4``;
  ``w = d * (q - 16)``
* ``Q5_1`` (32, 24 B): ``d:f16, m:f16, qh:u32, qs:u8[16]``; ``w = d * q + m``
* ``Q4_K`` (256, 144 B): ``d:f16, dmin:f16, scales:u8[12], qs:u8[128]``; 8 sub-blocks of 32
  with 6-bit scale ``sc[s]`` and min ``mn[s]`` packed in ``scales``; ``qs`` is 4 chunks of 32
  bytes, chunk ``c`` holding sub-block ``2c`` in its low nibbles and ``2c + 1`` in its high
  nibbles; ``w = (d * sc[s]) * q - (dmin * mn[s])``
* ``Q5_K`` (256, 176 B): ``d, dmin, scales[12], qh:u8[32], qs:u8[128]``; as Q4_K with a fifth
  bit ``(qh[l] >> s) & 1`` for element ``l`` of sub-block ``s``
* ``Q6_K`` (256, 210 B): ``ql:u8[128], qh:u8[64], scales:int8[16], d:f16``; 16 sub-blocks of
  16; ``w = (d * scales[i // 16]) * (q - 32)`` with the 6-bit ``q`` spread over ql/qh (see
  :func:`_q6_k_values`).

:func:`dequantize` reproduces ``gguf.quants.dequantize`` bit for bit (same float32 operation
order). :func:`quantize` reproduces ``gguf.quants.quantize`` bit for bit for the types gguf
implements (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16); for Q4_K and Q6_K, which gguf only
dequantises, it follows llama.cpp's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch

from edgellm.errors import ModelFormatError, UnsupportedModelError

QK_K = 256

#: Elements per block, by ggml type name.
BLOCK_ELEMS: dict[str, int] = {
    "F32": 1, "F16": 1, "BF16": 1,
    "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
    "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K,
}
#: Bytes per block, by ggml type name.
BLOCK_BYTES: dict[str, int] = {
    "F32": 4, "F16": 2, "BF16": 2,
    "Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24,
    "Q4_K": 144, "Q5_K": 176, "Q6_K": 210,
}
#: Types :func:`dequantize` handles (all of the above).
DEQUANTIZE_TYPES = tuple(BLOCK_ELEMS)
#: Types :func:`quantize` produces.
QUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")


def _check_type(ggml_type: str) -> None:
    if ggml_type not in BLOCK_ELEMS:
        raise UnsupportedModelError(
            f"tensor type {ggml_type!r} is not supported",
            f"edgellm reads these tensor types: {', '.join(DEQUANTIZE_TYPES)}; "
            "re-quantise the model to one of them (e.g. Q4_K_M or Q8_0)")


def nbytes(ggml_type: str, n_elements: int) -> int:
    """Bytes that ``n_elements`` elements take in ``ggml_type`` (a multiple of its block size)."""
    _check_type(ggml_type)
    be = BLOCK_ELEMS[ggml_type]
    if n_elements % be:
        raise ModelFormatError(f"{n_elements} elements is not a whole number of {ggml_type} blocks "
                               f"({be} elements each)", "the tensor's shape is damaged")
    return n_elements // be * BLOCK_BYTES[ggml_type]


# --------------------------------------------------------------------------------------------
# raw byte handling
# --------------------------------------------------------------------------------------------

def _as_u8(raw) -> torch.Tensor:
    """A flat uint8 torch tensor sharing memory with ``raw`` (numpy array, memmap, bytes, tensor)."""
    if isinstance(raw, torch.Tensor):
        t = raw
        if t.dtype != torch.uint8:
            t = t.contiguous().view(torch.uint8)
        return t.reshape(-1)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(raw, dtype=np.uint8)
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        arr = np.ascontiguousarray(arr).view(np.uint8)
    arr = arr.reshape(-1)
    if not arr.flags.writeable:
        # Read-only memmaps are fine: nothing here writes into the input.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    return torch.from_numpy(arr)


def _blocks(raw, ggml_type: str, n_elements: int) -> torch.Tensor:
    """``raw`` as ``[n_blocks, BLOCK_BYTES]`` uint8, after checking its size."""
    _check_type(ggml_type)
    u8 = _as_u8(raw)
    want = nbytes(ggml_type, n_elements)
    if u8.numel() != want:
        raise ModelFormatError(
            f"{ggml_type} data of {n_elements} elements should be {want} bytes, got {u8.numel()}",
            "the tensor's bytes do not match its shape; the file is damaged")
    return u8.view(-1, BLOCK_BYTES[ggml_type])


def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The float16 field at byte ``off`` of each block, as ``[n_blocks, 1]`` float16."""
    return b[:, off:off + 2].contiguous().view(torch.float16)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[n, k]`` bytes -> ``[n, 2k]`` values: the k low nibbles, then the k high nibbles."""
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` bytes of a little-endian uint32 -> ``[n, 32]`` bits (bit j = element j)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# --------------------------------------------------------------------------------------------
# field unpackers (also the building blocks of dequantize)
# --------------------------------------------------------------------------------------------

def _rows_cols(n_rows: int, n_cols: int, block: int, ggml_type: str) -> None:
    if n_rows <= 0 or n_cols <= 0 or n_cols % block:
        raise ModelFormatError(f"{ggml_type} matrix of {n_rows}x{n_cols} is impossible: the row length "
                               f"must be a positive multiple of {block}", "the tensor's shape is damaged")


def unpack_q8_0(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 fields: ``d`` float16 ``[n_rows, n_cols // 32]``, ``q`` int8 ``[n_rows, n_cols]``.

    Reconstruction: ``w[r, c] = float32(d[r, c // 32]) * float32(q[r, c])``.
    """
    _rows_cols(n_rows, n_cols, 32, "Q8_0")
    b = _blocks(raw, "Q8_0", n_rows * n_cols)
    d = _f16(b, 0).view(n_rows, n_cols // 32)
    q = b[:, 2:].contiguous().view(torch.int8).view(n_rows, n_cols)
    return d, q


def unpack_q4_0(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 fields: ``d`` float16 ``[n_rows, n_cols // 32]``, ``q`` uint8 ``[n_rows, n_cols]`` in 0..15.

    Reconstruction: ``w[r, c] = float32(d[r, c // 32]) * (float32(q[r, c]) - 8)``.
    """
    _rows_cols(n_rows, n_cols, 32, "Q4_0")
    b = _blocks(raw, "Q4_0", n_rows * n_cols)
    return _f16(b, 0).view(n_rows, n_cols // 32), _nibbles(b[:, 2:]).view(n_rows, n_cols)


def unpack_q4_1(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 fields: ``d``, ``m`` float16 ``[n_rows, n_cols // 32]``, ``q`` uint8 ``[n_rows, n_cols]`` in 0..15.

    Reconstruction (two float32 roundings, in this order):
    ``w[r, c] = float32(d[r, c // 32]) * float32(q[r, c]) + float32(m[r, c // 32])``.
    """
    _rows_cols(n_rows, n_cols, 32, "Q4_1")
    b = _blocks(raw, "Q4_1", n_rows * n_cols)
    nb = n_cols // 32
    return (_f16(b, 0).view(n_rows, nb), _f16(b, 2).view(n_rows, nb),
            _nibbles(b[:, 4:]).view(n_rows, n_cols))


def unpack_q5_0(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0 fields: ``d`` float16 ``[n_rows, n_cols // 32]``, ``q`` uint8 ``[n_rows, n_cols]`` in 0..31.

    Reconstruction: ``w[r, c] = float32(d[r, c // 32]) * (float32(q[r, c]) - 16)``.
    """
    _rows_cols(n_rows, n_cols, 32, "Q5_0")
    b = _blocks(raw, "Q5_0", n_rows * n_cols)
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b, 0).view(n_rows, n_cols // 32), q.view(n_rows, n_cols)


def unpack_q5_1(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_1 fields: ``d``, ``m`` float16 ``[n_rows, n_cols // 32]``, ``q`` uint8 in 0..31.

    Reconstruction: ``w[r, c] = float32(d[r, c // 32]) * float32(q[r, c]) + float32(m[r, c // 32])``.
    """
    _rows_cols(n_rows, n_cols, 32, "Q5_1")
    b = _blocks(raw, "Q5_1", n_rows * n_cols)
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    nb = n_cols // 32
    return _f16(b, 0).view(n_rows, nb), _f16(b, 2).view(n_rows, nb), q.view(n_rows, n_cols)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> 6-bit (sc, mn), each uint8 ``[n, 8]``."""
    d = scales[:, 0:4]
    m = scales[:, 4:8]
    md = scales[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32 float32 (scale, min) of Q4_K/Q5_K blocks ``b``: ``d*sc`` and ``dmin*mn``, ``[n, 8]``."""
    d = _f16(b, 0).float()
    dmin = _f16(b, 2).float()
    sc, mn = _k_scale_min(b[:, 4:16])
    return d * sc.float(), dmin * mn.float()


def _q4_k_values(qs: torch.Tensor) -> torch.Tensor:
    """``[n, 128]`` Q4_K qs -> ``[n, 256]`` uint8 values 0..15 in element order."""
    n = qs.shape[0]
    q = qs.view(n, 4, 1, 32)
    return torch.cat((q & 0x0F, q >> 4), dim=2).view(n, QK_K)


def unpack_q4_k(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K fields: ``scale``, ``min`` float32 ``[n_rows, n_cols // 32]``, ``q`` uint8 ``[n_rows, n_cols]`` 0..15.

    ``scale = float32(d) * sc`` and ``min = float32(dmin) * mn`` per 32-element sub-block (the
    6-bit ``sc``/``mn`` of the super-block already applied). Reconstruction (two roundings):
    ``w[r, c] = scale[r, c // 32] * float32(q[r, c]) - min[r, c // 32]``.
    """
    _rows_cols(n_rows, n_cols, QK_K, "Q4_K")
    b = _blocks(raw, "Q4_K", n_rows * n_cols)
    scale, mn = _k_scales(b)
    q = _q4_k_values(b[:, 16:])
    return scale.view(n_rows, n_cols // 32), mn.view(n_rows, n_cols // 32), q.view(n_rows, n_cols)


def _q5_k_values(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = _q4_k_values(b[:, 48:]).view(n, 8, 32)
    qh = b[:, 16:48].view(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    return (ql | ((qh & 1) << 4)).view(n, QK_K)


def unpack_q5_k(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_K fields: ``scale``, ``min`` float32 ``[n_rows, n_cols // 32]``, ``q`` uint8 0..31.

    Reconstruction: ``w[r, c] = scale[r, c // 32] * float32(q[r, c]) - min[r, c // 32]``.
    """
    _rows_cols(n_rows, n_cols, QK_K, "Q5_K")
    b = _blocks(raw, "Q5_K", n_rows * n_cols)
    scale, mn = _k_scales(b)
    return (scale.view(n_rows, n_cols // 32), mn.view(n_rows, n_cols // 32),
            _q5_k_values(b).view(n_rows, n_cols))


def _q6_k_values(b: torch.Tensor) -> torch.Tensor:
    """``[n, 210]`` Q6_K blocks -> ``[n, 256]`` int8 values -32..31 in element order.

    Element ``128*h + 32*g + l`` (h in 0..1, g in 0..3, l in 0..31) takes its low 4 bits from
    ``ql[64*h + 32*(g % 2) + l] >> (4 * (g // 2))`` and its high 2 bits from
    ``qh[32*h + l] >> (2*g)``.
    """
    n = b.shape[0]
    ql = b[:, :128].view(n, 2, 1, 64)
    ql = torch.cat((ql & 0x0F, ql >> 4), dim=2).view(n, 2, 4, 32)
    qh = b[:, 128:192].view(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = ql | ((qh & 3) << 4)
    return (q.view(torch.int8) - 32).view(n, QK_K)


def unpack_q6_k(raw, n_rows: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K fields: ``scale`` float32 ``[n_rows, n_cols // 16]``, ``q`` int8 ``[n_rows, n_cols]`` in -32..31.

    ``scale = float32(d) * float32(scales_int8)`` per 16-element sub-block. Reconstruction:
    ``w[r, c] = scale[r, c // 16] * float32(q[r, c])``.
    """
    _rows_cols(n_rows, n_cols, QK_K, "Q6_K")
    b = _blocks(raw, "Q6_K", n_rows * n_cols)
    d = _f16(b, 208).float()
    scale = d * b[:, 192:208].contiguous().view(torch.int8).float()
    return scale.view(n_rows, n_cols // 16), _q6_k_values(b).view(n_rows, n_cols)


# --------------------------------------------------------------------------------------------
# dequantize
# --------------------------------------------------------------------------------------------

def _put_nibbles(o: torch.Tensor, qs: torch.Tensor) -> None:
    """Write the nibbles of ``qs`` [n, 16] into ``o`` [n, 32] (low nibbles first) as float."""
    o3 = o.view(o.shape[0], 2, 16)
    o3[:, 0].copy_(qs & 0x0F)
    o3[:, 1].copy_(qs >> 4)


def _deq_blocks_into(b: torch.Tensor, t: str, o: torch.Tensor) -> None:
    """Dequantise ``[n, BLOCK_BYTES]`` blocks of quantised type ``t`` into float32 ``o`` ``[n, BLOCK_ELEMS]``.

    The float operations (and their order) are gguf.quants' so that results are bit-identical.
    """
    n = b.shape[0]
    if t == "Q8_0":
        o.copy_(b[:, 2:].view(torch.int8))
        o.mul_(_f16(b, 0).float())
    elif t == "Q4_0":
        _put_nibbles(o, b[:, 2:])
        o.sub_(8.0).mul_(_f16(b, 0).float())
    elif t == "Q4_1":
        _put_nibbles(o, b[:, 4:])
        o.mul_(_f16(b, 0).float()).add_(_f16(b, 2).float())
    elif t == "Q5_0":
        o.copy_(_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4))
        o.sub_(16.0).mul_(_f16(b, 0).float())
    elif t == "Q5_1":
        o.copy_(_nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4))
        o.mul_(_f16(b, 0).float()).add_(_f16(b, 2).float())
    elif t == "Q4_K" or t == "Q5_K":
        scale, mn = _k_scales(b)
        o.copy_(_q4_k_values(b[:, 16:]) if t == "Q4_K" else _q5_k_values(b))
        o.view(n, 8, 32).mul_(scale.unsqueeze(-1)).sub_(mn.unsqueeze(-1))
    elif t == "Q6_K":
        scale = _f16(b, 208).float() * b[:, 192:208].contiguous().view(torch.int8).float()
        o.copy_(_q6_k_values(b))
        o.view(n, 16, 16).mul_(scale.unsqueeze(-1))
    else:  # pragma: no cover - callers check the type first
        raise UnsupportedModelError(f"tensor type {t!r} is not supported")


# Elements per chunk: bounds the uint8 temporaries of big tensors (an embedding of a large
# vocabulary) without paying per-op thread synchronisation too often.
_CHUNK_ELEMS = 1 << 22


def _view_as(u8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return u8.view(dtype)
    except RuntimeError:   # misaligned buffer (e.g. bytes at an odd offset): copy first
        return u8.clone().view(dtype)


def dequantize(raw, ggml_type: str, shape: Sequence[int]) -> torch.Tensor:
    """Decode the bytes of one tensor to a float32 torch tensor of ``shape`` (PyTorch order).

    ``raw`` holds exactly the tensor's bytes (uint8 numpy array or memmap, bytes, or uint8 torch
    tensor). The result is freshly allocated (never a view of ``raw``) and bit-identical to
    ``gguf.quants.dequantize``.
    """
    shape = tuple(int(s) for s in shape)
    n = _numel(shape)
    if ggml_type in ("F32", "F16", "BF16"):
        u8 = _blocks(raw, ggml_type, n).view(-1)
        if ggml_type == "F32":
            return _view_as(u8, torch.float32).clone().view(shape)
        if ggml_type == "F16":
            return _view_as(u8, torch.float16).float().view(shape)
        return (_view_as(u8, torch.int16).to(torch.int32) << 16).view(torch.float32).view(shape)
    b = _blocks(raw, ggml_type, n)
    be = BLOCK_ELEMS[ggml_type]
    nblk = b.shape[0]
    out = torch.empty(nblk, be, dtype=torch.float32)
    step = max(1, _CHUNK_ELEMS // be)
    for s in range(0, nblk, step):
        _deq_blocks_into(b[s:s + step], ggml_type, out[s:s + step])
    return out.view(shape)


# --------------------------------------------------------------------------------------------
# quantize (numpy; bit-exact with gguf.quants where gguf implements the type)
# --------------------------------------------------------------------------------------------

def _np_roundf(n: np.ndarray) -> np.ndarray:
    """Round half away from zero, exactly as gguf.quants.np_roundf (and C roundf)."""
    a = abs(n)
    floored = np.floor(a)
    b = floored + np.floor(2 * (a - floored))
    return np.sign(n) * b


def _safe_inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """``[n, 32]`` values 0..15 -> ``[n, 16]`` bytes (element j low nibble, j+16 high nibble)."""
    q = q.reshape((q.shape[0], 2, 16))
    return q[:, 0, :] | (q[:, 1, :] << np.uint8(4))


def _quant_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = abs(blocks).max(axis=1, keepdims=True) / 127
    qs = _np_roundf(blocks * _safe_inv(d))
    return np.concatenate([_f16_bytes(d), qs.astype(np.int8).view(np.uint8)], axis=1)


def _quant_q4_0(blocks: np.ndarray) -> np.ndarray:
    imax = abs(blocks).argmax(axis=-1, keepdims=True)
    mx = np.take_along_axis(blocks, imax, axis=-1)
    d = mx / -8
    qs = np.trunc((blocks * _safe_inv(d)) + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(qs)], axis=-1)


def _quant_q4_1(blocks: np.ndarray) -> np.ndarray:
    mx = blocks.max(axis=-1, keepdims=True)
    mn = blocks.min(axis=-1, keepdims=True)
    d = (mx - mn) / 15
    qs = np.trunc((blocks - mn) * _safe_inv(d) + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(qs)], axis=-1)


def _pack_q5(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = q.shape[0]
    qs = q.reshape((n, 2, 16))
    qs = (qs[:, 0, :] & np.uint8(0x0F)) | (qs[:, 1, :] << np.uint8(4))
    qh = np.packbits(q.reshape((n, 1, 32)) >> np.uint8(4), axis=-1, bitorder="little").reshape(n, 4)
    return qh, qs


def _quant_q5_0(blocks: np.ndarray) -> np.ndarray:
    imax = abs(blocks).argmax(axis=-1, keepdims=True)
    mx = np.take_along_axis(blocks, imax, axis=-1)
    d = mx / -16
    q = np.trunc((blocks * _safe_inv(d)) + np.float32(16.5), dtype=np.float32).astype(np.uint8).clip(0, 31)
    qh, qs = _pack_q5(q)
    return np.concatenate([_f16_bytes(d), qh, qs], axis=-1)


def _quant_q5_1(blocks: np.ndarray) -> np.ndarray:
    mx = blocks.max(axis=-1, keepdims=True)
    mn = blocks.min(axis=-1, keepdims=True)
    d = (mx - mn) / 31
    q = np.trunc((blocks - mn) * _safe_inv(d) + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 31)
    qh, qs = _pack_q5(q)
    return np.concatenate([_f16_bytes(d), _f16_bytes(mn), qh, qs], axis=-1)


def _quant_bf16(blocks: np.ndarray) -> np.ndarray:
    n = blocks.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16).view(np.uint8)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """llama.cpp's ``nearest_int``: round half to even (float32), as int32."""
    return np.rint(x.astype(np.float32)).astype(np.int32)


_GROUP_MAX_EPS = np.float32(1e-15)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, like llama.cpp's C loops."""
    return np.cumsum(a, axis=1, dtype=np.float32)[:, -1]


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised llama.cpp ``make_qkx2_quants`` (use_mad=false) over rows of ``x`` [n, 32].

    Returns (scale [n], the_min [n] (>= 0; the value subtracted), L uint8 [n, 32]).
    """
    f32 = np.float32
    mn = x.min(axis=1)
    mx = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    mn = np.minimum(mn, f32(0))
    flat = mx == mn
    rng = np.where(flat, f32(1), mx - mn).astype(f32)
    iscale = (f32(nmax) / rng).astype(f32)
    scale = (f32(1) / iscale).astype(f32)
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(f32) + mn[:, None] - x
    best_error = _seqsum(w * (diff * diff))
    for step in range(nstep + 1):
        # llama.cpp updates `min` inside this loop, so the range moves with it.
        rng = np.where(flat, f32(1), mx - mn).astype(f32)
        isc = ((f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / rng).astype(f32)
        laux = np.clip(_nearest_int(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = laux.astype(f32)
        sum_l = _seqsum(w * lf)
        sum_l2 = _seqsum(w * lf * lf)
        sum_xl = _seqsum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            alt = np.where(sum_l2 > 0, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), f32(0))
        this_scale = np.where(pos, alt, this_scale).astype(f32)
        this_min = np.where(pos, f32(0), this_min).astype(f32)
        diff = this_scale[:, None] * lf + this_min[:, None] - x
        cur_error = _seqsum(w * (diff * diff))
        better = ok & ~flat & (cur_error < best_error)
        L = np.where(better[:, None], laux, L)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale).astype(f32)
    return scale, (-mn).astype(f32), L.astype(np.uint8)


def _quant_q4_k(blocks: np.ndarray) -> np.ndarray:
    """llama.cpp ``quantize_row_q4_K_ref`` over ``[n, 256]`` float32 blocks."""
    f32 = np.float32
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, 32)
    av_x = np.sqrt(_seqsum(x * x) / f32(32)).astype(f32)
    w = (av_x[:, None] + np.abs(x)).astype(f32)
    scales, mins, L = _make_qkx2_quants(x, w, 15, -1.0, 0.1, 20)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    L = L.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(f32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(f32)
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(np.uint8)
    sb = np.zeros((n, 12), dtype=np.uint8)
    sb[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    sb[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    sb[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    d16 = (max_scale / f32(63)).astype(np.float16)
    dmin16 = (max_min / f32(63)).astype(np.float16)
    d = d16.astype(f32)[:, None] * ls.astype(f32)
    dm = dmin16.astype(f32)[:, None] * lm.astype(f32)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = _nearest_int((blocks.reshape(n, 8, 32) + dm[:, :, None]) / np.where(nz, d, f32(1))[:, :, None])
    lq = np.clip(lq, 0, 15).astype(np.uint8)
    L = np.where(nz[:, :, None], lq, L)
    q = L.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    return np.concatenate([d16.reshape(n, 1).view(np.uint8), dmin16.reshape(n, 1).view(np.uint8), sb, qs], axis=1)


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised llama.cpp ``make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`` over rows.

    Returns (scale [n] float32, L uint8 [n, k] in 0..2*nmax-1).
    """
    f32 = np.float32
    ax = np.abs(x)
    imax = ax.argmax(axis=1)
    amax = ax[np.arange(x.shape[0]), imax]
    mx = x[np.arange(x.shape[0]), imax]
    zero = amax < _GROUP_MAX_EPS
    mxs = np.where(zero, f32(1), mx).astype(f32)
    w = x * x

    def attempt(iscale):
        q = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = q.astype(f32)
        return q, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    iscale = (f32(-nmax) / mxs).astype(f32)
    q, sumlx, suml2 = attempt(iscale)
    L = q + nmax
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0)).astype(f32)
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        isc = (-(f32(nmax) + f32(0.1) * f32(is_)) / mxs).astype(f32)
        q, sumlx, suml2 = attempt(isc)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], q + nmax, L)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = (sumlx / np.where(suml2 > 0, suml2, f32(1))).astype(f32)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero[:, None], 0, L)
    scale = np.where(zero, f32(0), scale).astype(f32)
    return scale, L.astype(np.uint8)


def _quant_q6_k(blocks: np.ndarray) -> np.ndarray:
    """llama.cpp ``quantize_row_q6_K_ref`` over ``[n, 256]`` float32 blocks."""
    f32 = np.float32
    n = blocks.shape[0]
    scales, L = _make_qx_quants_rmse1(blocks.reshape(n * 16, 16), 32)
    scales = scales.reshape(n, 16)
    L = L.reshape(n, 16, 16)
    aidx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), aidx]
    max_abs = np.abs(max_scale)
    zero = max_abs < _GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale)).astype(f32)
        d16 = np.where(zero, f32(0), f32(1) / np.where(zero, f32(1), iscale)).astype(np.float16)
    sc = np.minimum(127, _nearest_int(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(f32)[:, None] * sc.astype(f32)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = _nearest_int(blocks.reshape(n, 16, 16) / np.where(nz, d, f32(1))[:, :, None])
    lq = (np.clip(lq, -32, 31) + 32).astype(np.uint8)
    L = np.where(nz[:, :, None], lq, L).reshape(n, 2, 4, 32)   # [n, half, quarter, l]
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(n, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(n, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.reshape(n, 1).view(np.uint8)], axis=1)
    out[zero] = 0
    return out


_QUANTIZERS = {
    "Q8_0": _quant_q8_0, "Q4_0": _quant_q4_0, "Q4_1": _quant_q4_1, "Q5_0": _quant_q5_0,
    "Q5_1": _quant_q5_1, "Q4_K": _quant_q4_k, "Q6_K": _quant_q6_k,
}


def quantize(w, ggml_type: str) -> np.ndarray:
    """Encode float32 ``w`` (2-D ``[rows, cols]``, or any shape whose last dim is the row) as
    ``ggml_type`` bytes: a flat uint8 numpy array of ``nbytes(ggml_type, w.size)`` bytes.

    Bit-exact with ``gguf.quants.quantize`` for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1;
    Q4_K and Q6_K follow llama.cpp's reference quantisers.
    """
    if isinstance(w, torch.Tensor):
        w = w.detach().to("cpu", torch.float32).numpy()
    w = np.ascontiguousarray(np.asarray(w, dtype=np.float32))
    if ggml_type not in QUANTIZE_TYPES:
        raise UnsupportedModelError(f"cannot quantise to {ggml_type!r}",
                                    f"edgellm quantises to: {', '.join(QUANTIZE_TYPES)}")
    if w.ndim == 0 or w.size == 0:
        raise ModelFormatError(f"cannot quantise a tensor of shape {tuple(w.shape)}",
                               "give a non-empty tensor")
    be = BLOCK_ELEMS[ggml_type]
    if w.shape[-1] % be:
        raise ModelFormatError(f"row length {w.shape[-1]} is not a multiple of the {ggml_type} block "
                               f"size {be}", f"keep tensors whose rows are not a multiple of {be} in F16/F32")
    if ggml_type == "F32":
        return w.reshape(-1).view(np.uint8).copy()
    if ggml_type == "F16":
        return w.reshape(-1).astype(np.float16).view(np.uint8)
    if ggml_type == "BF16":
        return _quant_bf16(w.reshape(-1)).reshape(-1)
    blocks = w.reshape(-1, be)
    fn = _QUANTIZERS[ggml_type]
    # Chunk so that temporaries stay small on big tensors.
    step = max(1, (1 << 18) // be)
    parts = [fn(blocks[s:s + step]) for s in range(0, blocks.shape[0], step)]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    assert out.dtype == np.uint8 and out.shape[1] == BLOCK_BYTES[ggml_type]
    return out.reshape(-1)
