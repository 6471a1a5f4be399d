"""The KV cache: one preallocated pool of fixed-size blocks, addressed by slot.

Slot ``s`` is position ``s % block_size`` of block ``s // block_size``. A sequence owns a list
of blocks (its block table); attention writes new keys/values to their slots and reads a
sequence's history through the slots of its positions. Who owns which block is the block
manager's business (``edgellm.kv.block_manager``); this module only holds the tensors.

Precision (``dtype``: a torch dtype or a name, as ``--kv-dtype`` takes them; the names are
:data:`edgellm.dtypes.KV_DTYPES`):

==============  ==========================================================  ================
name            storage                                                     bytes / element
==============  ==========================================================  ================
``fp32``        float32 (the default)                                       4
``fp16``        float16                                                     2
``bf16``        bfloat16                                                    2
``int8``        int8, one float16 scale per token and KV head (absmax/127)  1 + 2/head_dim
``fp8``         float8 E4M3, one float16 scale per token and KV head        1 + 2/head_dim
                (absmax/448); ``fp8-e5m2``: E5M2 (absmax/57344)
==============  ==========================================================  ================

With head_dim 64 the scaled formats take 1.03 bytes an element: the cache quarters (int8/fp8)
or halves (fp16/bf16), and a runtime that sizes its pool in bytes (``bytes_per_block``) holds
3.9x or 2x the tokens. Scaled values are written quantised and read back dequantised into the
compute dtype; int8 errs by at most half a step (absmax/254) per element, fp8 E4M3 by a
relative 2^-4. ``export_blocks`` returns ``{"kv": ...}`` and, for scaled formats, ``"scale"``.
"""

from __future__ import annotations

import torch

from edgellm.config import ModelConfig
from edgellm.dtypes import FLOAT8_HALF_FACTOR, KV_FLOAT8, float8_as_half, kv_dtype_name, kv_storage_dtype

#: tokens per KV block: the unit of allocation, sharing and offload everywhere in edgellm
BLOCK_SIZE = 16

# largest code of each scaled format
_QMAX = {"int8": 127.0, "fp8": 448.0, "fp8-e5m2": 57344.0}
_SCALE_DTYPE = torch.float16
_SCALE_MIN = 2.0 ** -24         # smallest float16 (subnormal): a scale never rounds to zero


class KVCache:
    #: a sequence cut back to any length keeps the KV of the positions before it (a recurrent
    #: model's StatePool cannot: it resumes at block edges only)
    resumes_mid_block = True

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16, dtype=torch.float32):
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_dtype = kv_dtype_name(dtype)
        self.dtype = kv_storage_dtype(self.kv_dtype)   # what ``data`` holds
        self.scaled = self.kv_dtype in _QMAX
        slots = num_blocks * block_size
        # [layer, k|v, slot, kv_head, head_dim]: one tensor, so a block's bytes across all layers
        # can be copied out (offload) and back with two index operations.
        self.data = torch.zeros(cfg.n_layers, 2, slots, cfg.n_kv_heads, cfg.head_dim, dtype=self.dtype)
        # [layer, k|v, slot, kv_head]: the scale of each token's head vector (scaled formats)
        self.scales = torch.ones(cfg.n_layers, 2, slots, cfg.n_kv_heads, dtype=_SCALE_DTYPE) if self.scaled else None

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int = 16, dtype=torch.float32) -> int:
        name = kv_dtype_name(dtype)
        element = torch.empty((), dtype=kv_storage_dtype(name)).element_size()
        per_head = cfg.head_dim * element + (2 if name in _QMAX else 0)
        return cfg.n_layers * 2 * block_size * cfg.n_kv_heads * per_head

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scales is not None:
            n += self.scales.numel() * self.scales.element_size()
        return n

    # ---- quantisation -----------------------------------------------------------------------
    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, KVH, D] float -> (codes in ``self.dtype``, float16 scales [T, KVH])."""
        x = x.float()
        qmax = _QMAX[self.kv_dtype]
        exact = x.abs().amax(dim=-1) / qmax
        scale = exact.to(_SCALE_DTYPE)
        # round the scale up, never down: absmax / scale then stays within the codes' range (a
        # scale rounded down would clip the largest element, badly so for tiny float16 scales)
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.tensor(torch.inf, dtype=_SCALE_DTYPE)),
                            scale).clamp_(min=_SCALE_MIN)
        y = x / scale.float()[..., None]
        if self.kv_dtype == "int8":
            return y.round_().clamp_(-qmax, qmax).to(torch.int8), scale
        return y.clamp_(-qmax, qmax).to(self.dtype), scale

    def _dequantize(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kv_dtype == "int8":
            vals = codes.float()
            s = scale.float()
        else:
            # torch's float8 -> float cast is a scalar loop; widen through half bits instead.
            variant = KV_FLOAT8[self.kv_dtype]
            vals = float8_as_half(codes, variant).float()
            s = scale.float() / FLOAT8_HALF_FACTOR[variant]
        return (vals * s[..., None]).to(dtype)

    # ---- access -----------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values ([T, kv_heads, head_dim]) at their slots."""
        kc, vc = self.data[layer, 0], self.data[layer, 1]
        if self.scaled:
            (kq, ks), (vq, vs) = self._quantize(k), self._quantize(v)
            ksc, vsc = self.scales[layer, 0], self.scales[layer, 1]
            if isinstance(slots, slice):
                kc[slots], vc[slots], ksc[slots], vsc[slots] = kq, vq, ks, vs
            else:
                # index_copy_ lacks float8 kernels: copy the raw bytes
                kc.view(torch.uint8).index_copy_(0, slots, kq.view(torch.uint8))
                vc.view(torch.uint8).index_copy_(0, slots, vq.view(torch.uint8))
                ksc.index_copy_(0, slots, ks)
                vsc.index_copy_(0, slots, vs)
            return
        if isinstance(slots, slice):
            kc[slots] = k.to(self.dtype)
            vc[slots] = v.to(self.dtype)
        else:
            kc.index_copy_(0, slots, k.to(self.dtype))
            vc.index_copy_(0, slots, v.to(self.dtype))

    def read(self, layer: int, slots: torch.Tensor | slice, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at ``slots`` (a slice, or an index tensor of any shape) as ``dtype``:
        [*slots.shape, kv_heads, head_dim]."""
        kc, vc = self.data[layer, 0], self.data[layer, 1]
        if self.scaled:
            ksc, vsc = self.scales[layer, 0], self.scales[layer, 1]
            if isinstance(slots, slice):
                return (self._dequantize(kc[slots], ksc[slots], dtype),
                        self._dequantize(vc[slots], vsc[slots], dtype))
            flat = slots.reshape(-1)
            shape = (*slots.shape, *kc.shape[1:])

            def gather(c, s):
                codes = c.view(torch.uint8).index_select(0, flat).view(self.dtype)
                return self._dequantize(codes, s.index_select(0, flat), dtype).view(shape)
            return gather(kc, ksc), gather(vc, vsc)
        if isinstance(slots, slice):
            return kc[slots].to(dtype), vc[slots].to(dtype)
        flat = slots.reshape(-1)
        shape = (*slots.shape, *kc.shape[1:])
        return kc.index_select(0, flat).view(shape).to(dtype), vc.index_select(0, flat).view(shape).to(dtype)

    # ---- offload ------------------------------------------------------------------------------
    def _block_view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.cfg.n_layers, 2, self.num_blocks, self.block_size, *t.shape[3:])

    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """A copy of these blocks' contents in every layer (for offload to host memory or disk)."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        out = {"kv": self._block_view(self.data).index_select(2, idx).clone()}
        if self.scales is not None:
            out["scale"] = self._block_view(self.scales).index_select(2, idx).clone()
        return out

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``src``'s contents, every layer, into block ``dst`` (the block manager's copy-on-write)."""
        self.import_blocks([dst], self.export_blocks([src]))

    def import_blocks(self, blocks: list[int], saved: dict[str, torch.Tensor]) -> None:
        """Put back what ``export_blocks`` returned, possibly into other block ids."""
        idx = torch.tensor(blocks, dtype=torch.int64)
        kv = saved["kv"]
        if kv.dtype != self.dtype or (self.scales is not None) != ("scale" in saved):
            raise ValueError(f"blocks exported from a {kv.dtype} cache cannot go into a {self.kv_dtype} cache")
        view = self._block_view(self.data)
        if self.dtype.is_floating_point and self.dtype.itemsize == 1:   # float8: no index_copy_ kernel
            view.view(torch.uint8).index_copy_(2, idx, kv.view(torch.uint8))
        else:
            view.index_copy_(2, idx, kv)
        if self.scales is not None:
            self._block_view(self.scales).index_copy_(2, idx, saved["scale"])

    def block_slots(self, block_table: list[int], length: int) -> torch.Tensor | slice:
        """Slots of positions 0..length-1 for a sequence with this block table: a slice when its
        blocks are consecutive (the common case of a lone sequence in a fresh pool), which spares
        a decode step building and gathering through an index of its whole history."""
        bs = self.block_size
        n = -(-length // bs)
        first = block_table[0] if block_table else 0
        if block_table[:n] == list(range(first, first + n)):
            return slice(first * bs, first * bs + length)
        blocks = torch.tensor(block_table, dtype=torch.int64)
        pos = torch.arange(length, dtype=torch.int64)
        return blocks[pos // bs] * bs + pos % bs
